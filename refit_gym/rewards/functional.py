"""The tensor maths the reward terms share: the masked item distribution and likelihoods under it.

All functions are batched over users, run on the tensors' device and are differentiable in
``scores`` (autograd gives finite gradients everywhere, including at masked items).

The item distribution of a final state is ``p = softmax(scores / temperature)`` over the items
**not** given in the input: items with ``visible > 0`` get probability 0 (their logit is set to
``-inf``), so copying the input earns nothing. A row whose items are all visible (a user who
interacted with every item) is left unmasked, so the distribution stays defined.
"""

from __future__ import annotations

from typing import Optional

import torch


def visible_mask(visible: torch.Tensor) -> torch.Tensor:
    """Bool ``(B, n_items)``: the items masked out of the softmax (``visible > 0``).

    Args:
        visible: ``(B, n_items)`` float (or bool) input items of each episode.

    Returns:
        The mask, with rows that would mask every item left all False.
    """
    mask = visible > 0
    full = mask.all(dim=1, keepdim=True)
    return mask & ~full if bool(full.any()) else mask


def masked_log_softmax(scores: torch.Tensor, visible: Optional[torch.Tensor], temperature: float) -> torch.Tensor:
    """``log softmax(scores / temperature)`` over the items not in the input.

    Args:
        scores: ``(B, n_items)`` floating item scores (e.g. the predicted clean vector ``x0``).
        visible: ``(B, n_items)`` input items; those with ``visible > 0`` are masked (``None``:
            nothing is masked).
        temperature: ``tau > 0``; smaller is sharper.

    Returns:
        ``(B, n_items)`` log-probabilities (float32, or float64 for float64 scores), ``-inf``
        at masked items.
    """
    return torch.log_softmax(masked_logits(scores, visible, temperature), dim=1)


def masked_logits(scores: torch.Tensor, visible: Optional[torch.Tensor], temperature: float) -> torch.Tensor:
    """``scores / temperature`` with ``-inf`` at the input items (a new tensor; ``visible=None``:
    nothing masked; see :func:`masked_log_softmax`)."""
    logits = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    logits = logits / temperature
    return logits if visible is None else logits.masked_fill_(visible_mask(visible), float("-inf"))


def scored_items(held_out: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Bool ``(B, n_items)``: the held-out items a recovery reward scores.

    A held-out item that is also visible (the env never produces one) has probability 0 and is
    left out rather than turning the reward into ``-inf``.
    """
    return held_out.bool() & ~visible_mask(visible)


def held_out_log_likelihood(
    log_probs: torch.Tensor, scored: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """Multinomial log-likelihood ``sum_{i in H} log p(i)`` of each row's scored items ``H``.

    Args:
        log_probs: ``(B, n_items)`` from :func:`masked_log_softmax`.
        scored: ``(B, n_items)`` bool, the items ``H`` (see :func:`scored_items`).
        normalize: divide by ``|H|`` (the mean log-probability per held-out item).

    Returns:
        ``(B,)``; 0 for rows with no scored item.
    """
    total = torch.where(scored, log_probs, torch.zeros((), dtype=log_probs.dtype, device=log_probs.device)).sum(1)
    if normalize:
        total = total / scored.sum(1).clamp(min=1).to(total.dtype)
    return total


def held_out_mass(log_probs: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Probability mass ``sum_{i in H} p(i)`` on each row's scored items, in ``[0, 1]`` (0 when ``H`` is empty)."""
    return (log_probs.exp() * scored.to(log_probs.dtype)).sum(1)


def sparse_target_value(
    logits: torch.Tensor,
    batch_row: torch.Tensor,
    item: torch.Tensor,
    weight: torch.Tensor,
    objective: str = "loglik",
) -> torch.Tensor:
    """``sum_i w_i log p(i)`` (``"loglik"``) or ``sum_i w_i p(i)`` (``"mass"``) of sparse targets.

    Computed from the masked logits ``z`` without forming the full log-probability matrix:
    ``log p(i) = z_i - logsumexp(z)``.

    Args:
        logits: ``(B, n_items)`` from :func:`masked_logits` (``-inf`` at masked items).
        batch_row, item, weight: the target's stored entries (row in the batch, item, weight),
            e.g. from :meth:`refit_gym.data.sparse_rows.SparseRows.coordinates`.
        objective: ``"loglik"`` or ``"mass"``.

    Returns:
        ``(B,)``; entries whose item is masked contribute 0.
    """
    log_norm = torch.logsumexp(logits, dim=1)
    picked = logits[batch_row, item] - log_norm[batch_row]
    if objective == "mass":
        picked = picked.exp()
    else:
        picked = torch.where(torch.isfinite(picked), picked, torch.zeros((), dtype=picked.dtype, device=picked.device))
    out = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
    return out.index_add(0, batch_row, weight.to(picked.dtype) * picked)
