"""One function builds data + base model + reward + core from an env's keyword arguments.

Every front (single, vector, TorchRL, SB3) calls :func:`build_env_parts`; nothing is constructed
anywhere else. Presets name the registered environments:

=================  =====================  ===============================================
preset             env id                 data and base model
=================  =====================  ===============================================
``"synthetic"``    ``ReFiT-Synthetic-v0``  ``make_synthetic(500, 300)``; DiffRec pretrained in
                                          seconds on first use, then cached
``"ml1m"``         ``ReFiT-ML1M-v0``       ``diffrec_ml-1m_clean``; DiffRec from
                                          ``checkpoint=``, else the cached pretrained one,
                                          else pretrained (minutes) on first use and cached
=================  =====================  ===============================================

Base models are cached in-process (one frozen model shared by every env built in the process)
and on disk under ``$XDG_CACHE_HOME/refit_gym/checkpoints/<key>`` (default
``~/.cache/refit_gym/checkpoints``), where ``<key>`` names the data and model and hashes the seed, the model / diffusion /
pretraining config and a fingerprint of the training matrix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch

from refit_gym.checkpoint import load_checkpoint
from refit_gym.training.pretrain import pretrained_checkpoint, train_fingerprint
from refit_gym.config import ExperimentConfig, config_from_dict, load_config, packaged_config, resolve_device
from refit_gym.data.interactions import InteractionData
from refit_gym.envs.core import DenoisingMDP
from refit_gym.envs.presets import Preset, preset_for
from refit_gym.errors import ConfigError
from refit_gym.models import build_model
from refit_gym.models.base import DiffusionRecommender, check_data_matches
from refit_gym.rewards.base import RewardTerm, StepShaping, TrainingInteractions

logger = logging.getLogger(__name__)

CHAIN_KWARGS = (
    "action_mode",
    "exposed_steps",
    "stochastic_prefix",
    "transition_std",
    "holdout",
    "holdout_fraction",
    "noise_steps",
    "action_bound",
)
"""Keyword arguments passed through to :class:`~refit_gym.envs.core.DenoisingMDP`."""

COMMON_KWARGS = ("data", "model", "data_dir", "checkpoint", "pretrained", "reward", "shaping", "device", "progress")
"""Keyword arguments every preset accepts (see :func:`build_env_parts`)."""

DEFAULT_REWARD: dict[str, Any] = {"loglik": {"weight": 1.0}}
"""The default reward: the mean log-probability of the held-out (by default the most recent 25 %)
training items under ``softmax(x0 / 0.1)``, input items masked
(``refit_gym.rewards.HeldOutLogLikelihood``; on ML-1M the supervised gradient of this objective
toward the most recent items raised test Recall@20)."""

SYNTHETIC_SIZE = {"n_users": 500, "n_items": 300, "data_seed": 0}


def _synthetic_config(n_users: int, n_items: int, data_seed: int) -> ExperimentConfig:
    return config_from_dict(
        {
            "name": "refit_synthetic_v0",
            "seed": 0,
            "device": "cpu",
            "data": {"dataset": f"synthetic:n_users={n_users},n_items={n_items},seed={data_seed}"},
            "model": {"name": "diffrec", "dims": [64, 128], "time_emb_dim": 10, "dropout": 0.5},
            "diffusion": {"steps": 10},
            "pretrain": {
                "lr": 1e-3,
                "batch_size": 100,
                "max_epochs": 60,
                "eval_every": 5,
                "min_epochs": 10,
                "plateau_patience": 2,
                "max_lr_decays": 1,
                "time_budget_s": 120.0,
            },
            "evaluation": {"ks": [10, 20], "batch_size": 1024},
        }
    )


def _ml1m_config() -> ExperimentConfig:
    """DiffRec's published ML-1M settings: the shipped ``configs/ml1m_diffrec.yaml``."""
    return load_config(packaged_config("ml1m_diffrec.yaml"))


# ---------------------------------------------------------------------------------- caches
_DATA_CACHE: dict[tuple, InteractionData] = {}
_MODEL_CACHE: dict[tuple[str, str], DiffusionRecommender] = {}
_LOCK = threading.Lock()


def model_cache_key(preset: str, config: ExperimentConfig, data: InteractionData) -> str:
    """``<preset>-<model>-<hash>`` of everything the pretrained weights depend on."""
    described = {
        "preset": preset,
        "seed": config.seed,
        "model": config.to_dict()["model"],
        "diffusion": config.to_dict()["diffusion"],
        "pretrain": config.to_dict()["pretrain"],
        "data": {"name": data.name, "n_users": data.n_users, "n_items": data.n_items, "train": train_fingerprint(data)},
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]
    return f"{preset}-{config.model.name}-{digest}"


def _load_data(preset: Preset, data_dir: Optional[str], extra: dict[str, Any]) -> InteractionData:
    if preset.name == "synthetic":
        size = {**SYNTHETIC_SIZE, **extra}
        key = ("synthetic", size["n_users"], size["n_items"], size["data_seed"])
        if key not in _DATA_CACHE:
            from refit_gym.data import make_synthetic

            _DATA_CACHE[key] = make_synthetic(size["n_users"], size["n_items"], seed=size["data_seed"])
        return _DATA_CACHE[key]
    from refit_gym.data import find_dataset, load_dataset

    path = find_dataset("diffrec_ml-1m_clean", data_dir).resolve()
    key = ("ml1m", str(path))
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_dataset(path)
    return _DATA_CACHE[key]


def _preset_config(preset: Preset, extra: dict[str, Any]) -> ExperimentConfig:
    if preset.name == "synthetic":
        return _synthetic_config(**{**SYNTHETIC_SIZE, **extra})
    return _ml1m_config()


def _fresh_model(config: ExperimentConfig, data: InteractionData) -> DiffusionRecommender:
    """A freshly initialised base model, seeded by the config (the global torch RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config.model, config.diffusion, data, device="cpu")
    return model


def _freeze(model: DiffusionRecommender) -> DiffusionRecommender:
    model.eval()
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def _torch_threads(n: Optional[int]):
    """Run with ``n`` intra-op threads (``None``: unchanged). A tiny model trains ~10x faster on
    one thread than on two contended ones (measured: 1.5 s vs 26 s on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pretrained_model(
    preset: Preset, config: ExperimentConfig, data: InteractionData, progress: bool
) -> DiffusionRecommender:
    """The cached pretrained base (disk cache of :func:`pretrained_checkpoint`), trained on first use."""
    if preset.name != "synthetic":
        logger.warning("%s: the pretrained DiffRec base is read from the cache, or trained now (minutes on a "
                       "CPU) and cached for next time", preset.env_id)
    with torch.random.fork_rng(devices=[]), _torch_threads(1 if preset.name == "synthetic" else None):
        directory = pretrained_checkpoint(config, data, progress=progress, log=logger.info)
    model, _ = load_checkpoint(directory, data, device="cpu")
    return model


def base_model(
    preset: Preset,
    data: InteractionData,
    extra: dict[str, Any],
    checkpoint: Optional[str | os.PathLike],
    pretrained: bool,
    progress: bool,
) -> DiffusionRecommender:
    """The frozen base model of a preset (shared in-process; CPU; the caller moves it)."""
    config = _preset_config(preset, extra)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser().resolve()
        cache_key = ("checkpoint", f"{path}:{train_fingerprint(data)}")
        loader: Callable[[], DiffusionRecommender] = lambda: load_checkpoint(path, data, device="cpu")[0]
    elif not pretrained:
        cache_key = ("fresh", model_cache_key(preset.name, config, data))
        loader = lambda: _fresh_model(config, data)
    else:
        cache_key = ("pretrained", model_cache_key(preset.name, config, data))
        loader = lambda: _pretrained_model(preset, config, data, progress)
    with _LOCK:
        if cache_key not in _MODEL_CACHE:
            _MODEL_CACHE[cache_key] = _freeze(loader())
        return _MODEL_CACHE[cache_key]


def clear_caches() -> None:
    """Forget the in-process data and model caches (the disk cache stays)."""
    with _LOCK:
        _DATA_CACHE.clear()
        _MODEL_CACHE.clear()


# ---------------------------------------------------------------------------------- building
@dataclass
class EnvParts:
    """What a front needs: the core, the data (titles for rendering) and the preset."""

    core: DenoisingMDP
    data: InteractionData
    preset: Preset


def _bind_reward(spec: Any, data: InteractionData, device: torch.device) -> RewardTerm:
    from refit_gym.rewards import build_reward

    return build_reward(DEFAULT_REWARD if spec is None else spec, TrainingInteractions.from_data(data), device)


def _bind_shaping(spec: Any, data: InteractionData, device: torch.device) -> Optional[StepShaping]:
    if isinstance(spec, StepShaping):
        return spec.bind(TrainingInteractions.from_data(data), device)
    from refit_gym.rewards import build_shaping

    return build_shaping(spec, TrainingInteractions.from_data(data), device)


def build_env_parts(
    preset: str = "synthetic",
    *,
    batch_size: int = 1,
    data: Optional[InteractionData] = None,
    model: Optional[DiffusionRecommender] = None,
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
        preset: ``"synthetic"`` / ``"ml1m"`` or an env id.
        batch_size: number of users stepped together.
        data: use this :class:`InteractionData` instead of the preset's.
        model: use this base model (built for ``data``) instead of the preset's.
        data_dir: where ``diffrec_ml-1m_clean`` lives (default ``$REFIT_GYM_DATA``); unused by
            the synthetic preset.
        checkpoint: a refit-gym checkpoint directory of the base model.
        pretrained: ``False`` uses a freshly initialised base model (seeded; for tests and
            benchmarks: no pretraining, no cache) when no ``checkpoint`` is given.
        reward: a reward spec for :func:`refit_gym.rewards.build_reward` (mapping, string or a
            ``RewardTerm``); default :data:`DEFAULT_REWARD`.
        shaping: ``None`` (off), a spec for :func:`refit_gym.rewards.build_shaping`, or a
            ``StepShaping``.
        device: ``"cpu"`` (default), ``"cuda"``, ``"auto"``...
        progress: show a progress bar if the base model must be pretrained (default: only for
            ML-1M).
        **kwargs: the chain's parameters (:data:`CHAIN_KWARGS`, see
            :class:`~refit_gym.envs.core.DenoisingMDP`) and the preset's own (synthetic:
            ``n_users``, ``n_items``, ``data_seed``).

    Raises:
        ConfigError: an unknown keyword argument (all are listed in the message) or a value out
            of range.
        DataError: the dataset cannot be found or read.
    """
    spec = preset_for(preset)
    unknown = sorted(set(kwargs) - set(CHAIN_KWARGS) - set(spec.extra_kwargs))
    if unknown:
        known = sorted((*COMMON_KWARGS, *CHAIN_KWARGS, *spec.extra_kwargs, "batch_size"))
        raise ConfigError(f"unknown keyword argument(s) {unknown} for {spec.env_id}; known: {known}")
    extra = {name: kwargs.pop(name) for name in spec.extra_kwargs if name in kwargs}
    for name, value in extra.items():
        low = 0 if name == "data_seed" else 2
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(pretrained, (bool, np.bool_)):
        raise ConfigError(f"pretrained must be a bool, got {pretrained!r}")
    target = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if data is None:
        if model is not None:
            raise ConfigError("model= needs the data it was built for: pass data= too")
        data = _load_data(spec, data_dir, extra)
    elif not isinstance(data, InteractionData):
        raise ConfigError(f"data must be an InteractionData, got {type(data).__name__}")
    if model is None:
        show_progress = spec.name == "ml1m" if progress is None else bool(progress)
        model = base_model(spec, data, extra, checkpoint, bool(pretrained), show_progress)
    elif not isinstance(model, DiffusionRecommender):
        raise ConfigError(f"model must be a DiffusionRecommender, got {type(model).__name__}")
    if model.config.get("n_users") is not None:
        check_data_matches(model.config, data)
    core = DenoisingMDP(
        model,
        _bind_reward(reward, data, target),
        TrainingInteractions.from_data(data),
        batch_size=batch_size,
        shaping=_bind_shaping(shaping, data, target),
        device=target,
        **kwargs,
    )
    return EnvParts(core=core, data=data, preset=spec)


def describe(parts: EnvParts) -> Mapping[str, Any]:
    """A JSON-able description of an env for run records."""
    return {"env_id": parts.preset.env_id, "data": parts.data.summary(), "chain": parts.core.config()}
