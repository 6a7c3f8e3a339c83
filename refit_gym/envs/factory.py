"""One function builds data + base model + reward + core from a scenario and an env's keyword arguments.

Every front (single, vector, TorchRL, SB3) calls :func:`build_env_parts`; nothing is constructed
anywhere else, and nothing here names a dataset or a model: the scenario YAML does
(:mod:`refit_gym.envs.scenarios`). The base model comes from ``checkpoint=``, else from the
pretrained-model cache (:mod:`refit_gym.training.cache`), which pretrains it once when it is
missing -- the only case in which building an env imports the pretraining code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import torch

from refit_gym.checkpoint import check_data_matches, load_checkpoint
from refit_gym.config import ExperimentConfig, resolve_device
from refit_gym.data.interactions import InteractionData, TrainingInteractions
from refit_gym.envs.core import DenoisingMDP
from refit_gym.envs.scenarios import CHAIN_KWARGS, EnvConfig, Scenario, scenario_for
from refit_gym.errors import ConfigError
from refit_gym.models import BaseModel
from refit_gym.rewards.base import RewardTerm, StepShaping
from refit_gym.training.cache import cached_checkpoint, frozen_base_model, pretrained_checkpoint

logger = logging.getLogger(__name__)

COMMON_KWARGS = ("dataset", "data", "model", "data_dir", "checkpoint", "pretrained", "reward", "shaping", "device",
                 "progress")
"""Keyword arguments every env accepts besides the chain's (see :func:`build_env_parts`)."""

DEFAULT_REWARD: dict[str, Any] = {"loglik": {"weight": 1.0}}
"""The default reward: the mean log-probability of the held-out (by default the most recent 25 %)
training items under ``softmax(scores / 0.1)``, input items masked
(``refit_gym.rewards.HeldOutLogLikelihood``)."""

_DATA_CACHE: dict[tuple[str, str], InteractionData] = {}
_LOCK = threading.Lock()


def _load_data(config: ExperimentConfig) -> InteractionData:
    """The scenario's dataset, shared in-process."""
    from refit_gym.data import find_dataset, load_dataset

    spec = config.data.dataset
    is_synthetic = spec == "synthetic" or spec.startswith("synthetic:")
    key = ("synthetic", spec) if is_synthetic else ("path", str(find_dataset(spec, config.data.data_dir).resolve()))
    with _LOCK:
        if key not in _DATA_CACHE:
            _DATA_CACHE[key] = load_dataset(spec, data_dir=config.data.data_dir)
        return _DATA_CACHE[key]


@contextlib.contextmanager
def _torch_threads(n: Optional[int]):
    """Run with ``n`` intra-op threads (``None``: unchanged)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pretrain_on_first_use(scenario: Scenario, env: EnvConfig, config: ExperimentConfig, data: InteractionData,
                           progress: bool) -> BaseModel:
    """The cached pretrained base; pretrained now (logged first: it can take minutes) when missing."""
    def announce(resuming: bool) -> None:
        logger.warning("%s: no pretrained %s in the cache (%s); %s now, once (its pretrain section caps it at %s "
                       "epochs%s; interrupting keeps the progress)", scenario.env_id, config.model.name,
                       cached_checkpoint(config, data),
                       "resuming the interrupted pretraining" if resuming else "pretraining it",
                       config.pretrain.max_epochs,
                       f" and {config.pretrain.time_budget_s:.0f} s" if config.pretrain.time_budget_s else "")

    with torch.random.fork_rng(devices=[]), _torch_threads(env.pretrain_threads):
        directory = pretrained_checkpoint(config, data, progress=progress, log=logger.info, on_miss=announce)
    return load_checkpoint(directory, data, device="cpu")[0]


# ---------------------------------------------------------------------------------- building
@dataclass
class EnvParts:
    """What a front needs: the core, the data (titles for rendering) and the scenario (``None``
    for a front over a core built by hand, e.g. an agent's)."""

    core: DenoisingMDP
    data: Optional[InteractionData] = None
    scenario: Optional[Scenario] = None

    @property
    def name(self) -> str:
        """The env id, for rendering and records."""
        return self.scenario.env_id if self.scenario is not None else "refit-gym"

    @property
    def item_titles(self):
        return None if self.data is None else self.data.item_titles


def _bind_reward(spec: Any, data: InteractionData, device: torch.device) -> RewardTerm:
    from refit_gym.rewards import build_reward

    return build_reward(DEFAULT_REWARD if spec is None else spec, TrainingInteractions.from_data(data), device)


def _bind_shaping(spec: Any, data: InteractionData, device: torch.device) -> Optional[StepShaping]:
    if isinstance(spec, StepShaping):
        return spec.bind(TrainingInteractions.from_data(data), device)
    from refit_gym.rewards import build_shaping

    return build_shaping(spec, TrainingInteractions.from_data(data), device)


def build_env_parts(
    scenario: str = "ReFiT-Synthetic-v0",
    *,
    batch_size: int = 1,
    dataset: Optional[str] = None,
    data: Optional[InteractionData] = None,
    model: Optional[BaseModel] = None,
    data_dir: Optional[str | os.PathLike] = None,
    checkpoint: Optional[str | os.PathLike] = None,
    pretrained: bool = True,
    reward: Any = None,
    shaping: Any = None,
    device: torch.device | str = "cpu",
    progress: Optional[bool] = None,
    **kwargs: Any,
) -> EnvParts:
    """Build the data, the base model, the bound reward and the core of an environment.

    Args:
        scenario: an env id (``"ReFiT-ML1M-v0"``) or the path of a scenario YAML.
        batch_size: number of users stepped together.
        dataset: another dataset for the scenario's model (a name under the data directory, a
            path or a ``synthetic:...`` spec; the model is pretrained for it).
        data: use this :class:`InteractionData` instead of the scenario's.
        model: use this base model (built for ``data``) instead of the scenario's.
        data_dir: where named datasets live (default ``$REFIT_GYM_DATA``).
        checkpoint: a refit-gym checkpoint directory of the base model.
        pretrained: ``False`` uses a freshly initialised base model (seeded; for tests and
            benchmarks: no pretraining, no cache) when no ``checkpoint`` is given.
        reward: a reward spec for :func:`refit_gym.rewards.build_reward` (mapping, string or a
            ``RewardTerm``); default: the scenario's, else :data:`DEFAULT_REWARD`.
        shaping: ``None`` (the scenario's; off by default), a spec for
            :func:`refit_gym.rewards.build_shaping`, or a ``StepShaping``.
        device: ``"cpu"`` (default), ``"cuda"``, ``"auto"``...
        progress: show a progress bar if the base model must be pretrained (default: when
            stderr is a terminal).
        **kwargs: the chain's parameters (:data:`~refit_gym.envs.scenarios.CHAIN_KWARGS`, see
            :class:`~refit_gym.envs.core.DenoisingMDP`); they override the scenario's.

    Raises:
        ConfigError: an unknown keyword argument (all are listed in the message) or a value out
            of range.
        DataError: the dataset cannot be found or read.
    """
    spec = scenario_for(scenario)
    unknown = sorted(set(kwargs) - set(CHAIN_KWARGS))
    if unknown:
        known = sorted((*COMMON_KWARGS, *CHAIN_KWARGS, "batch_size"))
        raise ConfigError(f"unknown keyword argument(s) {unknown} for {spec.env_id}; known: {known}")
    if not isinstance(pretrained, (bool, np.bool_)):
        raise ConfigError(f"pretrained must be a bool, got {pretrained!r}")
    overrides: dict[str, Any] = {}
    if dataset is not None:
        overrides["data.dataset"] = dataset
    if data_dir is not None:
        overrides["data.data_dir"] = str(data_dir)
    config = spec.experiment(overrides)
    env = spec.env_config()
    target = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if data is None:
        if model is not None:
            raise ConfigError("model= needs the data it was built for: pass data= too")
        data = _load_data(config)
    elif not isinstance(data, InteractionData):
        raise ConfigError(f"data must be an InteractionData, got {type(data).__name__}")
    if model is None:
        show_progress = sys.stderr.isatty() if progress is None else bool(progress)
        model = frozen_base_model(
            config, data, checkpoint, bool(pretrained),
            load=lambda: _pretrain_on_first_use(spec, env, config, data, show_progress),
        )
    elif not isinstance(model, BaseModel):
        raise ConfigError(f"model must be a refit_gym.models.BaseModel, got {type(model).__name__}")
    check_data_matches(model.describe(), data)
    core = DenoisingMDP(
        model,
        _bind_reward(env.reward if reward is None else reward, data, target),
        TrainingInteractions.from_data(data),
        batch_size=batch_size,
        shaping=_bind_shaping(env.shaping if shaping is None else shaping, data, target),
        device=target,
        **{**env.chain_kwargs(), **kwargs},
    )
    return EnvParts(core=core, data=data, scenario=spec)


def clear_caches() -> None:
    """Forget the in-process data and model caches (the disk cache stays)."""
    from refit_gym.training.cache import clear_model_cache

    with _LOCK:
        _DATA_CACHE.clear()
    clear_model_cache()


def describe(parts: EnvParts) -> Mapping[str, Any]:
    """A JSON-able description of an env for run records."""
    return {"env_id": parts.name, "data": None if parts.data is None else parts.data.summary(),
            "chain": parts.core.config()}
