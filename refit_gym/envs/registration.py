"""Gymnasium registration of the ReFiT scenarios (idempotent: importing twice never warns; no torch import)."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym

from refit_gym.envs.scenarios import Scenario, add_scenario, shipped_scenarios

ENTRY_POINT = "refit_gym.envs.gym_env:DenoisingEnv"
VECTOR_ENTRY_POINT = "refit_gym.envs.vector_env:DenoisingVectorEnv"


def _register(scenario: Scenario) -> bool:
    if scenario.env_id in gym.registry:
        return False
    gym.register(
        id=scenario.env_id,
        entry_point=ENTRY_POINT,
        vector_entry_point=VECTOR_ENTRY_POINT,
        kwargs={"scenario": scenario.env_id},
        max_episode_steps=None,
    )
    return True


def register_envs() -> list[str]:
    """Register every shipped scenario's id not yet in ``gym.registry``; returns the ids registered now.

    Each id has an ``entry_point`` (single user, :class:`~refit_gym.envs.gym_env.DenoisingEnv`)
    and a ``vector_entry_point`` (native batch, :class:`~refit_gym.envs.vector_env.DenoisingVectorEnv`),
    and ``max_episode_steps=None``: the chain ends by termination, never by truncation.
    """
    return [scenario.env_id for scenario in shipped_scenarios().values() if _register(scenario)]


def register_scenario(path: str | Path) -> str:
    """Register the scenario YAML at ``path`` (your own dataset or base model); returns its env id.

    Example::

        env_id = refit_gym.register_scenario("my_scenario.yaml")   # env: {id: My-Scenario-v0, ...}
        env = gym.make(env_id)
    """
    scenario = add_scenario(path)
    _register(scenario)
    return scenario.env_id


def list_envs() -> list[tuple[str, str]]:
    """``(env id, one-line description)`` of every known ReFiT environment (for ``refit-gym envs``)."""
    return [(scenario.env_id, scenario.description) for scenario in shipped_scenarios().values()]
