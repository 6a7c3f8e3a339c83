"""Build a bound reward (and optional shaping) from a config mapping or a short string.

A reward spec maps component names to entries::

    {"loglik": {"weight": 1.0, "temperature": 0.1},
     "collaborative": {"weight": 0.5, "k": 20, "similarity": "cosine"}}

An entry's ``type`` is the registry name of its term (:data:`REWARD_TERMS`) and defaults to
the component name, so two terms of one type can sit side by side
(``{"collab20": {"type": "collaborative", "k": 20}, "collab50": {"type": "collaborative",
"k": 50}}``). ``weight`` defaults to 1; every other key is a keyword of the term's class. An
entry can also be just a number (the weight). A string spec is either a JSON object or
``"loglik"``, ``"loglik+collaborative"``, ``"1.0*loglik+0.5*collaborative"``.

A term of your own becomes a ``type`` like the built-in ones with :func:`register_reward_term`,
or is named by its import path, ``{"mine": {"type": "my_package.rewards:MyTerm"}}`` (what a
config file run by the CLI uses: the path is imported when the reward is built); an instance can
also be passed as the whole spec (``build_reward(MyTerm(), ...)``, or a
:class:`WeightedReward` of instances).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from typing import Any, Mapping, Optional, Union

import torch

from refit_gym.data.interactions import InteractionData
from refit_gym.errors import ConfigError
from refit_gym.rewards.base import RewardTerm, StepShaping, TrainingInteractions
from refit_gym.rewards.collaborative import CollaborativeReward
from refit_gym.rewards.likelihood import HeldOutLikelihood, HeldOutLogLikelihood
from refit_gym.rewards.next_item import NextItemCollaborativeReward
from refit_gym.rewards.ranking import HeldOutNDCG, HeldOutRecall
from refit_gym.rewards.shaping import HeldOutPotential
from refit_gym.rewards.slate import SlateReward
from refit_gym.rewards.weighted import WeightedReward

REWARD_TERMS: dict[str, type[RewardTerm]] = {
    "loglik": HeldOutLogLikelihood,
    "likelihood": HeldOutLikelihood,
    "collaborative": CollaborativeReward,
    "next_collaborative": NextItemCollaborativeReward,
    "recall": HeldOutRecall,
    "ndcg": HeldOutNDCG,
    "slate": SlateReward,
}
"""Registry names of the reward terms ``build_reward`` knows."""

SHAPINGS: dict[str, type[StepShaping]] = {"held_out": HeldOutPotential}
"""Registry names of the shaping potentials ``build_shaping`` knows."""

RewardSpec = Union[Mapping[str, Any], str, RewardTerm]

_TERM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def register_reward_term(cls: type[RewardTerm], name: Optional[str] = None) -> type[RewardTerm]:
    """Make a reward term class buildable by name, like the built-in terms; returns ``cls``.

    After ``register_reward_term(MyTerm)`` (or ``@register_reward_term`` on the class), a spec
    can name it (``{"mine": {"weight": 0.5, "alpha": 2}}`` or ``{"x": {"type": "mine"}}``), in
    Python, in ``gym.make(..., reward=...)`` and in the configs a process reads after the
    registration; :func:`reward_spec` writes it back by that name.

    Args:
        cls: a :class:`RewardTerm` subclass; the spec's other keys are its ``__init__`` keywords.
        name: the registry name; default ``cls.name``.

    Raises:
        ConfigError: ``cls`` is not a ``RewardTerm`` subclass, the name is missing (a class that
            keeps the base class's ``name``) or not a plain identifier, or it is taken by another
            class. Registering the same class again, or a class of the same module and qualified
            name (a notebook cell run twice), replaces the entry.
    """
    if not (isinstance(cls, type) and issubclass(cls, RewardTerm)):
        raise ConfigError(f"register_reward_term needs a RewardTerm subclass, got {cls!r}")
    if name is None:
        if cls.name == RewardTerm.name:
            raise ConfigError(f"{cls.__name__} has no name of its own: set its `name` attribute or pass name=")
        name = cls.name
    if not isinstance(name, str) or not _TERM_NAME.fullmatch(name):
        raise ConfigError(f"a reward term name must be a plain identifier (letters, digits, _ . -), got {name!r}")
    known = REWARD_TERMS.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ConfigError(f"the reward term name {name!r} is taken by {known.__module__}.{known.__qualname__}")
    REWARD_TERMS[name] = cls
    return cls


def _parse_string(spec: str) -> dict[str, Any]:
    text = spec.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"reward spec {spec!r} is not valid JSON: {error}") from None
        if not isinstance(parsed, dict):
            raise ConfigError(f"a JSON reward spec must be an object, got {spec!r}")
        return parsed
    entries: dict[str, Any] = {}
    for part in text.split("+"):
        weight_text, _, name = part.strip().rpartition("*")
        name = name.strip()
        if not name:
            raise ConfigError(f"reward spec {spec!r} has an empty term; expected e.g. 'loglik+0.5*collaborative'")
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            raise ConfigError(f"reward spec {spec!r}: {weight_text.strip()!r} is not a weight") from None
        if name in entries:
            raise ConfigError(f"reward spec {spec!r} names {name!r} twice")
        entries[name] = {"weight": weight}
    return entries


def _accepted_parameters(cls: type) -> list[str]:
    parameters = inspect.signature(cls.__init__).parameters
    return [name for name in parameters if name != "self"]


def reward_term_class(kind: Any) -> type[RewardTerm]:
    """The class of a registered term name (:data:`REWARD_TERMS`) or of an import path
    ``package.module:Class``.

    Raises:
        ConfigError: an unknown name, a path that does not import, or not a ``RewardTerm`` subclass.
    """
    if isinstance(kind, str) and kind in REWARD_TERMS:
        return REWARD_TERMS[kind]
    module_name, sep, attribute = kind.partition(":") if isinstance(kind, str) else ("", "", "")
    if not (sep and module_name and attribute):
        raise ConfigError(f"unknown type {kind!r}; known: {', '.join(sorted(REWARD_TERMS))} "
                          "(or give your own as 'package.module:Class')")
    try:
        cls = importlib.import_module(module_name)
        for part in attribute.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"cannot import the reward term {kind!r}: {error}") from None
    if not (isinstance(cls, type) and issubclass(cls, RewardTerm)):
        raise ConfigError(f"{kind!r} is not a refit_gym.rewards.RewardTerm subclass")
    return cls


def _instantiate(cls: type, params: dict, where: str, what: str):
    """``cls(**params)``, with a :class:`ConfigError` naming unknown parameters."""
    kind = getattr(cls, "name", cls.__name__)
    accepted = _accepted_parameters(cls)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        reserved = "weight, type" if what == "reward term" else "type"
        raise ConfigError(
            f"{where}: unknown parameter(s) {', '.join(map(repr, unknown))} for {what} {kind!r} "
            f"({cls.__name__}); accepted: {reserved}, {', '.join(accepted)}"
        )
    try:
        return cls(**params)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from None


def normalize_reward_spec(spec: Union[Mapping[str, Any], str]) -> dict[str, dict[str, Any]]:
    """The spec as ``{name: {"type": ..., "weight": ..., **params}}`` (types checked, params not yet).

    Raises:
        ConfigError: not a mapping or string, empty, an unknown term type or a malformed entry.
    """
    if isinstance(spec, str):
        spec = _parse_string(spec)
    if not isinstance(spec, Mapping):
        raise ConfigError(f"a reward spec must be a mapping or a string, got {type(spec).__name__}")
    if not spec:
        raise ConfigError(f"the reward spec is empty; known terms: {', '.join(sorted(REWARD_TERMS))}")
    normalized: dict[str, dict[str, Any]] = {}
    for name, entry in spec.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"reward term names must be non-empty strings, got {name!r}")
        if entry is None:
            entry = {}
        elif isinstance(entry, (int, float)) and not isinstance(entry, bool):
            entry = {"weight": entry}
        elif not isinstance(entry, Mapping):
            raise ConfigError(f"reward term {name!r}: expected a mapping of parameters or a weight, got {entry!r}")
        entry = dict(entry)
        kind = entry.pop("type", name)
        try:
            reward_term_class(kind)
        except ConfigError as error:
            raise ConfigError(f"reward term {name!r}: {error}") from None
        normalized[name] = {"type": kind, "weight": entry.pop("weight", 1.0), **entry}
    return normalized


def _training_view(interactions: Union[TrainingInteractions, InteractionData]) -> TrainingInteractions:
    if isinstance(interactions, TrainingInteractions):
        return interactions
    if isinstance(interactions, InteractionData):
        return TrainingInteractions.from_data(interactions)  # drops valid / test
    raise ConfigError(f"rewards bind to TrainingInteractions, got {type(interactions).__name__}")


def build_reward(
    spec: RewardSpec,
    interactions: Union[TrainingInteractions, InteractionData],
    device: torch.device | str = "cpu",
    allow_negative: bool = False,
) -> WeightedReward:
    """A bound :class:`WeightedReward` from a spec (see the module docstring).

    Args:
        spec: a mapping, a string, or an already built :class:`RewardTerm` (wrapped with
            weight 1 unless it is a :class:`WeightedReward`).
        interactions: the training view the terms bind to; an ``InteractionData`` is reduced to
            its :class:`TrainingInteractions` first, so validation and test never reach a term.
        device: where the terms keep their precomputed tensors.
        allow_negative: accept negative weights.

    Returns:
        The bound reward; ``reward.components(scores, episode)`` reports each term by name.

    Raises:
        ConfigError: an unknown term type or parameter (named in the message), a bad weight,
            or a parameter out of range (e.g. ``k`` above ``n_items`` at bind, ``temperature <= 0``).
    """
    training = _training_view(interactions)
    if isinstance(spec, WeightedReward):
        return spec.bind(training, device)
    if isinstance(spec, RewardTerm):
        return WeightedReward({spec.name: (1.0, spec)}, allow_negative).bind(training, device)
    entries = normalize_reward_spec(spec)
    terms = {}
    for name, entry in entries.items():
        params = dict(entry)
        kind, weight = params.pop("type"), params.pop("weight")
        terms[name] = (weight, _instantiate(reward_term_class(kind), params, f"reward term {name!r}", "reward term"))
    reward = WeightedReward(terms, allow_negative)
    for name, term in reward.terms.items():
        try:
            term.bind(training, device)
        except ConfigError as error:
            raise ConfigError(f"reward term {name!r}: {error}") from None
    return reward


def reward_spec(reward: WeightedReward) -> dict[str, dict[str, Any]]:
    """The spec :func:`build_reward` turns back into an equal reward (for run records and configs).

    A registered term is written by its registry name, any other by its import path
    ``module:Class``.

    Raises:
        ConfigError: a term whose class cannot be imported by its path (defined in ``__main__``
            or inside a function) and is not registered.
    """
    by_class = {cls: kind for kind, cls in REWARD_TERMS.items()}
    spec = {}
    for name, term in reward.terms.items():
        cls = type(term)
        kind = by_class.get(cls)
        if kind is None:
            if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
                raise ConfigError(f"reward term {name!r} ({cls.__name__}) is neither registered nor importable "
                                  "by a path: register it with register_reward_term or define it in a module")
            kind = f"{cls.__module__}:{cls.__qualname__}"
        params = {key: value for key, value in term.config().items() if key != "term"}
        spec[name] = {"type": kind, "weight": reward.weights[name], **params}
    return spec


def build_shaping(
    spec: Optional[Union[Mapping[str, Any], str]],
    interactions: Union[TrainingInteractions, InteractionData],
    device: torch.device | str = "cpu",
) -> Optional[StepShaping]:
    """A bound shaping object, or ``None`` (the default: no shaping).

    Args:
        spec: ``None`` / ``False`` (off), a registry name (``"held_out"``), or a mapping
            ``{"type": "held_out", **params}`` (``type`` defaults to ``"held_out"``).
        interactions: the training view (an ``InteractionData`` is reduced to it).
        device: the device of the shaping's tensors.

    Raises:
        ConfigError: an unknown type or parameter.
    """
    if spec is None or spec is False:
        return None
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"a shaping spec must be None, a name or a mapping, got {type(spec).__name__}")
    params = dict(spec)
    kind = params.pop("type", "held_out")
    if not isinstance(kind, str) or kind not in SHAPINGS:
        raise ConfigError(f"shaping: unknown shaping type {kind!r}; known: {', '.join(sorted(SHAPINGS))}")
    shaping = _instantiate(SHAPINGS[kind], params, "shaping", "shaping")
    return shaping.bind(_training_view(interactions), device)


__all__ = [
    "REWARD_TERMS",
    "SHAPINGS",
    "build_reward",
    "build_shaping",
    "normalize_reward_spec",
    "register_reward_term",
    "reward_spec",
    "reward_term_class",
]
