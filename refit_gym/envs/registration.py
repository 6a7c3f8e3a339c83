"""Gymnasium registration of the ReFiT environments (idempotent: importing twice never warns)."""

from __future__ import annotations

import gymnasium as gym

from refit_gym.envs.presets import PRESETS

ENTRY_POINT = "refit_gym.envs.gym_env:DenoisingEnv"
VECTOR_ENTRY_POINT = "refit_gym.envs.vector_env:DenoisingVectorEnv"


def register_envs() -> list[str]:
    """Register every ReFiT env id not yet in ``gym.registry``; returns the ids registered now.

    Each id has an ``entry_point`` (single user, :class:`~refit_gym.envs.gym_env.DenoisingEnv`)
    and a ``vector_entry_point`` (native batch, :class:`~refit_gym.envs.vector_env.DenoisingVectorEnv`),
    and ``max_episode_steps=None``: the chain ends by termination, never by truncation.
    """
    registered = []
    for preset in PRESETS.values():
        if preset.env_id in gym.registry:
            continue
        gym.register(
            id=preset.env_id,
            entry_point=ENTRY_POINT,
            vector_entry_point=VECTOR_ENTRY_POINT,
            kwargs={"preset": preset.name},
            max_episode_steps=None,
        )
        registered.append(preset.env_id)
    return registered


def list_envs() -> list[tuple[str, str]]:
    """``(env id, one-line description)`` of every ReFiT environment (for ``refit-gym envs``)."""
    return [(preset.env_id, preset.description) for preset in PRESETS.values()]
