"""Text (``"ansi"``) rendering of a row's current top-k items."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from refit_gym.envs.core import DenoisingMDP


def render_rows(
    core: DenoisingMDP,
    rows: Sequence[int],
    item_titles: Optional[Sequence[str]] = None,
    top_k: int = 10,
    title: str = "",
) -> list[str]:
    """One text block per row: user, remaining steps, and the top-k items of the current state.

    Items are ranked by ``model.item_scores(x_t)``, leaving out the items given in the input (as
    a recommendation list does); ``+`` marks the items held out for the reward. Titles are shown
    when the dataset has them.
    """
    rows = np.asarray(rows, dtype=np.int64)
    values, items = core.top_items(top_k, rows)
    values, items = values.cpu().numpy(), items.cpu().numpy()
    held_out = core.held_out[rows.tolist()].cpu().numpy()
    t = core.t
    users = core.users[torch.from_numpy(rows).to(core.device)].cpu().numpy()
    blocks = []
    for position, row in enumerate(rows):
        prefix = f"{title} | " if title else ""
        header = f"{prefix}user {int(users[position])} | t = {int(t[row])} of {core.exposed_steps} remaining"
        lines = [header, f"top-{items.shape[1]} items of x_t outside the input (+ = held out, scored by the reward):"]
        for rank, (item, value) in enumerate(zip(items[position], values[position]), start=1):
            if not np.isfinite(value):  # fewer non-input items than k
                break
            mark = "+" if held_out[position, item] else " "
            name = f" {item_titles[item]}" if item_titles is not None else ""
            lines.append(f"{rank:3d}. {mark} item {int(item):>6d}{name}  score {float(value):+.4f}")
        blocks.append("\n".join(lines) + "\n")
    return blocks
