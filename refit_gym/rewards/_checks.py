"""Argument checks shared by the reward terms; every failure is a :class:`ConfigError`."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from refit_gym.errors import ConfigError, DataError


def check_temperature(value: float, what: str = "temperature") -> float:
    """``value`` as a float if it is finite and ``> 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{what} must be a positive number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ConfigError(f"{what} must be finite and > 0, got {value!r}")
    return value


def check_int_in_range(value: int, what: str, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int if ``low <= value <= high`` (``high=None``: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{what} must be an int, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{what} must be in {bound}, got {value}")
    return value


def check_weight(value: float, name: str, allow_negative: bool = False) -> float:
    """A term weight as a float: finite, and ``>= 0`` unless ``allow_negative``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"the weight of reward term {name!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"the weight of reward term {name!r} must be finite, got {value!r}")
    if value < 0.0 and not allow_negative:
        raise ConfigError(
            f"the weight of reward term {name!r} is {value}; weights must be >= 0 "
            f"(pass allow_negative=True to penalise a term on purpose)"
        )
    return value


def check_choice(value: str, choices: Sequence[str], what: str) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def check_batch(scores: torch.Tensor, episode, n_items: int | None = None) -> None:
    """Raise :class:`DataError` unless ``scores`` is a floating ``(B, n_items)`` tensor matching ``episode``."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or not scores.is_floating_point():
        raise DataError(
            "scores must be a floating-point tensor of shape (B, n_items), got "
            + (f"{tuple(scores.shape)} {scores.dtype}" if isinstance(scores, torch.Tensor) else type(scores).__name__)
        )
    expected = (episode.batch_size, scores.shape[1] if n_items is None else n_items)
    if tuple(scores.shape) != expected:
        raise DataError(f"scores have shape {tuple(scores.shape)}; the episode batch expects {expected}")
    for field_name in ("visible", "held_out"):
        shape = tuple(getattr(episode, field_name).shape)
        if shape != expected:
            raise DataError(f"episode.{field_name} has shape {shape}; the scores have {expected}")
