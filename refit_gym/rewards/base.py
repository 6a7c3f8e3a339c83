"""The reward interface: a term scores the chain's final item scores for a batch of episodes.

A reward term sees only **training** interactions: it is bound to a :class:`TrainingInteractions`
view (the train matrix and each user's chronological training items) and never to a full
:class:`~refit_gym.data.InteractionData`, so validation and test data cannot reach a reward by
construction.

At the end of an episode the env calls ``term(scores, episode)`` once for the whole batch, where
``scores`` are the item scores ``(B, n_items)`` of the final state and ``episode`` says which
users the rows are, which training items were given in the input (``visible``) and which were
hidden from it for the reward to score (``held_out``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from refit_gym.data.interactions import TrainingInteractions


@dataclass
class EpisodeBatch:
    """What a reward knows about a batch of episodes (all tensors on the env's device).

    Attributes:
        users: ``(B,)`` user ids.
        visible: ``(B, n_items)`` float, the training items given in the initial state's input.
        held_out: ``(B, n_items)`` bool, training items hidden from the input and scored by
            recovery rewards (all False when the env hides nothing).
        slates: ``(B, K)`` int64, the slate of ``K`` distinct non-input items the env drew for
            each row at the terminal step (env option ``slate_size``); ``None`` when the option
            is off.
        recent_items: ``(B, C)`` int64, the items at each row's last ``C`` shown positions of its
            chronological history, oldest first, left-padded with -1. Positions, not items:
            ``visible`` cannot tell which of an item's repeats is shown. The env fills it when a
            term asks (:attr:`RewardTerm.recent_items_needed`, ``C`` = the largest ask);
            ``None`` otherwise.
    """

    users: torch.Tensor
    visible: torch.Tensor
    held_out: torch.Tensor
    slates: Optional[torch.Tensor] = None
    recent_items: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return int(self.users.shape[0])


class RewardTerm:
    """One reward term. Subclasses implement :meth:`__call__` and, when they precompute, :meth:`bind`.

    Attributes:
        name: the key under which the term's value is reported in ``info``.
        differentiable: whether ``__call__`` returns values differentiable in ``scores`` (with
            autograd history), so that an algorithm can maximise the term by gradient
            (:meth:`~refit_gym.rewards.WeightedReward.split_differentiable` separates such
            terms). The built-in agents use only the values of the env's reward terms (policy
            gradient); ``refit`` and ``supervised`` differentiate their own held-out
            log-likelihood term.
        uses_slates: whether ``__call__`` reads ``episode.slates``; the env then refuses to
            be built without its ``slate_size`` option.
        recent_items_needed: how many of each history's last shown positions ``__call__`` reads
            from ``episode.recent_items`` (0: none; the env then leaves it ``None``).
    """

    name: str = "reward"
    differentiable: bool = False
    uses_slates: bool = False
    recent_items_needed: int = 0

    def bind(self, interactions: TrainingInteractions, device: torch.device | str = "cpu") -> "RewardTerm":
        """Precompute what the term needs from training data (e.g. neighbour lists); returns self."""
        return self

    def __call__(self, scores: torch.Tensor, episode: EpisodeBatch) -> torch.Tensor:
        """The term's value for each episode, shape ``(B,)``."""
        raise NotImplementedError

    def config(self) -> dict:
        """JSON-able description (class and parameters) for the run record."""
        return {"term": type(self).__name__}


class StepShaping:
    """Potential-based shaping (Ng, Harada & Russell 1999): ``F = phi(s') - phi(s)`` (gamma = 1).

    A shaping object is bound like a term and called on every transition, the last one included;
    the sum of its rewards over an episode telescopes to ``phi(s_final) - phi(s_start)``. The
    start's potential does not depend on the policy, the final state's does (it is not set to
    0): the shaped objective is ``R + phi(s_final)``, with the same optimal policy as ``R`` only
    when ``phi(s_final)`` is a positive multiple of ``R`` (plus a constant), as for the held-out
    log-likelihood potential with the ``loglik`` reward at the same temperature.
    """

    name: str = "shaping"

    def bind(self, interactions: TrainingInteractions, device: torch.device | str = "cpu") -> "StepShaping":
        return self

    def potential(self, x_t: torch.Tensor, t: torch.Tensor, episode: EpisodeBatch) -> torch.Tensor:
        raise NotImplementedError

    def __call__(
        self, x_t: torch.Tensor, t: torch.Tensor, x_next: torch.Tensor, t_next: torch.Tensor, episode: EpisodeBatch
    ) -> torch.Tensor:
        return self.potential(x_next, t_next, episode) - self.potential(x_t, t, episode)


__all__ = ["TrainingInteractions", "EpisodeBatch", "RewardTerm", "StepShaping"]
