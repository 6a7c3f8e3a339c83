"""The denoising MDP (one torch core) and its fronts: Gymnasium, vector, TorchRL, Stable-Baselines3.

Importing this package is light (no torch): the classes are imported on first use.

=========================  ============================================================
name                       what
=========================  ============================================================
``DenoisingMDP``           the batched torch core (``refit_gym.envs.core``)
``DenoisingEnv``           single-user ``gymnasium.Env`` (``gym.make(id)``)
``DenoisingVectorEnv``     native ``gymnasium.vector.VectorEnv`` (``gym.make_vec(id, N)``)
``DenoisingTorchRLEnv``    TorchRL ``EnvBase`` (:func:`make_torchrl_env`)
``make_sb3_vec_env``       Stable-Baselines3 ``VecEnv`` adapter (extra ``refit-gym[sb3]``)
``build_env_parts``        the one factory every front uses
``register_envs``          register the shipped scenarios' ids (idempotent; called by ``import refit_gym``)
``register_scenario``      register a scenario YAML of your own (dataset, base model, reward)
``list_envs``              ``[(env id, description)]``
=========================  ============================================================
"""

from __future__ import annotations

import importlib
from typing import Any

from refit_gym.envs.registration import list_envs, register_envs, register_scenario

_LAZY = {
    "DenoisingMDP": "refit_gym.envs.core",
    "StepResult": "refit_gym.envs.core",
    "DenoisingEnv": "refit_gym.envs.gym_env",
    "DenoisingVectorEnv": "refit_gym.envs.vector_env",
    "DenoisingTorchRLEnv": "refit_gym.envs.torchrl_env",
    "build_env_parts": "refit_gym.envs.factory",
    "EnvParts": "refit_gym.envs.factory",
    "DenoiserPolicy": "refit_gym.envs.policies",
    "denoiser_action": "refit_gym.envs.policies",
}


def make_torchrl_env(env_id: str, num_envs: int = 1, device: Any = "cpu", **kwargs: Any):
    """A :class:`~refit_gym.envs.torchrl_env.DenoisingTorchRLEnv` of a registered id (``batch_size=[num_envs]``)."""
    from refit_gym.envs.torchrl_env import make_torchrl_env as make

    return make(env_id, num_envs=num_envs, device=device, **kwargs)


def make_sb3_vec_env(env_id: str, num_envs: int = 1, **kwargs: Any):
    """A Stable-Baselines3 ``VecEnv`` over the batched core (needs ``pip install 'refit-gym[sb3]'``)."""
    from refit_gym.envs.sb3_vec_env import make_sb3_vec_env as make

    return make(env_id, num_envs=num_envs, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'refit_gym.envs' has no attribute {name!r}")


__all__ = ["list_envs", "make_sb3_vec_env", "make_torchrl_env", "register_envs", "register_scenario", *_LAZY]
