"""A Stable-Baselines3 ``VecEnv`` over the batched core (optional extra ``refit-gym[sb3]``).

SB3 cannot train on a ``gymnasium.vector.VectorEnv``; this adapter gives it the native batched
env in SB3's own semantics: an ended row is reset in the same step, its terminal observation is
in ``infos[i]["terminal_observation"]`` and ``dones = terminated | truncated``. Stable-Baselines3
is imported only when an adapter is made.

Notes for SB3 users: use ``MultiInputPolicy`` (the observation is a ``Dict``), ``gamma=1`` and
``gae_lambda=1`` (the reward is terminal and undiscounted), and remember that SB3's Gaussian
head *sums* the log-probability over all ``n_items`` action dimensions.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from gymnasium.vector import AutoresetMode

from refit_gym.envs.vector_env import DenoisingVectorEnv
from refit_gym.errors import ConfigError

_ADAPTER: Optional[type] = None


def _require_sb3():
    try:
        from stable_baselines3.common.vec_env import VecEnv
    except ImportError as error:
        raise ImportError(
            "the Stable-Baselines3 adapter needs stable-baselines3: pip install 'refit-gym[sb3]'"
        ) from error
    return VecEnv


def _adapter_class() -> type:
    """Define the adapter class on first use (it subclasses SB3's ``VecEnv``)."""
    global _ADAPTER
    if _ADAPTER is not None:
        return _ADAPTER
    VecEnv = _require_sb3()

    class DenoisingSB3VecEnv(VecEnv):
        """SB3 ``VecEnv`` over a :class:`~refit_gym.envs.vector_env.DenoisingVectorEnv` in ``SAME_STEP`` mode.

        ``seed(s)`` seeds the next reset of the whole batch with ``s`` (SB3 computes ``s + i``
        per env; the batch uses the first). ``infos[i]["reward_terms"]`` holds the unweighted
        reward terms on the step a row ends, and, with ``slate_size`` on, ``infos[i]["slate"]``
        (int64 ``(K,)``) and ``infos[i]["slate_log_prob"]`` (float) its slate.
        """

        def __init__(self, venv: DenoisingVectorEnv) -> None:
            if venv.autoreset_mode != AutoresetMode.SAME_STEP:
                raise ConfigError("the SB3 adapter needs a vector env in SAME_STEP autoreset mode")
            self.venv = venv
            self._actions: Optional[np.ndarray] = None
            super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)

        @property
        def core(self):
            return self.venv.core

        def reset(self):
            if any(self._options):
                raise ConfigError("per-env reset options are not supported by the batched SB3 adapter")
            observation, _ = self.venv.reset(seed=self._seeds[0])
            self._reset_seeds()
            self._reset_options()
            self.reset_infos = [{} for _ in range(self.num_envs)]
            return observation

        def step_async(self, actions: np.ndarray) -> None:
            self._actions = actions

        def step_wait(self):
            observation, rewards, terminated, truncated, info = self.venv.step(self._actions)
            dones = terminated | truncated
            infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
            terms = info.get("reward_terms", {})
            names = [name for name in terms if not name.startswith("_")]
            for row in np.flatnonzero(dones):  # SB3 wants one dict per env
                infos[row]["terminal_observation"] = info["final_obs"][row]
                infos[row]["TimeLimit.truncated"] = bool(truncated[row] and not terminated[row])
                infos[row]["reward_terms"] = {name: float(terms[name][row]) for name in names if terms[f"_{name}"][row]}
                if "slate" in info and info["_slate"][row]:
                    infos[row]["slate"] = info["slate"][row].copy()
                    infos[row]["slate_log_prob"] = float(info["slate_log_prob"][row])
            return observation, rewards, dones, infos

        def close(self) -> None:
            self.venv.close()

        def get_attr(self, attr_name: str, indices=None) -> list[Any]:
            return [getattr(self.venv, attr_name)] * len(list(self._get_indices(indices)))

        def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
            setattr(self.venv, attr_name, value)

        def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
            result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
            return [result] * len(list(self._get_indices(indices)))

        def env_is_wrapped(self, wrapper_class: type, indices=None) -> list[bool]:
            return [False] * len(list(self._get_indices(indices)))

        def get_images(self) -> Sequence[Optional[np.ndarray]]:
            return [None] * self.num_envs

    _ADAPTER = DenoisingSB3VecEnv
    return _ADAPTER


def sb3_vec_env_over(venv: DenoisingVectorEnv):
    """The SB3 ``VecEnv`` adapter over an existing vector env in ``SAME_STEP`` mode."""
    if venv.autoreset_mode != AutoresetMode.SAME_STEP:
        raise ConfigError("the SB3 adapter needs a vector env in SAME_STEP autoreset mode (SB3's own semantics)")
    return _adapter_class()(venv)


def make_sb3_vec_env(env_id: str, num_envs: int = 1, **kwargs: Any):
    """A Stable-Baselines3 ``VecEnv`` of ``num_envs`` users over the batched core.

    Args:
        env_id: a registered id (``"ReFiT-Synthetic-v0"``, ``"refit_gym:ReFiT-ML1M-v0"``).
        num_envs: users per batch.
        **kwargs: the same keyword arguments as ``gym.make(env_id, ...)``.

    Raises:
        ImportError: stable-baselines3 is not installed (``pip install 'refit-gym[sb3]'``).
    """
    adapter = _adapter_class()
    if "autoreset_mode" in kwargs:
        raise ConfigError("the SB3 adapter always uses SAME_STEP autoreset (SB3's own semantics)")
    venv = DenoisingVectorEnv(
        env_id, num_envs=num_envs, autoreset_mode=AutoresetMode.SAME_STEP, **kwargs
    )
    return adapter(venv)
