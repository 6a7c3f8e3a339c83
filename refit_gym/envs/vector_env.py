"""The native batched Gymnasium front: ``gym.make_vec("ReFiT-ML1M-v0", num_envs=N)``."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from refit_gym.envs.core import DenoisingMDP
from refit_gym.envs.factory import EnvParts, build_env_parts
from refit_gym.envs.rendering import render_rows
from refit_gym.envs.spaces import (
    observation_to_numpy,
    options_value,
    single_action_space,
    single_observation_space,
    split_observation,
)
from refit_gym.errors import ConfigError


def _autoreset_mode(value: Any) -> AutoresetMode:
    if isinstance(value, AutoresetMode):
        return value
    for mode in AutoresetMode:
        if value in (mode.value, mode.name):
            return mode
    raise ConfigError(
        f"autoreset_mode must be an AutoresetMode or one of {[m.value for m in AutoresetMode]}, got {value!r}"
    )


class DenoisingVectorEnv(VectorEnv):
    """``num_envs`` users' denoising chains stepped as one batch (see :class:`~refit_gym.envs.gym_env.DenoisingEnv`
    for the MDP, its spaces, rewards and arguments).

    Observations are the single env's ``Dict`` batched (``x_t``: ``(N, state_dim)``, ``t`` and
    ``user``: ``(N, 1)``), returned as fresh numpy arrays; actions are ``(N, state_dim)`` floats.
    ``info`` is a dict of arrays with ``_key`` masks; at the terminal step
    ``info["reward_terms"][name]`` holds each reward term (mask ``info["reward_terms"]["_" + name]``)
    and, with ``slate_size=K``, ``info["slate"]`` ``(N, K)`` int64 and ``info["slate_log_prob"]``
    ``(N,)`` float32 the rows' slates (masks ``"_slate"``, ``"_slate_log_prob"``: the rows that ended).

    Autoreset modes (``autoreset_mode=``):

    | mode | behaviour |
    |---|---|
    | ``DISABLED`` (default) | every episode is exactly ``k`` steps; call ``reset()`` (or ``reset(options={"reset_mask": m})`` for the rows in ``m``) after the last one; stepping an ended row raises ``EpisodeStateError`` |
    | ``NEXT_STEP`` | an ended row is reset by the *next* ``step`` (its action ignored, reward 0): one step in ``k + 1`` is wasted |
    | ``SAME_STEP`` | an ended row is reset in the same ``step``; its terminal observation is in ``info["final_obs"]`` (mask ``"_final_obs"``), its info in ``info["final_info"]`` (the Stable-Baselines3 adapter uses this mode) |

    Reset options: ``"reset_mask"`` (``(N,)`` bools: reset only these rows), ``"users"``
    (user ids of the reset rows). Seeding: ``reset(seed=s)`` seeds ``np_random``; one integer
    is drawn from it per reset and nothing per step, so row 0 with seed ``s`` equals the single
    env with seed ``s`` for the same actions (CPU).

    Args:
        scenario: the env id or scenario YAML (set by the registration).
        num_envs: N, users per batch.
        autoreset_mode: see above.
        max_episode_steps: accepted for ``gym.make_vec``; ``None`` or at least ``k`` (the
            chain always terminates after ``k`` steps; it never truncates).
        render_mode: ``None`` or ``"ansi"``.
        render_top_k: items per row in ``render()``.
        **kwargs: the chain, reward and data arguments of :func:`~refit_gym.envs.factory.build_env_parts`.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4, "autoreset_mode": AutoresetMode.DISABLED}

    def __init__(
        self,
        scenario: str = "ReFiT-Synthetic-v0",
        num_envs: int = 1,
        autoreset_mode: AutoresetMode | str = AutoresetMode.DISABLED,
        max_episode_steps: Optional[int] = None,
        render_mode: Optional[str] = None,
        render_top_k: int = 10,
        parts: Optional[EnvParts] = None,
        **kwargs: Any,
    ) -> None:
        mode = _autoreset_mode(autoreset_mode)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            modes = self.metadata["render_modes"]
            raise ConfigError(f"render_mode must be None or one of {modes}, got {render_mode!r}")
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ConfigError(f"num_envs must be a positive integer, got {num_envs!r}")
        if parts is None:
            parts = build_env_parts(scenario, batch_size=int(num_envs), **kwargs)
        elif kwargs or parts.core.batch_size != num_envs:
            raise ConfigError("with prebuilt parts, num_envs must equal the core's batch size and no env kwargs are accepted")
        self.core, self.data, self.scenario, self.parts = parts.core, parts.data, parts.scenario, parts
        if max_episode_steps is not None and (
            isinstance(max_episode_steps, bool)
            or not isinstance(max_episode_steps, (int, np.integer))
            or max_episode_steps < self.core.exposed_steps
        ):
            raise ConfigError(
                f"max_episode_steps must be None or >= the chain's {self.core.exposed_steps} steps "
                f"(episodes terminate, they are never truncated), got {max_episode_steps!r}"
            )
        self.num_envs = int(num_envs)
        self.autoreset_mode = mode
        self.metadata = {**type(self).metadata, "autoreset_mode": mode}
        self.render_mode = render_mode
        self.render_top_k = render_top_k
        self.single_observation_space = single_observation_space(self.core)
        self.single_action_space = single_action_space(self.core)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._pending_reset = np.zeros(self.num_envs, dtype=bool)  # NEXT_STEP: rows to reset next step

    @classmethod
    def from_core(cls, core: DenoisingMDP, data=None, autoreset_mode: AutoresetMode | str = AutoresetMode.DISABLED,
                  **front_kwargs: Any) -> "DenoisingVectorEnv":
        """A vector env over an existing core (e.g. the one an agent's trainer built); ``num_envs``
        is the core's batch size. ``data`` (optional) gives ``render()`` its item titles."""
        parts = EnvParts(core=core, data=data)
        return cls(num_envs=core.batch_size, autoreset_mode=autoreset_mode, parts=parts, **front_kwargs)

    @property
    def base_model(self):
        """The frozen base model (copy it to fine-tune it)."""
        return self.core.model

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict[str, Any]] = None):
        super().reset(seed=seed)
        options = options_value(options, ("reset_mask", "users"))
        mask = options.get("reset_mask")
        observation = self.core.reset(self.np_random, users=options.get("users"), mask=mask)
        if mask is None:
            self._pending_reset[:] = False
        else:
            self._pending_reset = self._pending_reset & ~np.asarray(mask, dtype=bool).reshape(-1)
        return observation_to_numpy(observation), {}

    def step(self, actions):
        active = None
        if self.autoreset_mode == AutoresetMode.NEXT_STEP and self._pending_reset.any():
            self.core.reset(self.np_random, mask=self._pending_reset)
            active = ~self._pending_reset
        result = self.core.step(actions, active=active)
        terminated = result.terminated.copy()
        truncated = np.zeros(self.num_envs, dtype=bool)
        rewards = result.reward.detach().cpu().numpy().astype(np.float32)
        info = self._step_info(result)
        observation = observation_to_numpy(result.observation)
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            self._pending_reset = terminated.copy()
        elif self.autoreset_mode == AutoresetMode.SAME_STEP and terminated.any():
            rows = np.flatnonzero(terminated)
            info["final_obs"] = split_observation(observation, rows)
            info["_final_obs"] = terminated.copy()
            info["final_info"] = {
                key: (value.copy() if isinstance(value, np.ndarray) else value)
                for key, value in info.items()
                if key not in ("final_obs", "_final_obs")
            }
            info["_final_info"] = terminated.copy()
            observation = observation_to_numpy(self.core.reset(self.np_random, mask=terminated))
        return observation, rewards, terminated, truncated, info

    def _step_info(self, result) -> dict[str, Any]:
        info = self._reward_info(result)
        if result.slates is not None and result.terminated.any():
            info["slate"] = result.slates.detach().cpu().numpy().astype(np.int64)
            info["_slate"] = result.terminated.copy()
            info["slate_log_prob"] = result.slate_log_prob.detach().cpu().numpy().astype(np.float32)
            info["_slate_log_prob"] = result.terminated.copy()
        return info

    def _reward_info(self, result) -> dict[str, Any]:
        if not result.components:
            return {}
        terms: dict[str, np.ndarray] = {}
        stepped = result.stepped if result.stepped is not None else np.ones(self.num_envs, dtype=bool)
        for name, value in result.components.items():
            terms[name] = value.detach().cpu().numpy().astype(np.float32)
            terms[f"_{name}"] = (stepped if name == "shaping" else result.terminated).copy()
        present = np.zeros(self.num_envs, dtype=bool)
        for name in result.components:
            present |= terms[f"_{name}"]
        if not present.any():
            return {}
        return {"reward_terms": terms, "_reward_terms": present}

    def render(self) -> Optional[tuple[str, ...]]:
        if self.render_mode is None:
            return None
        if not self.core.ready:
            return tuple(f"{self.parts.name}: not reset yet\n" for _ in range(self.num_envs))
        rows = range(self.num_envs)
        return tuple(render_rows(self.core, rows, self.parts.item_titles, self.render_top_k, self.parts.name))
