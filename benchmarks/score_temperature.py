"""Calibrate a sequential scenario's reward temperature: the validation NLL of ``softmax(scores / tau)``.

The sequential scenarios' likelihood reward (and ``next_collaborative``, and ``refit``'s likelihood
term) score items by ``softmax(x0 . E^T / tau)`` over the items not in the input. ``tau = 1`` is
rarely a good probability model: the scores of a wide model spread over tens of units per user,
and the reward then ranges over hundreds of nats. This script scores every validation user of a
checkpoint once (the evaluation's own ``score``: the history ``train[u]``, the chain from noise for
DreamRec) and prints, for each ``--temperatures`` value, the mean negative log-likelihood of the
user's validation item under that softmax with the user's training items masked, as the reward
masks its input (``--no-mask``: over all items), next to the uniform model's NLL. The ``tau`` with
the lowest NLL is the calibrated one: chosen on validation, never on test. Nothing is trained.
Usage::

    REFIT_GYM_DATA=../shared/data python benchmarks/score_temperature.py \\
        --pretrained runs/ml1m_dreamrec/p0 [--temperatures 1 16 24 32 40 48 64 80] [--users 4096]
"""

from __future__ import annotations

import argparse
import math
from typing import Optional

import numpy as np
import torch

from refit_gym.checkpoint import load_checkpoint, read_checkpoint_config
from refit_gym.config import config_from_dict
from refit_gym.data import load_dataset
from refit_gym.data.history import SequenceTable
from refit_gym.errors import ConfigError, DataError
from refit_gym.evaluation.evaluator import EvaluationProtocol, protocol_from_config
from refit_gym.rewards.functional import masked_log_softmax


def temperature_nll(scores: torch.Tensor, targets: torch.Tensor, temperatures: list[float],
                    visible: Optional[torch.Tensor] = None) -> list[float]:
    """Per temperature, the summed ``-log p(target)`` over the rows of ``scores``, ``p`` the rewards' own
    ``masked_log_softmax(scores, visible, tau)`` (``visible``: the masked input items; ``None``: none)."""
    if any(not tau > 0 for tau in temperatures):
        raise ConfigError(f"temperatures must be positive, got {temperatures}")
    visible = torch.zeros_like(scores, dtype=torch.bool) if visible is None else visible
    return [float(-masked_log_softmax(scores, visible, tau).gather(1, targets[:, None]).sum()) for tau in temperatures]


def validation_targets(data) -> np.ndarray:
    """The one validation item of each user (the leave-one-out protocol); an error otherwise."""
    valid = data.split("valid").tocsr()
    counts = np.diff(valid.indptr)
    if not (counts == 1).all():
        raise DataError(f"{data.name}: every user needs exactly one validation item (leave-one-out); "
                        f"{int((counts != 1).sum())} users do not")
    return valid.indices.astype(np.int64)


def validation_nll(recommender, data, users: np.ndarray, temperatures: list[float], batch_size: int = 1024,
                   mask_history: bool = True) -> tuple[list[float], float]:
    """Per temperature, the mean NLL of each of ``users``' validation item under ``softmax(scores / tau)``
    (the user's training items masked unless ``mask_history`` is False); and the scores' mean std per user."""
    if len(users) == 0:
        raise ConfigError("no users to score")
    targets = torch.as_tensor(validation_targets(data))
    table = SequenceTable(EvaluationProtocol("sequential").input_sequences(data, "valid"), data.n_items)
    totals, spread = np.zeros(len(temperatures)), 0.0
    with torch.no_grad():
        for start in range(0, len(users), batch_size):
            batch = torch.as_tensor(users[start:start + batch_size])
            history = table.batch(batch)
            scores = recommender.score(history).float()
            spread += float(scores.std(dim=1).sum())
            visible = history.item_mask() if mask_history else None
            totals += temperature_nll(scores, targets[batch], temperatures, visible)
    return list(totals / len(users)), spread / len(users)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", required=True, help="a checkpoint folder of a sequential base model")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1, 16, 24, 32, 40, 48, 64, 80, 96, 128])
    parser.add_argument("--users", type=int, default=None, help="a seeded random subset of users (default: all)")
    parser.add_argument("--no-mask", dest="mask", action="store_false",
                        help="rank over all items (default: the user's training items masked, as the reward does)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0, help="the users' draw and the chains' noise")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = config_from_dict(read_checkpoint_config(args.pretrained)["experiment"])
    data = load_dataset(config.data.dataset, data_dir=config.data.data_dir)
    model, _ = load_checkpoint(args.pretrained, data)
    model.eval()
    if protocol_from_config(config.evaluation, model).name != "sequential":
        raise SystemExit(f"{args.pretrained}: not a sequential model; this calibration is for sequential ones")
    users = np.arange(data.n_users)
    if args.users is not None and args.users < data.n_users:
        users = np.sort(np.random.default_rng(args.seed).choice(data.n_users, args.users, replace=False))
    torch.manual_seed(args.seed)
    nll, spread = validation_nll(model, data, users, args.temperatures, args.batch_size, mask_history=args.mask)
    masked = "training items masked" if args.mask else "nothing masked"
    print(f"{args.pretrained}: {len(users)} validation users of {data.name}, {data.n_items} items, {masked}; "
          f"the scores' std per user {spread:.2f}; uniform NLL log(n_items) = {math.log(data.n_items):.3f}")
    print("| tau | validation NLL (nats) |\n|---|---|")
    best = int(np.argmin(nll))
    for i, tau in enumerate(args.temperatures):
        print(f"| {tau:g} | {nll[i]:.3f}{' (lowest)' if i == best else ''} |")


if __name__ == "__main__":
    main()
