"""Slate agents: the policy recommends K items at once and learns from the slate's reward.

After the denoising chain, the policy's item scores ``s`` (those evaluation ranks by) define a
Plackett-Luce slate policy ``PL(softmax(s / tau))`` over the items not in the input
(:mod:`refit_gym.slates`). Per user, ``G = rollouts_per_user`` slates of ``K = slate_size`` items
are drawn (Gumbel top-K) and each is scored by a black-box slate reward (``slate_reward``:
``ndcg``, ``recall`` or ``hits`` of the hidden items, or ``collaborative``). The log-probability
of a slate is exact.

The chain (``slate_chain``):

* ``deterministic`` (default): one chain per user along the policy's mean (evaluation's path);
  only the slate is sampled, so the ``G`` slates of a user share one chain;
* ``stochastic``: ``G`` chains per user, the last ``trained_steps`` Gaussian steps explore, and
  their exact log-probabilities join the slate's in one trajectory log-probability.

The gradient reaches the model through the scores of the last exposed step (the denoiser's clean
estimate there, and for an item-embedding model its item table), as the ``refit`` likelihood term
does; with a stochastic chain, also through the explored Gaussian steps.

Three estimators, one per agent:

* ``slate-rloo``: REINFORCE with the leave-one-out baseline over the ``G`` slates of a user
  (Kool, van Hoof and Welling, 2019): ``A_g = r_g - mean_{g' != g} r_g'``. Sees (a).
* ``slate-grpo``: group-normalised advantages ``(r - mean_G) / std_G`` (GRPO / DDPO), PPO's clipped
  ratio over ``inner_epochs`` passes of minibatches of users. Sees (a).
* ``slate-plrank``: a PL-Rank-style gradient (Oosterhuis, SIGIR 2021 / 2022) of the expected
  metric ``E[sum_k theta_k rho(y_k)]``: per sampled slate, the log-derivative of the sampled
  prefix times the expected gain of each later position (less the mean of the user's other
  slates: a leave-one-out baseline per position) plus the exact derivative of each position's
  expected gain, computed from the **relevance of every item** (which items are hidden, or the
  collaborative target). An unbiased estimate of the exact gradient of the expected metric that
  reads the reward's inputs, not only the reward: labelled (c).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from agents.base import Agent
from agents.rollout import Rollout, collect_rollouts, group_advantages
from refit_gym.errors import ConfigError
from refit_gym.evaluation.metrics import top_k_lowest_id_first
from refit_gym.rewards.base import EpisodeBatch
from refit_gym.rewards.functional import masked_logits, scored_items
from refit_gym.slates import sample_slates, slate_log_prob, slate_reward

MINIBATCHES = 4
"""``slate-grpo``: minibatches of users per inner epoch."""


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(N,)`` ``r_g - mean of the other G - 1 rewards of the same user`` (rows grouped by user)."""
    if group_size < 2:
        raise ConfigError("the leave-one-out baseline needs at least 2 slates per user (finetune.rollouts_per_user)")
    grouped = rewards.reshape(-1, group_size)
    others = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)


def position_weights(kind: str, episode: EpisodeBatch, k: int) -> torch.Tensor:
    """``(B, k)`` ``theta`` with ``reward = sum_j theta_j rho(slate_j)`` for the slate reward ``kind``:
    DCG discounts over IDCG (``ndcg``), ``1 / |H|`` (``recall``) or 1 (``hits``, ``collaborative``);
    0 for a ranking reward of a row with no hidden item."""
    device = episode.visible.device
    ones = torch.ones(episode.batch_size, k, device=device)
    if kind in ("hits", "collaborative"):
        return ones
    n_held_out = scored_items(episode.held_out, episode.visible).sum(1, keepdim=True).float()
    if kind == "recall":
        return torch.where(n_held_out > 0, ones / n_held_out.clamp(min=1), 0.0)
    discount = 1.0 / torch.log2(torch.arange(k, device=device, dtype=torch.float32) + 2.0)
    ideal = torch.cat([torch.zeros(1, device=device), discount.cumsum(0)])[n_held_out.long().clamp(max=k).squeeze(1)]
    return torch.where(ideal[:, None] > 0, discount / ideal.clamp(min=1e-12)[:, None], 0.0)


def _choices(logits: torch.Tensor, slates: torch.Tensor):
    """Yield ``(k, pi_k)`` for each position: PL's choice distribution given the sampled prefix."""
    remaining = logits.clone()
    rows = torch.arange(len(logits), device=logits.device)
    for k in range(slates.shape[1]):
        yield k, torch.softmax(remaining, dim=1)
        remaining[rows, slates[:, k]] = float("-inf")


@torch.no_grad()
def plackett_luce_metric_gradient(logits: torch.Tensor, slates: torch.Tensor, relevance: torch.Tensor,
                                  weights: torch.Tensor, group_size: int = 1) -> torch.Tensor:
    """``(N, n)``: each sample's unbiased estimate of ``d E[sum_k w_k rho(y_k)] / d logits``.

    With ``pi_k`` the PL choice distribution at position ``k`` given the sampled prefix
    ``y_<k`` and ``g_k = pi_k . rho`` its expected gain, the expected metric is
    ``sum_k w_k E[g_k]``; its gradient is ``sum_k w_k E[(sum_{j<k} (e_{y_j} - pi_j)) (g_k - b_k) +
    pi_k * (rho - g_k)]``: the score function of the sampled prefix times the expected gain at
    ``k``, and the exact derivative of the softmax at ``k``. ``b_k`` is a baseline that does not
    depend on the sample: with ``group_size = G > 1`` (rows grouped by user, ``G`` slates each from
    the same logits) the mean ``g_k`` of the user's other ``G - 1`` slates, else 0. ``logits`` are
    ``scores / tau`` with ``-inf`` at items that may not be drawn.
    """
    gains = torch.stack([(choice * relevance).sum(1) for _, choice in _choices(logits, slates)], dim=1)
    baseline = torch.zeros_like(gains)
    if group_size > 1:
        grouped = gains.reshape(-1, group_size, gains.shape[1])
        baseline = ((grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)).reshape(gains.shape)
    gradient = torch.zeros_like(logits)
    prefix_score = torch.zeros_like(logits)
    rows = torch.arange(len(logits), device=logits.device)
    for k, choice in _choices(logits, slates):
        gain = gains[:, k:k + 1]
        gradient += weights[:, k:k + 1] * (prefix_score * (gain - baseline[:, k:k + 1]) + choice * (relevance - gain))
        prefix_score -= choice
        prefix_score[rows, slates[:, k]] += 1.0
    return gradient


class SlateAgent(Agent):
    """The shared slate machinery: chains, slates, rewards, log-probabilities (see the module)."""

    name = "slate"
    sees = "a"

    def __init__(self, policy, core, reference, config, **options) -> None:
        super().__init__(policy, core, reference, config, **options)
        if config.rollouts_per_user < 2:
            raise ConfigError(f"{self.name} compares the slates of a user with each other: finetune.rollouts_per_user "
                              f"must be >= 2, got {config.rollouts_per_user}")
        if config.slate_chain == "stochastic" and not self.supports_stochastic_chain:
            raise ConfigError(f"{self.name} takes finetune.slate_chain='deterministic' (its gradient is the slate's)")
        self.slates_per_user = config.rollouts_per_user
        self.collaborative = None
        if config.slate_reward == "collaborative":
            from refit_gym.rewards.collaborative import CollaborativeReward

            self.collaborative = CollaborativeReward(k=config.slate_collaborative_k).bind(core.interactions, core.device)

    supports_stochastic_chain = True
    supports_data_parallel = False
    data_parallel_refusal = "its slates are drawn per process, not for the global batch"

    @classmethod
    def chains_per_user(cls, config) -> int:
        return config.rollouts_per_user if config.slate_chain == "stochastic" else 1

    def collect(self, users: np.ndarray, rng: np.random.Generator, generator: torch.Generator) -> Rollout:
        rows = np.repeat(np.asarray(self.local_users(users), dtype=np.int64), self.group_size)
        stochastic = self.config.slate_chain == "stochastic"
        steps = self.config.trained_steps if stochastic else 1
        return collect_rollouts(self.core, self.policy, rows, rng, generator, self.group_size, stochastic=stochastic,
                                explored_steps=steps, recorded_steps=steps or 0)

    def slate_logits(self, rollout: Rollout, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(N, n_items)`` ``scores / tau`` per slate (``-inf`` at input items), differentiable; the
        chains' rows repeated for the slates that share them."""
        state, remaining, context = rollout.states[-1], rollout.remaining[-1], rollout.context
        if rows is not None:
            state, remaining, context = state[rows], remaining[rows], {k: v[rows] for k, v in context.items()}
        scores = self.policy.item_scores(self.policy.predict_x0(state, remaining, **context))
        visible = rollout.episode.visible if rows is None else rollout.episode.visible[rows]
        return self._per_slate(masked_logits(scores, visible, self.config.slate_temperature))

    def _per_slate(self, chain_rows: torch.Tensor) -> torch.Tensor:
        repeats = self.slates_per_user // self.group_size
        return chain_rows.repeat_interleave(repeats, dim=0) if repeats > 1 else chain_rows

    def slate_episode(self, episode: EpisodeBatch) -> EpisodeBatch:
        return EpisodeBatch(users=self._per_slate(episode.users), visible=self._per_slate(episode.visible),
                            held_out=self._per_slate(episode.held_out),
                            recent_items=None if episode.recent_items is None else self._per_slate(episode.recent_items))

    def draw(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``(N, K)`` slates from ``PL(softmax(logits))`` (the logits already divided by ``tau``)."""
        visible = ~torch.isfinite(logits)
        return sample_slates(logits.detach().masked_fill(visible, 0.0), visible, self.config.slate_size, 1.0, generator)

    def relevance(self, episode: EpisodeBatch) -> torch.Tensor:
        """``(N, n_items)`` per-item gain ``rho`` of the slate reward (hidden items, or the collaborative target)."""
        if self.collaborative is not None:
            users = episode.users.detach().cpu().numpy().astype(np.int64)
            distinct, index = np.unique(users, return_inverse=True)
            dense = torch.from_numpy(self.collaborative.target_rows(distinct).toarray()).to(episode.visible.device)
            return dense[torch.from_numpy(index.reshape(-1)).to(dense.device)]
        return scored_items(episode.held_out, episode.visible).float()

    def rewards(self, slates: torch.Tensor, episode: EpisodeBatch,
                relevance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(N,)`` slate rewards (``relevance``: :meth:`relevance` of ``episode``, if already built)."""
        if self.collaborative is not None and relevance is None:
            relevance = self.relevance(episode)
        return slate_reward(slates, episode, self.config.slate_reward,
                            relevance if self.collaborative is not None else None)

    def sample(self, rollout: Rollout, generator: Optional[torch.Generator]):
        """One batch of slates: ``(logits, slates, episode, relevance, rewards)`` -- the per-slate
        logits (differentiable), the drawn slates, the per-slate episodes, their items' gains and
        the slates' rewards."""
        logits = self.slate_logits(rollout)
        slates = self.draw(logits, generator)
        episode = self.slate_episode(rollout.episode)
        relevance = self.relevance(episode)
        return logits, slates, episode, relevance, self.rewards(slates, episode, relevance)

    def term_weights(self) -> dict[str, float]:
        return {"loss_slate": 1.0, "loss_anchor": self.config.anchor_weight}

    def terms(self, objective: torch.Tensor, rollout: Rollout, diagnostics: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        """The named loss terms of a one-step slate agent: its slate objective plus the anchor."""
        anchor = self.anchor_loss(rollout) if self.config.anchor_weight > 0 else torch.zeros_like(objective)
        return {"loss": objective + self.config.anchor_weight * anchor, "loss_slate": objective, "loss_anchor": anchor,
                **diagnostics}

    def trajectory_log_prob(self, rollout: Rollout, logits: torch.Tensor, slates: torch.Tensor,
                            rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(N,)`` log-probability of each slate, plus its chain's explored Gaussian steps when the chain explores."""
        log_p = slate_log_prob(logits.masked_fill(~torch.isfinite(logits), 0.0), ~torch.isfinite(logits), slates, 1.0)
        if self.config.slate_chain == "stochastic":
            log_p = log_p + self.step_log_probs(rollout, self.trained_step_indices(rollout), rows).sum(0)
        return log_p

    def slate_diagnostics(self, rewards: torch.Tensor, logits: torch.Tensor, episode: EpisodeBatch,
                          relevance: torch.Tensor) -> dict[str, torch.Tensor]:
        """The slates' mean reward, its mean spread within a user, the reward of the greedy slate
        (the top K of the scores: what evaluation ranks) and the entropy of the first pick."""
        with torch.no_grad():
            log_p = torch.log_softmax(logits, dim=1)
            entropy = -torch.where(torch.isfinite(log_p), log_p.exp() * log_p, 0.0).sum(1)
            grouped = rewards.reshape(-1, self.slates_per_user)
            greedy = self.rewards(top_k_lowest_id_first(logits, self.config.slate_size)[1], episode, relevance)
            return {"slate_reward": rewards.mean(), "slate_reward_std_in_user": grouped.std(1).mean(),
                    "slate_reward_greedy": greedy.mean(), "slate_entropy_first_item": entropy.mean()}

    def diagnostics(self, rollout: Rollout) -> dict[str, float]:
        out = super().diagnostics(rollout)
        if self.config.slate_chain == "deterministic":  # the chain does not explore: its std is unused
            out.pop("log_std", None)
        return out


class SlateRLOOAgent(SlateAgent):
    """Sees (a): only the reward of its slates (and, as every policy gradient, its own log-probabilities)."""

    name = "slate-rloo"

    def loss(self, rollout: Rollout, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        logits, slates, episode, relevance, rewards = self.sample(rollout, generator)
        advantages = leave_one_out_advantages(rewards, self.slates_per_user)
        objective = -(advantages * self.trajectory_log_prob(rollout, logits, slates)).mean()
        return self.terms(objective, rollout, self.slate_diagnostics(rewards, logits, episode, relevance))


class SlateGRPOAgent(SlateAgent):
    """Sees (a): only the reward of its slates (plus its own log-probabilities, as every PPO)."""

    name = "slate-grpo"

    def targets(self, rollout: Rollout, generator: Optional[torch.Generator]) -> dict[str, torch.Tensor]:
        """The batch's slates, their rewards, group-normalised advantages and log-probabilities at
        sampling time (what the inner epochs' ratios are taken against), and the diagnostics."""
        with torch.no_grad():
            logits, slates, episode, relevance, rewards = self.sample(rollout, generator)
            return {"slates": slates, "advantages": group_advantages(rewards, self.slates_per_user,
                                                                      self.config.advantage_clip),
                    "old": self.trajectory_log_prob(rollout, logits, slates),
                    "diagnostics": self.slate_diagnostics(rewards, logits, episode, relevance)}

    def update(self, users: np.ndarray, rng: np.random.Generator, generator: torch.Generator) -> dict[str, float]:
        rollout = self.collect(users, rng, generator)
        batch = self.targets(rollout, generator)
        chains = rollout.n_rows
        per_chain = self.slates_per_user // self.group_size
        history: list[dict[str, float]] = []
        for _ in range(self.config.inner_epochs):
            order = torch.randperm(chains, generator=generator, device=generator.device).to(rollout.states.device)
            for rows in order.chunk(min(MINIBATCHES, chains)):
                slate_rows = (rows[:, None] * per_chain + torch.arange(per_chain, device=rows.device)).reshape(-1)
                terms = self.compute(self.minibatch_loss, rollout, rows, batch["slates"][slate_rows],
                                     batch["advantages"][slate_rows], batch["old"][slate_rows])
                history.append({**self.scalars(terms), "grad_norm": self.step(terms["loss"])})
        mean = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
        return self.distributed.mean({**mean, **self.diagnostics(rollout), **self.scalars(batch["diagnostics"])})

    def estimate_loss(self, rollout: Rollout, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The first inner step's loss over the whole batch (every ratio 1: the group-normalised
        policy gradient)."""
        batch = self.targets(rollout, generator)
        rows = torch.arange(rollout.n_rows, device=rollout.states.device)
        return self.minibatch_loss(rollout, rows, batch["slates"], batch["advantages"], batch["old"])["loss"]

    def minibatch_loss(self, rollout: Rollout, rows: torch.Tensor, slates: torch.Tensor, advantages: torch.Tensor,
                       old: torch.Tensor) -> dict[str, torch.Tensor]:
        eps = self.config.clip_range
        log_ratio = self.trajectory_log_prob(rollout, self.slate_logits(rollout, rows), slates, rows) - old
        ratio = torch.exp(log_ratio)
        objective = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps)).mean()
        anchor = self.anchor_loss() if self.config.anchor == "l2" and self.config.anchor_weight > 0 else \
            torch.zeros((), device=objective.device)
        with torch.no_grad():
            approx_kl = 0.5 * (log_ratio ** 2).mean()
            clip_fraction = ((ratio - 1).abs() > eps).float().mean()
        return {"loss": objective + self.config.anchor_weight * anchor, "loss_objective": objective,
                "loss_anchor": anchor, "approx_kl": approx_kl, "clip_fraction": clip_fraction}


class SlatePLRankAgent(SlateAgent):
    """Sees (c): the relevance of every item (the reward's inputs), from which it estimates the
    exact gradient of the expected slate metric; more than a black-box reward."""

    name = "slate-plrank"
    sees = "c"
    supports_stochastic_chain = False

    def loss(self, rollout: Rollout, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        logits, slates, episode, relevance, rewards = self.sample(rollout, generator)
        weights = position_weights(self.config.slate_reward, episode, self.config.slate_size)
        gradient = plackett_luce_metric_gradient(logits.detach(), slates, relevance, weights, self.slates_per_user)
        # a surrogate whose gradient in the logits is the estimate (ascent), averaged over slates
        objective = -(gradient * torch.where(torch.isfinite(logits), logits, 0.0)).sum(1).mean()
        return self.terms(objective, rollout, self.slate_diagnostics(rewards, logits, episode, relevance))
