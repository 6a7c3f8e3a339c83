"""Gymnasium spaces and numpy conversion shared by the numpy fronts (single, vector, SB3)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from gymnasium import spaces

from refit_gym.envs.core import DenoisingMDP


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def single_observation_space(core: DenoisingMDP) -> spaces.Dict:
    """``Dict(x_t, t, user, *context)`` of one row.

    ``x_t``: ``Box(-b, b, (state_dim,), float32)`` with ``b = action_bound`` (the state is kept
    in the action's range); ``t``: ``Box(0, k, (1,), int64)``, the remaining steps;
    ``user``: ``Box(0, n_users - 1, (1,), int64)``; each conditioning tensor of the base model
    (none for DiffRec): a Box of its per-row shape, dtype and bounds
    (:meth:`~refit_gym.models.BaseModel.condition_spec`).
    """
    bound = np.float32(core.action_bound)
    entries: dict[str, spaces.Space] = {
        "x_t": spaces.Box(-bound, bound, (core.state_dim,), np.float32),
        "t": spaces.Box(0, core.exposed_steps, (1,), np.int64),
        "user": spaces.Box(0, core.n_users - 1, (1,), np.int64),
    }
    for name, spec in sorted(core.context_spec.items()):
        np_dtype = _numpy_dtype(spec.dtype)
        entries[name] = spaces.Box(np_dtype.type(spec.low), np_dtype.type(spec.high), spec.shape, np_dtype)
    return spaces.Dict(entries)


def single_action_space(core: DenoisingMDP) -> spaces.Box:
    """``Box(-action_bound, action_bound, (state_dim,), float32)``."""
    bound = np.float32(core.action_bound)
    return spaces.Box(-bound, bound, (core.state_dim,), np.float32)


def observation_to_numpy(observation: dict[str, torch.Tensor], row: Optional[int] = None) -> dict[str, np.ndarray]:
    """Fresh numpy copies of an observation (of one ``row``, without the batch dim, when given)."""
    out = {}
    for name, value in observation.items():
        value = value.detach()
        if row is not None:
            value = value[row]
        out[name] = value.cpu().numpy().copy()
    return out


def split_observation(observation: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """An object array of per-row observation dicts (``None`` outside ``rows``), as gymnasium's ``final_obs``."""
    batch = len(next(iter(observation.values())))
    per_row = np.full(batch, None, dtype=object)
    for row in rows:
        per_row[row] = {name: value[row].copy() for name, value in observation.items()}
    return per_row


def options_value(options: Optional[dict[str, Any]], allowed: tuple[str, ...]) -> dict[str, Any]:
    """``options`` checked against the allowed keys (``None`` -> ``{}``)."""
    from refit_gym.errors import ConfigError

    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ConfigError(f"reset options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown reset option(s) {unknown}; known: {list(allowed)}")
    return options
