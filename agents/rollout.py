"""Rollouts: a batch of denoising episodes collected from the env core with a policy.

Rollout storage is allocated as explicit tensors (CleanRL style): ``states[s]`` and
``actions[s]`` of each recorded step ``s``, the sampling log-probs, the per-step rewards, the
terminal reward components and what the episode hid from the input. Only the last
``recorded_steps`` steps are stored (the agents train those): a step's states and actions are
``rows x items`` each, so recording all 40 steps of an ML-1M batch would hold 460 MB, and 4.6 GB
at 10x its items, for nothing. Returns-to-go of a recorded step only involve later steps, so they
are exact; the rewards of unrecorded steps are kept summed (``unrecorded_return``). Rows are grouped by user:
with ``K`` rollouts per user, rows ``g*K .. g*K+K-1`` belong to the same user, which is what the
per-user (group) baselines use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch

from agents.policy import DenoisingPolicy
from refit_gym.envs.core import DenoisingMDP
from refit_gym.errors import ConfigError
from refit_gym.rewards.base import EpisodeBatch


@dataclass
class Rollout:
    """The last ``S`` recorded steps of ``N = users * K`` episodes (tensors on the env's device)."""

    states: torch.Tensor  # (S, N, state_dim): x_t before each step
    remaining: torch.Tensor  # (S, N, 1) int64: remaining steps t before each step
    actions: torch.Tensor  # (S, N, state_dim): the sampled actions (unclipped)
    log_probs: torch.Tensor  # (S, N): log-prob of each action when it was sampled
    rewards: torch.Tensor  # (S, N): reward received after each step (terminal reward on the last)
    components: dict[str, torch.Tensor]  # term -> (N,) unweighted terminal reward terms
    final_state: torch.Tensor  # (N, state_dim)
    episode: EpisodeBatch
    context: dict[str, torch.Tensor]
    group_size: int
    unrecorded_return: Optional[torch.Tensor] = None  # (N,): rewards of the steps before the recorded ones

    @property
    def n_rows(self) -> int:
        return int(self.states.shape[1])

    @property
    def n_steps(self) -> int:
        return int(self.states.shape[0])

    def returns_to_go(self) -> torch.Tensor:
        """``(S, N)``: the undiscounted return from each step on (gamma = 1)."""
        return self.rewards.flip(0).cumsum(0).flip(0)

    def episode_return(self) -> torch.Tensor:
        """``(N,)``: each episode's whole return, recorded steps or not."""
        total = self.rewards.sum(0)
        return total if self.unrecorded_return is None else total + self.unrecorded_return


def group_advantages(returns: torch.Tensor, group_size: int, clip: float = 5.0, eps: float = 1e-8) -> torch.Tensor:
    """Per-user normalised advantages ``(R - mean_group) / (std_group + eps)``, clipped to +-clip.

    ``returns`` is ``(..., N)`` with rows grouped by user in blocks of ``group_size``; groups of
    one fall back to normalising over the whole batch (DDPO's fallback).
    """
    if group_size > 1:
        grouped = returns.reshape(*returns.shape[:-1], -1, group_size)
        mean, std = grouped.mean(-1, keepdim=True), grouped.std(-1, keepdim=True)
        advantages = ((grouped - mean) / (std + eps)).reshape(returns.shape)
    else:
        advantages = (returns - returns.mean(-1, keepdim=True)) / (returns.std(-1, keepdim=True) + eps)
    return advantages.clamp(-clip, clip)


def shuffle_rewards_within_groups(rollout: Rollout, order: torch.Tensor) -> Rollout:
    """``rollout`` with each user's rollouts' rewards permuted among them (a placebo control).

    ``order`` is ``(users, group_size)``: row u is a permutation of ``range(group_size)``; rollout
    ``k`` of user ``u`` receives the rewards (per step, unrecorded and per term) of rollout
    ``order[u, k]``. States, actions and log-probs stay where they are, so the pairing of actions
    and rewards within a user is random.
    """
    users, group_size = rollout.n_rows // rollout.group_size, rollout.group_size
    if tuple(order.shape) != (users, group_size):
        raise ValueError(f"order must be (users, group_size) = ({users}, {group_size}), got {tuple(order.shape)}")
    device = rollout.rewards.device
    columns = (order.to(device) + group_size * torch.arange(users, device=device)[:, None]).reshape(-1)
    unrecorded = None if rollout.unrecorded_return is None else rollout.unrecorded_return[columns]
    components = {name: values[columns] for name, values in rollout.components.items()}
    return replace(rollout, rewards=rollout.rewards[:, columns], unrecorded_return=unrecorded, components=components)


@torch.no_grad()
def collect_rollouts(
    core: DenoisingMDP,
    policy: DenoisingPolicy,
    users: np.ndarray,
    rng: np.random.Generator,
    generator: torch.Generator,
    group_size: int,
    stochastic: bool = True,
    explored_steps: int = 0,
    recorded_steps: int = 0,
) -> Rollout:
    """Run one episode per row of ``users`` (length = the core's batch size) with ``policy``.

    Args:
        core: the env core (its batch size must equal ``len(users)``).
        policy: samples ``loc + std * z`` (or takes ``loc`` when ``stochastic`` is False).
        explored_steps: only the last this-many steps sample (0 = every step); the earlier ones
            take ``loc``.
        recorded_steps: store only the last this-many steps (0 = every step); at least every
            explored step.
        users: user id of each row, grouped by user (``np.repeat(ids, group_size)``).
        rng: the trainer's numpy generator (the core draws the episode seed from it).
        generator: torch generator of the exploration noise.
    """
    if recorded_steps > 0 and stochastic and not 0 < explored_steps <= recorded_steps:
        raise ConfigError(f"recorded_steps={recorded_steps} would drop explored steps (explored_steps={explored_steps}, "
                          "0 = all): record at least every explored step")
    observation = core.reset(rng, users=users)
    steps, n, width = core.exposed_steps, len(users), core.state_dim
    first_explored = 0 if explored_steps <= 0 else max(0, steps - explored_steps)
    first_recorded = 0 if recorded_steps <= 0 else max(0, steps - recorded_steps)
    recorded, device = steps - first_recorded, core.device
    states = torch.empty(recorded, n, width, device=device)
    actions = torch.empty(recorded, n, width, device=device)
    remaining = torch.empty(recorded, n, 1, dtype=torch.int64, device=device)
    log_probs = torch.zeros(recorded, n, device=device)
    rewards = torch.zeros(recorded, n, device=device)
    unrecorded_return = torch.zeros(n, device=device)
    context = policy.context(observation)
    loc_at = policy.loc_function(**context)  # the condition encoded once for the whole rollout
    result = None
    for s in range(steps):
        loc = loc_at(observation["x_t"], observation["t"])
        explored = stochastic and s >= first_explored
        action = policy.sample(loc, generator, (core.row_offset, core.global_batch)) if explored else loc
        r = s - first_recorded
        if r >= 0:
            states[r], remaining[r], actions[r] = observation["x_t"], observation["t"], action
            # the log-density of the mean itself is a constant: no pass over the batch for it
            log_probs[r] = policy.log_prob(action, loc) if explored else policy.log_prob_of_mean(width)
        result = core.step(action)
        if r >= 0:
            rewards[r] = result.reward
        else:
            unrecorded_return += result.reward
        observation = result.observation
    return Rollout(
        states=states, remaining=remaining, actions=actions, log_probs=log_probs, rewards=rewards,
        components={k: v.clone() for k, v in result.components.items()}, final_state=observation["x_t"],
        episode=core.episode(), context=context, group_size=group_size, unrecorded_return=unrecorded_return,
    )
