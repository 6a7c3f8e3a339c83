"""Slates: K items recommended at once, drawn from a Plackett-Luce distribution over item scores.

A slate policy turns the final item scores ``s`` of a denoising chain into a ranked list of
``K`` distinct items. Its distribution is Plackett-Luce with logits ``s / tau`` over the items
**not** in the input (``visible > 0`` items can never be drawn, as in every reward and in
evaluation)::

    P(pi_1, ..., pi_K) = prod_j exp(s_{pi_j} / tau) / sum_{i not in input, i not in pi_<j} exp(s_i / tau)

* :func:`sample_slates` draws slates with the Gumbel top-K trick (perturb every logit with an
  independent Gumbel(0, 1) draw and keep the K largest, in order), which is exactly
  Plackett-Luce sampling without replacement;
* :func:`slate_log_prob` is the exact, differentiable log-probability above;
* :func:`slate_reward` is a black-box reward of a slate alone against a batch of episodes:
  ``hits``, ``recall`` or ``ndcg`` of the hidden items (the definitions of
  :mod:`refit_gym.rewards.ranking`, DiffRec's), or ``collaborative``, the share of the user's
  collaborative target (:func:`~refit_gym.rewards.collaborative.collaborative_targets`) the slate
  covers.

Everything is batched over rows and runs on the tensors' device.
"""

from __future__ import annotations

from typing import Optional

import torch

from refit_gym.errors import ConfigError
from refit_gym.rewards.base import EpisodeBatch
from refit_gym.rewards.functional import masked_logits, scored_items

HELD_OUT_SLATE_REWARDS = ("hits", "recall", "ndcg")
"""The slate rewards that score the hidden items (all an episode needs; the env's ``slate`` term)."""
SLATE_REWARDS = HELD_OUT_SLATE_REWARDS + ("collaborative",)
"""The black-box slate rewards :func:`slate_reward` computes."""


def _check_slate_size(k: int, logits: torch.Tensor) -> None:
    allowed = torch.isfinite(logits).sum(1)
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"slate size must be a positive int, got {k!r}")
    if bool((allowed < k).any()):
        row = int(torch.nonzero(allowed < k)[0, 0])
        raise ConfigError(f"slate size {k} exceeds the {int(allowed[row])} items row {row} may recommend (items not in "
                          "its input)")


def sample_slates(scores: torch.Tensor, visible: torch.Tensor, k: int, temperature: float,
                  generator: Optional[torch.Generator] = None, uniform: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(B, k)`` int64 slates drawn from Plackett-Luce(``scores / temperature``) over non-input items.

    Gumbel top-K: ``argtop_k(scores / temperature + G)`` with ``G`` i.i.d. Gumbel(0, 1), in
    decreasing order of the perturbed logits. Not differentiable (the draw is discrete).

    Args:
        scores: ``(B, n_items)`` item scores.
        visible: ``(B, n_items)`` input items (never drawn).
        k: slate size.
        temperature: ``tau``.
        generator: the generator of the uniform draws (default: torch's global one).
        uniform: ``(B, n_items)`` Uniform(0, 1) draws to use instead of drawing them (the
            environment draws them from its keyed streams, so that a row's slate does not depend
            on the batch around it); ``generator`` is then unused.

    Raises:
        ConfigError: ``k`` is not positive or exceeds the items some row may recommend, or
            ``uniform`` does not have the scores' shape.
    """
    with torch.no_grad():
        logits = masked_logits(scores.detach(), visible, temperature)
        _check_slate_size(k, logits)
        if uniform is None:
            uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        elif tuple(uniform.shape) != tuple(logits.shape):
            raise ConfigError(f"uniform must have the scores' shape {tuple(logits.shape)}, got {tuple(uniform.shape)}")
        else:
            uniform = uniform.to(device=logits.device, dtype=logits.dtype)
        gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(logits.dtype).tiny)))
        return torch.topk(logits + gumbel, k, dim=1, sorted=True).indices


def slate_log_prob(scores: torch.Tensor, visible: torch.Tensor, slates: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """``(B,)`` exact Plackett-Luce log-probability of each row's slate (differentiable in ``scores``).

    ``sum_j [l_{pi_j} - logsumexp(l_i : i allowed, i not in pi_<j)]`` with ``l = scores / tau`` and
    input items not allowed; ``K`` log-sum-exps over the items (exact, no cancellation).

    Raises:
        ConfigError: a slate holds an input item or the same item twice.
    """
    logits = masked_logits(scores, visible, temperature)
    chosen = logits.gather(1, slates)
    if not bool(torch.isfinite(chosen).all()):
        raise ConfigError("a slate holds an item of the user's input (probability 0 under the slate policy)")
    if slates.shape[1] > 1 and bool((slates.sort(1).values.diff(dim=1) == 0).any()):
        raise ConfigError("a slate holds the same item twice (slates are drawn without replacement)")
    total = torch.zeros(len(slates), dtype=logits.dtype, device=logits.device)
    remaining = logits
    for j in range(slates.shape[1]):
        total = total + chosen[:, j] - torch.logsumexp(remaining, dim=1)
        remaining = remaining.scatter(1, slates[:, j:j + 1], float("-inf"))
    return total


def _discounts(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return 1.0 / torch.log2(torch.arange(k, dtype=dtype, device=device) + 2.0)


def slate_reward(slates: torch.Tensor, episode: EpisodeBatch, kind: str = "ndcg",
                 targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(B,)`` float32 reward of each row's slate (a black-box function of the slate alone).

    Args:
        slates: ``(B, K)`` item ids, rank order.
        episode: the episodes (their hidden items ``H`` and input).
        kind: ``hits`` (``|slate & H|``), ``recall`` (``hits / |H|``), ``ndcg`` (``DCG@K / IDCG@K``,
            IDCG over ``min(|H|, K)`` positions), all 0 when ``H`` is empty; or ``collaborative``
            (``sum_j q(pi_j)``, the share of the collaborative target ``q`` the slate covers).
        targets: ``(B, n_items)`` dense collaborative target rows (``collaborative`` only).

    Raises:
        ConfigError: an unknown ``kind``, or ``collaborative`` without ``targets``.
    """
    if kind not in SLATE_REWARDS:
        raise ConfigError(f"unknown slate reward {kind!r}; known: {list(SLATE_REWARDS)}")
    if kind == "collaborative":
        if targets is None:
            raise ConfigError("the collaborative slate reward needs the users' collaborative target rows")
        return targets.float().gather(1, slates).sum(1)
    scored = scored_items(episode.held_out, episode.visible)
    hits = scored.gather(1, slates).float()
    n_held_out = scored.sum(1)
    if kind == "hits":
        return hits.sum(1)
    if kind == "recall":
        return hits.sum(1) / n_held_out.clamp(min=1).float()
    k = slates.shape[1]
    discount = _discounts(k, torch.float32, slates.device)
    ideal = torch.cat([torch.zeros(1, device=slates.device), discount.cumsum(0)])[n_held_out.clamp(max=k)]
    return torch.where(n_held_out > 0, (hits * discount).sum(1) / ideal.clamp(min=1e-12), torch.zeros_like(ideal))
