"""Does an agent's gradient estimate carry signal? Two estimates against each other and against the exact gradient.

For one agent at its current weights and one batch of users (:func:`gradient_signal`):

* ``pair_cosine``: the cosine between two independent estimates
  (:meth:`agents.base.Agent.gradient_estimate`) on the same users. The env's draws are shared
  (both estimates reset the env with the same numpy seed: the same hidden items under a
  ``random`` hold-out, the same initial noise of the chain), the agent's own draws are not (two
  torch generators: exploration noise, categorical samples). 1 means no sampling noise; near 0,
  the estimate is mostly noise at this batch size.
* ``exact_cosine``: the cosine between an estimate and the exact gradient of the held-out
  negative log-likelihood (:meth:`agents.base.Agent.likelihood_loss` on the deterministic path,
  what ``supervised`` descends, without its anchor) on the same users and hidden items. Both are
  gradients of losses to minimise, so a positive cosine means the estimate points the way the
  supervised gradient does (the mean over the two estimates).
* ``norm`` (mean of the two estimates' norms) and ``exact_norm``; ``seconds`` per estimate.

Nothing is stepped and nothing the training draws from is consumed: the weights and the optimiser
state are bitwise unchanged, and every draw comes from generators seeded by ``seed``.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from agents.base import Agent, flat_gradient
from agents.rollout import collect_rollouts

KEYS = ("pair_cosine", "exact_cosine", "norm", "exact_norm")
"""What :func:`gradient_signal` measures (the trainer logs them as ``gradient_signal/<key>``)."""


def likelihood_gradient(agent: Agent, users: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """The exact gradient of ``agent.likelihood_loss`` (``-mean log p(held-out items)``) on the
    deterministic path for ``users``, over the agent's trainable parameters, flat; the env is
    reset from ``rng`` with the rows (``group_size`` per user) the agent's own batch has."""
    rows = np.repeat(np.asarray(agent.local_users(users), dtype=np.int64), agent.group_size)
    unused = torch.Generator(device=agent.core.device)  # a deterministic rollout draws nothing
    rollout = collect_rollouts(agent.core, agent.policy, rows, rng, unused, agent.group_size, stochastic=False,
                               recorded_steps=1)
    return flat_gradient(agent.likelihood_loss(rollout), agent.trainable_parameters())


def gradient_signal(agent: Agent, users: np.ndarray, seed: int | Sequence[int]) -> dict[str, float]:
    """``pair_cosine``, ``exact_cosine``, ``norm``, ``exact_norm`` and ``seconds`` (per estimate) of
    ``agent``'s gradient estimate on ``users`` (see the module docstring); deterministic given ``seed``.

    Raises:
        ConfigError: the agent has no gradient estimate of its own (TorchRL's and SB3's loops).
    """
    agent.check_gradient_estimate()
    env_seed, first_seed, second_seed = np.random.SeedSequence(seed).generate_state(3)
    device = agent.core.device
    estimates, started = [], time.perf_counter()
    for own_seed in (first_seed, second_seed):
        generator = torch.Generator(device=device).manual_seed(int(own_seed))
        estimates.append(agent.gradient_estimate(users, np.random.default_rng(env_seed), generator))
    seconds = (time.perf_counter() - started) / 2
    exact = likelihood_gradient(agent, users, np.random.default_rng(env_seed))
    first, second = estimates
    return {"pair_cosine": cosine(first, second), "exact_cosine": (cosine(first, exact) + cosine(second, exact)) / 2,
            "norm": float((first.norm() + second.norm()) / 2), "exact_norm": float(exact.norm()), "seconds": seconds}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """``<a, b> / (|a| |b|)`` in float64; NaN when either is zero (no direction to compare)."""
    a, b = a.double(), b.double()
    norms = a.norm() * b.norm()
    return float(a @ b / norms) if norms > 0 else float("nan")
