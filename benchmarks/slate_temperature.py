"""Benchmark: what the slate policy's temperature does at a pretrained checkpoint (docs/finetuning.md).

For each ``--temperatures`` value, on the first ``--users`` users (the env's hold-out, one chain
per user along the policy's mean, ``--slates`` Plackett-Luce slates of ``finetune.slate_size``
per user): the entropy of the first pick, the sampled slates' mean reward and the greedy slate's
(the top K: what evaluation ranks by). Nothing is trained. Usage::

    REFIT_GYM_DATA=../shared/data python benchmarks/slate_temperature.py \\
        --pretrained runs/table/pretrain/diffrec-p0 --config configs/ml1m_diffrec.yaml
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from agents.config import finetune_config
from agents.trainer import build_learner
from refit_gym.checkpoint import load_checkpoint
from refit_gym.config import load_config
from refit_gym.data import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.1, 0.05, 0.02, 0.01])
    parser.add_argument("--users", type=int, default=128)
    parser.add_argument("--slates", type=int, default=8, help="slates per user (finetune.rollouts_per_user)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    data = load_dataset(config.data.dataset)
    base, _ = load_checkpoint(args.pretrained, data)
    users = np.arange(args.users)
    print("| slate_temperature | entropy of the first pick (nats) | sampled slates' reward | greedy slate's reward |")
    print("|---|---|---|---|")
    for temperature in args.temperatures:
        settings = finetune_config({**config.finetune, "agent": "slate-rloo", "rollouts_per_user": args.slates,
                                    "slate_temperature": temperature})
        agent = build_learner(settings, base, data)
        rollout = agent.collect(users, np.random.default_rng(0), torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits, slates, episode, relevance, rewards = agent.sample(rollout, torch.Generator().manual_seed(0))
            out = {k: float(v) for k, v in agent.slate_diagnostics(rewards, logits, episode, relevance).items()}
        print(f"| {temperature:g} | {out['slate_entropy_first_item']:.2f} | {out['slate_reward']:.3f} | "
              f"{out['slate_reward_greedy']:.3f} |")


if __name__ == "__main__":
    main()
