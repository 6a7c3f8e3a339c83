"""A weighted sum of named reward terms, reporting each term for the env's ``info``."""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence, Union

import torch

from refit_gym.errors import ConfigError, DataError
from refit_gym.rewards._checks import check_weight
from refit_gym.rewards.base import EpisodeBatch, RewardTerm, TrainingInteractions

TermsSpec = Union[Mapping[str, tuple[float, RewardTerm]], Sequence[tuple[float, RewardTerm]]]


class WeightedReward(RewardTerm):
    """``R = sum_i w_i R_i`` over named terms; itself a :class:`RewardTerm`.

    Weights must be finite and, unless ``allow_negative=True``, ``>= 0``: every built-in term is
    "higher is better", so a negative weight is almost always a sign error. A weight of 0 keeps
    a term in :meth:`components` (it is still computed and reported) without adding to the
    total -- the way to switch a term off while still logging it.

    Args:
        terms: ``{name: (weight, term)}``, or a sequence of ``(weight, term)`` named by each
            term's ``name`` (names must then be distinct).
        allow_negative: accept negative weights.

    Attributes:
        terms: ``{name: term}`` in the given order.
        weights: ``{name: weight}``.
        differentiable: True when every term is (an empty sum is differentiable).
        uses_slates: True when some term reads the env's slates (``episode.slates``).
        recent_items_needed: the largest ask of the terms (``episode.recent_items``).

    Raises:
        ConfigError: a weight that is not a finite number (or negative without
            ``allow_negative``), a term that is not a :class:`RewardTerm`, an empty or
            duplicate name.
    """

    name = "reward"

    def __init__(self, terms: TermsSpec, allow_negative: bool = False) -> None:
        self.allow_negative = bool(allow_negative)
        if isinstance(terms, Mapping):
            items = list(terms.items())
        else:
            items = []
            for entry in terms:
                if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                    raise ConfigError(f"expected (weight, term) pairs, got {entry!r}")
                items.append((getattr(entry[1], "name", None), tuple(entry)))
        self.terms: dict[str, RewardTerm] = {}
        self.weights: dict[str, float] = {}
        for name, entry in items:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"reward term names must be non-empty strings, got {name!r}")
            if name in self.terms:
                raise ConfigError(
                    f"two reward terms are named {name!r}; pass a dict {{name: (weight, term)}} to name them apart"
                )
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise ConfigError(f"reward term {name!r}: expected a (weight, term) pair, got {entry!r}")
            weight, term = entry
            if not isinstance(term, RewardTerm):
                raise ConfigError(f"reward term {name!r} is a {type(term).__name__}, not a RewardTerm")
            self.weights[name] = check_weight(weight, name, self.allow_negative)
            self.terms[name] = term

    @property
    def differentiable(self) -> bool:  # type: ignore[override]
        return all(term.differentiable for term in self.terms.values())

    @property
    def uses_slates(self) -> bool:  # type: ignore[override]
        return any(getattr(term, "uses_slates", False) for term in self.terms.values())

    @property
    def recent_items_needed(self) -> int:  # type: ignore[override]
        return max((int(getattr(term, "recent_items_needed", 0)) for term in self.terms.values()), default=0)

    def __len__(self) -> int:
        return len(self.terms)

    def __iter__(self) -> Iterator[str]:
        return iter(self.terms)

    def bind(self, interactions: TrainingInteractions, device: torch.device | str = "cpu") -> "WeightedReward":
        """Bind every term; returns self."""
        for term in self.terms.values():
            term.bind(interactions, device)
        return self

    def components(self, scores: torch.Tensor, episode: EpisodeBatch) -> dict[str, torch.Tensor]:
        """Each term's (unweighted) value, ``{name: Tensor (B,)}``, in the terms' order."""
        values = {}
        for name, term in self.terms.items():
            value = term(scores, episode)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (episode.batch_size,):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise DataError(f"reward term {name!r} returned {shape}; expected a tensor of shape ({episode.batch_size},)")
            values[name] = value
        return values

    def total(self, components: Mapping[str, torch.Tensor], batch_size: int | None = None) -> torch.Tensor:
        """``sum_i w_i components[i]``: the reward from already computed :meth:`components`."""
        total = None
        for name, weight in self.weights.items():
            weighted = weight * components[name]
            total = weighted if total is None else total + weighted
        if total is None:
            if batch_size is None:
                raise DataError("an empty WeightedReward needs batch_size to return zeros")
            return torch.zeros(batch_size)
        return total

    def __call__(self, scores: torch.Tensor, episode: EpisodeBatch) -> torch.Tensor:
        """``(B,)`` weighted sum of the terms (zeros for an empty sum)."""
        if not self.terms:
            return torch.zeros(episode.batch_size, dtype=scores.dtype, device=scores.device)
        return self.total(self.components(scores, episode))

    def split_differentiable(self) -> tuple["WeightedReward", "WeightedReward"]:
        """``(differentiable part, the rest)``, each a :class:`WeightedReward` sharing this one's (bound) terms.

        For agents that maximise the differentiable terms by gradient and the others by policy
        gradient; either part may be empty.
        """
        parts = ({}, {})
        for name, term in self.terms.items():
            parts[0 if term.differentiable else 1][name] = (self.weights[name], term)
        return WeightedReward(parts[0], self.allow_negative), WeightedReward(parts[1], self.allow_negative)

    def config(self) -> dict:
        return {
            "term": type(self).__name__,
            "allow_negative": self.allow_negative,
            "terms": {name: {"weight": self.weights[name], **term.config()} for name, term in self.terms.items()},
        }
