"""The TorchRL front: an ``EnvBase`` over the batched core; tensors stay on the env's device."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from refit_gym.envs.core import DenoisingMDP
from refit_gym.envs.factory import EnvParts, build_env_parts
from refit_gym.errors import ConfigError


class DenoisingTorchRLEnv(EnvBase):
    """``num_envs`` denoising chains as a TorchRL environment with ``batch_size=[num_envs]``.

    The MDP, its arguments and rewards are those of :class:`~refit_gym.envs.gym_env.DenoisingEnv`.
    Specs (``N = num_envs``, ``n = state_dim``, ``b = action_bound``, ``k = exposed_steps``):

    | key | spec |
    |---|---|
    | ``action`` | ``Bounded(-b, b, (N, n), float32)`` |
    | ``x_t`` | ``Bounded(-b, b, (N, n), float32)`` |
    | ``t`` | ``Bounded(0, k, (N, 1), int64)``, remaining steps |
    | ``user`` | ``Bounded(0, n_users - 1, (N, 1), int64)`` |
    | conditioning | ``Bounded(low, high, (N, *shape), dtype)`` per tensor of the base model's ``condition_spec()`` |
    | ``("reward_terms", name)`` | ``Unbounded((N,), float32)``: each unweighted reward term at the terminal step (0 before) |
    | ``slate`` (``slate_size=K`` only) | ``Bounded(-1, n_items - 1, (N, K), int64)``: the slate drawn at the terminal step (-1 before) |
    | ``slate_log_prob`` (``slate_size=K`` only) | ``Unbounded((N, 1), float32)``: its exact log-probability (0 before) |
    | ``reward`` | ``Unbounded((N, 1), float32)`` |
    | ``done`` / ``terminated`` / ``truncated`` | ``Categorical(2, (N, 1), bool)``; never truncated |

    ``reset`` honours ``tensordict["_reset"]`` (``(N, 1)`` bools: reset only those rows), which
    is what ``torchrl.collectors.Collector`` sends for finished rows. ``set_seed(s)`` seeds the
    env's numpy generator (one draw per reset, none per step; all other randomness is keyed on
    it, see :mod:`refit_gym.envs.core`).

    Args:
        scenario: an env id or a scenario YAML path.
        num_envs: N.
        device: where every tensor lives (the core computes there too).
        **kwargs: the chain, reward and data arguments of :func:`~refit_gym.envs.factory.build_env_parts`.
    """

    def __init__(self, scenario: str = "ReFiT-Synthetic-v0", num_envs: int = 1, device: Any = "cpu",
                 parts: Optional[EnvParts] = None, **kwargs: Any) -> None:
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ConfigError(f"num_envs must be a positive integer, got {num_envs!r}")
        if parts is None:
            parts = build_env_parts(scenario, batch_size=int(num_envs), device=device, **kwargs)
        elif kwargs or parts.core.batch_size != num_envs:
            raise ConfigError("with prebuilt parts, num_envs must equal the core's batch size and no env kwargs are accepted")
        super().__init__(device=parts.core.device, batch_size=torch.Size([int(num_envs)]))
        self.core, self.data, self.scenario = parts.core, parts.data, parts.scenario
        self.num_envs = int(num_envs)
        self.rng = np.random.default_rng()
        """The generator the episode seeds are drawn from (``set_seed`` replaces it)."""
        self.reset_users: Optional[np.ndarray] = None
        """User ids (one per row) of the next full reset; None draws them."""
        self._term_names = self._reward_term_names()
        self._make_specs()

    @classmethod
    def from_core(cls, core: DenoisingMDP, data=None) -> "DenoisingTorchRLEnv":
        """A TorchRL env over an existing core (e.g. the one an agent's trainer built)."""
        return cls(num_envs=core.batch_size, parts=EnvParts(core=core, data=data))

    @property
    def base_model(self):
        """The frozen base model (copy it to fine-tune it)."""
        return self.core.model

    def _reward_term_names(self) -> list[str]:
        reward = self.core.reward
        names = list(reward.terms) if hasattr(reward, "terms") else [getattr(reward, "name", "reward")]
        if self.core.shaping is not None:
            names.append("shaping")
        return names

    def _make_specs(self) -> None:
        n, bound, shape = self.core.state_dim, self.core.action_bound, (self.num_envs,)
        batch = torch.Size(shape)
        terms = Composite(
            {name: Unbounded(shape=batch, dtype=torch.float32, device=self.device) for name in self._term_names},
            shape=batch,
            device=self.device,
        )
        entries = {
            "x_t": Bounded(-bound, bound, shape=(*shape, n), dtype=torch.float32, device=self.device),
            "t": Bounded(0, self.core.exposed_steps, shape=(*shape, 1), dtype=torch.int64, device=self.device),
            "user": Bounded(0, self.core.n_users - 1, shape=(*shape, 1), dtype=torch.int64, device=self.device),
            "reward_terms": terms,
        }
        if self.core.slate_size is not None:
            entries["slate"] = Bounded(-1, self.core.n_items - 1, shape=(*shape, self.core.slate_size),
                                       dtype=torch.int64, device=self.device)
            entries["slate_log_prob"] = Unbounded(shape=(*shape, 1), dtype=torch.float32, device=self.device)
        for name, spec in sorted(self.core.context_spec.items()):
            entries[name] = Bounded(spec.low, spec.high, shape=(*shape, *spec.shape), dtype=spec.dtype,
                                    device=self.device)
        self.observation_spec = Composite(entries, shape=batch, device=self.device)
        self.action_spec = Bounded(-bound, bound, shape=(*shape, n), dtype=torch.float32, device=self.device)
        self.reward_spec = Unbounded(shape=(*shape, 1), dtype=torch.float32, device=self.device)
        flag = lambda: Categorical(2, shape=(*shape, 1), dtype=torch.bool, device=self.device)  # noqa: E731
        self.done_spec = Composite(done=flag(), terminated=flag(), truncated=flag(), shape=batch, device=self.device)

    def _output(self, observation: dict[str, torch.Tensor], terms: dict[str, torch.Tensor],
                slates: Optional[torch.Tensor] = None, slate_log_prob: Optional[torch.Tensor] = None) -> dict[str, Any]:
        done = torch.from_numpy(self.core.t == 0).to(self.device).unsqueeze(1)
        zeros = torch.zeros(self.num_envs, device=self.device)
        out = {name: value.clone() for name, value in observation.items()}
        out["reward_terms"] = TensorDict(
            {name: terms.get(name, zeros).clone() for name in self._term_names},
            batch_size=self.batch_size,
            device=self.device,
        )
        out["done"], out["terminated"], out["truncated"] = done, done.clone(), torch.zeros_like(done)
        if self.core.slate_size is not None:
            if slates is None:  # a reset: no slate yet
                slates, slate_log_prob = self.core.empty_slates()
            out["slate"], out["slate_log_prob"] = slates.clone(), slate_log_prob.unsqueeze(1).clone()
        return out

    def _reset(self, tensordict: Optional[TensorDictBase] = None, **kwargs: Any) -> TensorDictBase:
        mask = None
        if tensordict is not None and "_reset" in tensordict.keys():
            mask = tensordict.get("_reset").reshape(-1).to("cpu").numpy()
        users = self.reset_users if mask is None or bool(np.all(mask)) else None
        observation = self.core.reset(self.rng, users=users, mask=mask)
        return TensorDict(self._output(observation, {}), batch_size=self.batch_size, device=self.device)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        result = self.core.step(tensordict.get("action"))
        out = self._output(result.observation, result.components, result.slates, result.slate_log_prob)
        out["reward"] = result.reward.unsqueeze(1)
        return TensorDict(out, batch_size=self.batch_size, device=self.device)

    def _set_seed(self, seed: Optional[int]) -> None:
        self.rng = np.random.default_rng(seed)


def make_torchrl_env(env_id: str, num_envs: int = 1, device: Any = "cpu", **kwargs: Any) -> DenoisingTorchRLEnv:
    """The TorchRL env of a registered id (``"ReFiT-ML1M-v0"`` or ``"refit_gym:ReFiT-ML1M-v0"``).

    Accepts the same keyword arguments as ``gym.make(env_id, ...)``.
    """
    return DenoisingTorchRLEnv(env_id, num_envs=num_envs, device=device, **kwargs)
