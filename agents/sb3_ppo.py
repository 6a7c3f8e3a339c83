"""``sb3-ppo`` (optional extra ``refit-gym[sb3]``): Stable-Baselines3 PPO over the pretrained denoiser.

What is SB3's and what is ours:

* **env** — the library's SB3 adapter (:mod:`refit_gym.envs.sb3_vec_env`, SB3 ``VecEnv``
  semantics, ``SAME_STEP`` autoreset) over a :class:`~refit_gym.envs.vector_env.DenoisingVectorEnv`
  over the agent's *own* core (``n_envs = core.batch_size = users_per_batch * K``; the K
  rollouts of a user are K envs), built with ``DenoisingVectorEnv.from_core``.
* **users** — the adapter draws users itself when it resets, and SB3's ``learn`` never resets
  with options. Each :meth:`SB3PPOAgent.update` therefore resets the shared core itself with the
  batch's users (``np.repeat(users, K)``, the trainer's ``rng``), runs the untrained prefix of
  the exposed steps with the policy's mean action (``trained_steps``, as every agent does) and
  hands SB3 that observation as ``model._last_obs`` with ``_last_episode_starts = True``; with
  ``reset_num_timesteps=False`` SB3 starts its rollout there instead of calling ``env.reset()``.
  The adapter's own same-step reset at the end of the episode (users it draws itself) is
  discarded by the next update.
* **policy** — ``RefitActorCriticPolicy``, a ``MultiInputActorCriticPolicy`` whose actor mean
  is ``policy.loc`` on the dict observation (the *shared* ``policy.model``, so the trainer's
  evaluation sees the training), ``action_net = nn.Identity()``, ``ortho_init=False``, whose
  log-std *is* ``policy.log_std`` (fixed, learned or scheduled, initialised from
  ``log_std_init``), and whose critic is SB3's ``value_net`` on a one-hot of the remaining steps
  ``t`` (a per-step constant, zero-initialised). The optimiser is rebuilt after the nets are
  replaced and becomes the agent's ``optimizer``; the value head is registered on the policy as
  ``sb3_value_net`` so the trainer's saved state (policy + optimiser) carries it and ``resume``
  continues exactly.
* **per-user baseline** — ours, as an SB3 ``VecEnvWrapper`` (like ``VecNormalize``): each row's
  reward minus the mean of its user's K rows (``GroupCentredReward``). SB3's advantage is then
  ``R - mean_user(R) - V(t)``, normalised per minibatch. Without it the critic sees only ``t``
  and the advantage is dominated by how easy each user is (measured on the tiny env: correlation
  0.2-0.7 with the within-user signal), and the reward did not improve at lr 3e-3 or 1e-3
  (numbers in ``tests/test_agents_external.py``).
* **algorithm** — SB3's: GAE with ``gamma = gae_lambda = 1``, clipped surrogate, value loss
  (``vf_coef = 0.5``), no entropy bonus, ``n_epochs = inner_epochs``, 4 minibatches, gradient
  clipping at ``max_grad_norm`` (done in an optimiser pre-step hook, to log the norm). One
  :meth:`SB3PPOAgent.update` = ``model.learn(n_steps * n_envs, reset_num_timesteps=False)`` with
  ``n_steps`` = the trained steps (one episode per env). No anchor to the pretrained model (SB3's
  loss has no hook for it). The diagnostics are SB3's logged ``train/*`` values (prefix dropped)
  plus ``grad_norm`` and the shared reward / held-out-mass diagnostics of the episodes.

**Log-prob convention.** SB3's ``DiagGaussianDistribution`` *sums* the log-density over all
``n_items`` action dims, with the consequences described in :mod:`agents.torchrl_ppo` (ratios
very sensitive to the mean, clip fraction near 1 at ordinary learning rates). With
``finetune.log_prob_reduction = "mean"`` (the default) the policy uses :class:`PerDimDiagGaussian`
(log-prob and entropy divided by ``n_items``, DDPO's convention); ``"sum"`` keeps SB3's own.

Randomness: SB3 samples actions from torch's global RNG and shuffles minibatches with numpy's
global RNG; each update seeds both from the trainer's generator and restores them afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from agents.base import Agent
from agents.config import FinetuneConfig
from agents.policy import STATE_KEYS, DenoisingPolicy
from refit_gym.envs.core import DenoisingMDP
from refit_gym.errors import ConfigError

MINIBATCHES = 4
EXTRA = "refit-gym[sb3]"


class MissingExtraError(ConfigError, ImportError):
    """stable-baselines3 is not installed (both a ``ConfigError`` and an ``ImportError``)."""


def _require_sb3():
    try:
        import stable_baselines3  # noqa: F401
    except ImportError as error:
        raise MissingExtraError(
            f"agent 'sb3-ppo' needs stable-baselines3: pip install '{EXTRA}' (or choose another agent, e.g. 'ppo')"
        ) from error


def sb3_vec_env_over(core: DenoisingMDP):
    """The library's SB3 ``VecEnv`` adapter over ``core`` (a ``SAME_STEP`` vector env on the same core)."""
    from gymnasium.vector import AutoresetMode

    from refit_gym.envs import sb3_vec_env
    from refit_gym.envs.vector_env import DenoisingVectorEnv

    return sb3_vec_env.sb3_vec_env_over(DenoisingVectorEnv.from_core(core, autoreset_mode=AutoresetMode.SAME_STEP))


_CLASSES: Optional[dict[str, type]] = None


def _classes() -> dict[str, type]:
    """The SB3 subclasses, defined on first use (stable-baselines3 is an optional extra)."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    _require_sb3()
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.distributions import DiagGaussianDistribution
    from stable_baselines3.common.policies import MultiInputActorCriticPolicy
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
    from stable_baselines3.common.vec_env import VecEnvWrapper

    class GroupCentredReward(VecEnvWrapper):
        """Rows come in groups of K (one user's K rollouts, stepped in lockstep): each row's reward
        minus its group's mean reward at the same step (the per-user baseline, GRPO-style, as a
        reward wrapper like SB3's ``VecNormalize``). The raw rewards are kept in :attr:`raw`."""

        def __init__(self, venv, group_size: int) -> None:
            super().__init__(venv)
            self.group_size = group_size
            self.raw: list[np.ndarray] = []

        def reset(self):
            return self.venv.reset()

        def step_wait(self):
            observation, rewards, dones, infos = self.venv.step_wait()
            self.raw.append(np.asarray(rewards, dtype=np.float32).copy())
            if self.group_size > 1:
                grouped = np.asarray(rewards, dtype=np.float32).reshape(-1, self.group_size)
                rewards = (grouped - grouped.mean(axis=1, keepdims=True)).reshape(-1)
            return observation, rewards, dones, infos

    class PerDimDiagGaussian(DiagGaussianDistribution):
        """SB3's diagonal Gaussian with log-prob and entropy averaged over the action dims."""

        def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
            return super().log_prob(actions) / self.action_dim

        def entropy(self) -> torch.Tensor:
            return super().entropy() / self.action_dim

    class DictPassthrough(BaseFeaturesExtractor):
        """Hands the (preprocessed) dict observation on unchanged: the denoiser needs ``x_t`` and ``t``."""

        def __init__(self, observation_space) -> None:
            super().__init__(observation_space, features_dim=1)

        def forward(self, observations: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return observations

    class DenoiserExtractor(nn.Module):
        """SB3's ``mlp_extractor``: actor latent = ``policy.loc(x_t, t)`` (``state_dim``), critic latent =
        one-hot of the remaining steps ``t`` (``k + 1``). SB3 hands every observation over as
        floats: integer conditioning (a sequential model's item ids) is cast back to its space's dtype."""

        def __init__(self, policy: DenoisingPolicy, state_dim: int, max_t: int, observation_space=None) -> None:
            super().__init__()
            self.refit = policy
            self.latent_dim_pi, self.latent_dim_vf, self.max_t = state_dim, max_t + 1, max_t
            spaces = {} if observation_space is None else observation_space.spaces
            self.integer_keys = {k for k, space in spaces.items()
                                 if k not in STATE_KEYS and np.issubdtype(space.dtype, np.integer)}

        def forward_actor(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
            context = {k: v.round().long() if k in self.integer_keys else v
                       for k, v in obs.items() if k not in STATE_KEYS}
            return self.refit.loc(obs["x_t"], obs["t"], **context)

        def forward_critic(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
            t = obs["t"].reshape(-1).round().long().clamp(0, self.max_t)
            return nn.functional.one_hot(t, self.latent_dim_vf).to(obs["x_t"].dtype)

        def forward(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            return self.forward_actor(obs), self.forward_critic(obs)

    class RefitActorCriticPolicy(MultiInputActorCriticPolicy):
        """SB3 actor-critic whose actor is the shared pretrained denoiser (see the module docstring)."""

        def __init__(self, observation_space, action_space, lr_schedule, *, refit_policy: DenoisingPolicy,
                     log_prob_reduction: str = "sum", **kwargs: Any) -> None:
            self._refit_holder = [refit_policy]  # set before nn.Module.__init__: a plain list attribute
            self._reduction = log_prob_reduction
            kwargs.update(ortho_init=False, features_extractor_class=DictPassthrough, share_features_extractor=True)
            super().__init__(observation_space, action_space, lr_schedule, **kwargs)

        def _build_mlp_extractor(self) -> None:
            t_space = self.observation_space["t"]
            self.mlp_extractor = DenoiserExtractor(self._refit_holder[0], int(self.action_space.shape[0]),
                                                   int(np.max(t_space.high)), self.observation_space)

        def _build(self, lr_schedule) -> None:
            if self._reduction == "mean":
                self.action_dist = PerDimDiagGaussian(int(self.action_space.shape[0]))
            super()._build(lr_schedule)
            self.action_net = nn.Identity()  # the denoiser's action is the mean
            nn.init.zeros_(self.value_net.weight)  # V = 0: the right start for group-centred rewards,
            nn.init.zeros_(self.value_net.bias)  # and no draw from the global RNG
            del self.log_std  # SB3's own (n_items,) parameter: the shared policy's log-std replaces it
            self.log_std = self._refit_holder[0].log_std  # a Parameter (learned) or the policy's buffer
            self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    class EpisodeRecorder(BaseCallback):
        """Keeps each env's terminal observation and unweighted reward terms of the rollout."""

        def __init__(self) -> None:
            super().__init__()
            self.final: dict[int, dict[str, np.ndarray]] = {}
            self.terms: dict[int, dict[str, float]] = {}

        def _on_rollout_start(self) -> None:
            self.final, self.terms = {}, {}

        def _on_step(self) -> bool:
            for row, (done, info) in enumerate(zip(self.locals["dones"], self.locals["infos"])):
                if done and row not in self.final:
                    self.final[row] = info["terminal_observation"]
                    self.terms[row] = info.get("reward_terms", {})
            return True

    _CLASSES = {"policy": RefitActorCriticPolicy, "callback": EpisodeRecorder,
                "distribution": PerDimDiagGaussian, "group_reward": GroupCentredReward}
    return _CLASSES


@contextlib.contextmanager
def seeded_global_rngs(generator: torch.Generator):
    """Run with torch's global RNG (CPU, or the generator's CUDA device) and numpy's global RNG
    seeded from ``generator`` (both restored afterwards)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
    numpy_state = np.random.get_state()
    device = generator.device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)


class SB3PPOAgent(Agent):
    """Sees (a): the env's reward of its rollouts, through Stable-Baselines3's PPO."""

    name = "sb3-ppo"
    sees = "a"
    supports_data_parallel = False
    has_gradient_estimate = False

    def __init__(self, policy: DenoisingPolicy, core: DenoisingMDP, reference: nn.Module, config: FinetuneConfig,
                 **options) -> None:
        classes = _classes()  # MissingExtraError naming the extra when stable-baselines3 is absent
        from stable_baselines3 import PPO
        from stable_baselines3.common.logger import Logger

        super().__init__(policy, core, reference, config, **options)
        if config.log_prob_reduction != policy.log_prob_reduction:
            raise ConfigError(
                f"the policy's log_prob_reduction {policy.log_prob_reduction!r} differs from the config's "
                f"{config.log_prob_reduction!r}"
            )
        steps = core.exposed_steps
        self.n_steps = min(config.trained_steps or steps, steps)
        self.prefix_steps = steps - self.n_steps
        n_envs = core.batch_size
        if self.n_steps * n_envs < 2:
            raise ConfigError("sb3-ppo needs at least 2 transitions per update (SB3 normalises advantages)")
        self.vec_env = classes["group_reward"](sb3_vec_env_over(core), self.group_size)
        self.model = PPO(
            classes["policy"], self.vec_env, learning_rate=config.lr, n_steps=self.n_steps,
            batch_size=max(1, self.n_steps * n_envs // MINIBATCHES), n_epochs=config.inner_epochs,
            gamma=1.0, gae_lambda=1.0, clip_range=config.clip_range, ent_coef=0.0, vf_coef=0.5,
            max_grad_norm=float("inf"), normalize_advantage=True,  # clipped in the hook below (to log the norm)
            policy_kwargs={"refit_policy": policy, "log_prob_reduction": config.log_prob_reduction},
            device=core.device, verbose=0,
        )
        self.model.set_logger(Logger(folder=None, output_formats=[]))
        # the trainer checkpoints ``policy.state_dict()`` and ``optimizer``: registering SB3's value
        # head on the policy puts it in that state too, so ``resume`` continues exactly
        policy.add_module("sb3_value_net", self.model.policy.value_net)
        self.optimizer = self.model.policy.optimizer  # denoiser + value head (+ learned log-std)
        self._grad_norms: list[float] = []
        self.optimizer.register_step_pre_hook(self._clip_and_record)
        self.recorder = classes["callback"]()
        assert self.model.policy.mlp_extractor.refit.model is policy.model

    def counters(self) -> dict[str, int]:
        """SB3's own step and update counters (logged by SB3; restored on resume)."""
        return {"num_timesteps": int(self.model.num_timesteps), "n_updates": int(self.model._n_updates)}

    def restore_counters(self, counters: dict[str, int]) -> None:
        self.model.num_timesteps, self.model._n_updates = counters["num_timesteps"], counters["n_updates"]

    def _start_episodes(self, users: np.ndarray, rng: np.random.Generator):
        """Reset the shared core with the batch's users and run the untrained prefix with the mean action."""
        from refit_gym.envs.spaces import observation_to_numpy

        rows = np.repeat(np.asarray(users, dtype=np.int64), self.group_size)
        if len(rows) != self.core.batch_size:
            raise ConfigError(f"{len(users)} users x {self.group_size} rollouts != the core's batch of {self.core.batch_size}")
        observation = self.core.reset(rng, users=rows)
        prefix_rewards = torch.zeros(self.core.batch_size, device=self.core.device)
        with torch.no_grad():
            for _ in range(self.prefix_steps):
                context = self.policy.context(observation)
                result = self.core.step(self.policy.loc(observation["x_t"], observation["t"], **context))
                observation, prefix_rewards = result.observation, prefix_rewards + result.reward
        episode = self.core.episode()  # the core's tensors are never modified in place: a snapshot
        return observation_to_numpy(observation), episode, prefix_rewards

    def update(self, users: np.ndarray, rng: np.random.Generator, generator: torch.Generator) -> dict[str, float]:
        observation, episode, prefix_rewards = self._start_episodes(users, rng)
        model = self.model
        model._last_obs = observation
        model._last_episode_starts = np.ones(self.core.batch_size, dtype=bool)
        model.logger.name_to_value.clear()
        self._grad_norms = []
        self.vec_env.raw = []
        with seeded_global_rngs(generator):
            model.learn(total_timesteps=self.n_steps * self.core.batch_size, callback=self.recorder,
                        reset_num_timesteps=False, log_interval=None)
        logged = {k: float(v) for k, v in model.logger.name_to_value.items() if np.isscalar(v)}
        model.logger.name_to_value.clear()
        out = {key.replace("train/", ""): value for key, value in logged.items()}
        out["grad_norm"] = float(np.mean(self._grad_norms)) if self._grad_norms else 0.0
        return {**out, **self._episode_diagnostics(episode, prefix_rewards)}

    def _clip_and_record(self, optimizer, args, kwargs) -> None:
        """Before each SB3 optimiser step: record the gradient norm, then clip it (what SB3's
        ``max_grad_norm`` does, on the same parameters)."""
        parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        self._grad_norms.append(float(torch.nn.utils.clip_grad_norm_(parameters, max_norm)))

    def _episode_diagnostics(self, episode, prefix_rewards: torch.Tensor) -> dict[str, float]:
        """The shared diagnostics (reward terms, held-out mass, log-std) of the episodes SB3 just ran."""
        from types import SimpleNamespace

        n, device = self.core.batch_size, self.core.device
        if len(self.recorder.final) != n:
            return {}
        final = torch.as_tensor(np.stack([self.recorder.final[i]["x_t"] for i in range(n)]), device=device)
        names = sorted({name for terms in self.recorder.terms.values() for name in terms})
        components = {name: torch.tensor([self.recorder.terms[i].get(name, 0.0) for i in range(n)], device=device)
                      for name in names}
        buffer_rewards = torch.as_tensor(np.stack(self.vec_env.raw), device=device)  # (n_steps, n_envs), uncentred
        rewards = torch.cat([prefix_rewards.unsqueeze(0), buffer_rewards]) if self.prefix_steps else buffer_rewards
        rollout_like = SimpleNamespace(components=components, episode_return=lambda: rewards.sum(0), final_state=final,
                                       episode=episode, states=None)
        return self.diagnostics(rollout_like)
