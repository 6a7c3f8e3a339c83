"""``torchrl-ppo``: TorchRL's ``ClipPPOLoss`` and ``ProbabilisticActor`` over the pretrained denoiser.

What is TorchRL's and what is ours:

* **env** — the library's TorchRL front over the agent's *own* core (the one the trainer built,
  ``batch_size = users * K``): :meth:`refit_gym.envs.torchrl_env.DenoisingTorchRLEnv.from_core`,
  with ``reset_users`` and ``rng`` set for each batch.
* **actor** — TorchRL's ``ProbabilisticActor`` over a ``TensorDictModule`` whose ``loc`` is
  :meth:`agents.policy.DenoisingPolicy.loc` (the shared ``policy.model``, trained in place)
  and whose ``scale`` is ``exp(policy.log_std)`` (fixed, learned or scheduled like every agent).
* **collection** — TorchRL's ``env.rollout``: one episode batch, a ``(B, S)`` tensordict. The
  first ``S - trained_steps`` exposed steps take the mean action
  (``ExplorationType.DETERMINISTIC``, DiffRec's evaluation path), the last ``trained_steps``
  sample (``ExplorationType.RANDOM``), as in :func:`agents.rollout.collect_rollouts`.
* **advantage** — ours: :func:`agents.rollout.group_advantages` of the return-to-go (with a
  terminal-only reward: the terminal reward on every step), normalised within each user's K
  rollouts, written into the tensordict as ``"advantage"``. ``ClipPPOLoss`` takes an advantage
  given upfront, so no critic is built (``critic_network=None``). A GAE with gamma = lambda = 1
  and a constant critic gives ``R - c`` on every step, the same estimator *without* the per-user
  baseline, which is the variance reduction the group gives.
* **loss** — TorchRL's ``ClipPPOLoss`` (``clip_epsilon = clip_range``, no entropy bonus,
  ``functional=False`` so the loss runs the actor's own parameters, i.e. ``policy.model``),
  ``inner_epochs`` passes over 4 minibatches of users, plus the shared ``l2`` anchor (as in
  ``ppo``; a ``kl`` anchor is not applied). Optimiser step, gradient clipping and diagnostics
  are :class:`agents.base.Agent`'s. Exploration noise is drawn from the trainer's generator
  (:func:`seeded_global_rng`), so ``resume`` continues exactly.

**Log-prob convention.** TorchRL's ``IndependentNormal`` *sums* the log-density over the event
dim, i.e. over all ``n_items`` item scores (2,810 on ML-1M). The log importance ratio of a step
is then a sum of ``n_items`` per-item terms: a mean shift of ``delta`` per item moves it by about
``sqrt(n_items) * delta / sigma``, so one Adam step at an ordinary lr sends most ratios out of
``[1 - eps, 1 + eps]``; ``ClipPPOLoss`` then zeroes their gradient and the remaining ones take
large, noisy steps (measured on the tiny env, 120 items, lr 3e-3: clip fraction 0.8-0.87, approx
KL 6-42 nats per step, reward *down*; a tighter clip, 0.02, barely helps; a smaller lr does). With
``finetune.log_prob_reduction = "mean"`` (the project default) the actor uses
:class:`PerDimNormal`, the same Gaussian with log-prob and entropy divided by ``n_items``
(DDPO's per-dimension convention): log-ratios are ``n_items`` times smaller, the clip acts on
the geometric mean of the per-item ratios (DDPO clips it at 1e-4), and the surrogate's gradient is the summed one over ``n_items``
(immaterial under Adam). ``"sum"`` keeps TorchRL's exact convention. The numbers are in
``tests/test_agents_external.py``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn as nn

from agents.base import Agent
from agents.config import FinetuneConfig
from agents.policy import DenoisingPolicy
from agents.rollout import Rollout, group_advantages
from refit_gym.envs.core import DenoisingMDP
from refit_gym.envs.torchrl_env import DenoisingTorchRLEnv
from refit_gym.errors import ConfigError

try:
    from tensordict import TensorDictBase
    from tensordict.nn import TensorDictModule
    from torchrl.envs.utils import ExplorationType, set_exploration_type, step_mdp
    from torchrl.modules import IndependentNormal, ProbabilisticActor
    from torchrl.objectives import ClipPPOLoss
except ImportError as error:  # pragma: no cover - torchrl is a core dependency
    raise ImportError(
        "the torchrl-ppo agent needs torchrl>=0.14.1,<0.15 and tensordict>=0.14.3,<0.15 (core dependencies of refit-gym)"
    ) from error

MINIBATCHES = 4
LOSS_KEYS = ("loss_objective", "clip_fraction", "kl_approx", "ESS", "max_ratio", "mean_ratio")


class PerDimNormal(IndependentNormal):
    """``IndependentNormal`` with the log-prob and entropy *averaged* over the event dim (DDPO's
    per-dimension convention) instead of summed: ``log_prob = sum_i log N(x_i) / n``."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return super().log_prob(value) / self.event_shape[-1]

    def entropy(self) -> torch.Tensor:
        return super().entropy() / self.event_shape[-1]


class _LocScale(nn.Module):
    """``(x_t, t, *context) -> (loc, scale)`` from the shared :class:`DenoisingPolicy`."""

    def __init__(self, policy: DenoisingPolicy, context_keys: tuple[str, ...]) -> None:
        super().__init__()
        self.policy, self.context_keys = policy, context_keys

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = self.policy.loc(x_t, t, **dict(zip(self.context_keys, context)))
        return loc, torch.exp(self.policy.log_std).expand_as(loc)


@contextlib.contextmanager
def seeded_global_rng(generator: torch.Generator):
    """Run with torch's global RNG (CPU, or the generator's CUDA device) seeded from ``generator``
    and restored afterwards: TorchRL's actor samples from the global RNG, this ties the exploration
    noise to the trainer's generator (reproducible runs, exact resume)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    device = generator.device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class TorchRLPPOAgent(Agent):
    """Sees (a): the env's reward of its rollouts, through TorchRL's ``ClipPPOLoss``."""

    name = "torchrl-ppo"
    sees = "a"
    supports_data_parallel = False
    has_gradient_estimate = False

    def __init__(self, policy: DenoisingPolicy, core: DenoisingMDP, reference: nn.Module, config: FinetuneConfig,
                 **options) -> None:
        super().__init__(policy, core, reference, config, **options)
        if config.log_prob_reduction != policy.log_prob_reduction:
            raise ConfigError(
                f"the policy's log_prob_reduction {policy.log_prob_reduction!r} differs from the config's "
                f"{config.log_prob_reduction!r}"
            )
        self.env = DenoisingTorchRLEnv.from_core(core)
        self.context_keys = tuple(sorted(core.context_spec))
        module = TensorDictModule(_LocScale(policy, self.context_keys), in_keys=["x_t", "t", *self.context_keys],
                                  out_keys=["loc", "scale"])
        self.actor = ProbabilisticActor(
            module, in_keys=["loc", "scale"], spec=self.env.action_spec,
            distribution_class=PerDimNormal if config.log_prob_reduction == "mean" else IndependentNormal,
            distribution_kwargs={"tanh_loc": False}, return_log_prob=True,
        )
        self.loss_module = ClipPPOLoss(self.actor, None, clip_epsilon=config.clip_range, entropy_bonus=False,
                                       functional=False, normalize_advantage=False)
        self.log_prob_key = self.loss_module.tensor_keys.sample_log_prob

    # ------------------------------------------------------------------ collection
    @torch.no_grad()
    def collect_tensordict(self, users: np.ndarray, rng: np.random.Generator, generator: torch.Generator) -> TensorDictBase:
        """One episode per row (``users`` repeated K times), a ``(B, S)`` tensordict."""
        rows = np.repeat(np.asarray(users, dtype=np.int64), self.group_size)
        if len(rows) != self.core.batch_size:
            raise ConfigError(f"{len(users)} users x {self.group_size} rollouts != the core's batch of {self.core.batch_size}")
        self.env.reset_users, self.env.rng = rows, rng
        steps = self.core.exposed_steps
        explored = min(self.config.trained_steps or steps, steps)
        parts = []
        with seeded_global_rng(generator):
            state = self.env.reset()
            if steps > explored:
                with set_exploration_type(ExplorationType.DETERMINISTIC):
                    parts.append(self.env.rollout(steps - explored, self.actor, auto_reset=False, tensordict=state))
                state = step_mdp(parts[-1][..., -1])
            with set_exploration_type(ExplorationType.RANDOM):
                parts.append(self.env.rollout(explored, self.actor, auto_reset=False, tensordict=state))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def to_rollout(self, td: TensorDictBase) -> Rollout:
        """The tensordict as an :class:`agents.rollout.Rollout` (the shared diagnostics read it)."""
        move = lambda x: x.transpose(0, 1)  # noqa: E731  (B, S, ...) -> (S, B, ...)
        return Rollout(
            states=move(td["x_t"]), remaining=move(td["t"]), actions=move(td["action"]),
            log_probs=move(td[self.log_prob_key]), rewards=move(td["next", "reward"].squeeze(-1)),
            components={k: v.clone() for k, v in td["next", "reward_terms"][:, -1].items()},
            final_state=td["next", "x_t"][:, -1], episode=self.core.episode(),
            context={k: td[k][:, 0] for k in self.context_keys}, group_size=self.group_size,
        )

    # ------------------------------------------------------------------ update
    def update(self, users: np.ndarray, rng: np.random.Generator, generator: torch.Generator) -> dict[str, float]:
        td = self.collect_tensordict(users, rng, generator)
        rollout = self.to_rollout(td)
        steps = self.trained_step_indices(rollout)
        advantages = group_advantages(rollout.returns_to_go()[steps], self.group_size, self.config.advantage_clip)
        keys = ("x_t", "t", "action", self.log_prob_key, *self.context_keys)
        data = td[:, steps].select(*keys)
        data.set("advantage", advantages.transpose(0, 1).unsqueeze(-1).contiguous())
        history: list[dict[str, float]] = []
        for _ in range(self.config.inner_epochs):
            order = torch.randperm(rollout.n_rows, generator=generator, device=generator.device).to(td.device)
            for rows in order.chunk(MINIBATCHES):
                out = self.loss_module(data[rows].reshape(-1))
                anchor = (self.anchor_loss() if self.config.anchor == "l2" and self.config.anchor_weight > 0
                          else torch.zeros((), device=td.device))
                loss = out["loss_objective"] + self.config.anchor_weight * anchor
                grad_norm = self.step(loss)
                history.append({"loss": float(loss.detach()), "loss_anchor": float(anchor.detach()), "grad_norm": grad_norm,
                                **{k: float(out[k].detach().float().mean()) for k in LOSS_KEYS}})
        mean = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
        return {**mean, **self.diagnostics(rollout)}
