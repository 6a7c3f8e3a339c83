"""Benchmark: the env's slate reward (option ``slate_size``) for the pretrained denoiser and for random actions.

On ``--env`` (a vector env of ``--users`` rows, ``slate_size=--slate-size``, reward = the ``slate``
term's ``--metric``), for each ``--temperatures`` value: the mean episode return over ``--resets``
seeded resets, with the pretrained denoiser's mean as the policy (``DenoiserPolicy``'s ``loc``)
and with uniformly random actions. Nothing is trained (docs/environment.md, "Slates"). Usage::

    python benchmarks/slate_env.py [--env ReFiT-Synthetic-v0] [--temperatures 0.02 0.1]
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
import torch

import refit_gym  # noqa: F401  (registers the ids)
from refit_gym.envs import DenoiserPolicy


def mean_return(venv, policy, resets: int) -> list[float]:
    """The mean return of each seeded reset (``policy`` None: random actions)."""
    means = []
    for seed in range(resets):
        obs, _ = venv.reset(seed=seed)
        venv.action_space.seed(seed)  # the random actions are reproducible too
        returns, done = np.zeros(venv.num_envs), np.zeros(venv.num_envs, dtype=bool)
        while not done.all():
            if policy is None:
                action = venv.action_space.sample()
            else:
                with torch.no_grad():
                    action = policy(torch.from_numpy(obs["x_t"]), torch.from_numpy(obs["t"]))[0].numpy()
            obs, reward, terminated, truncated, _ = venv.step(action)
            returns += reward
            done |= terminated | truncated
        means.append(float(returns.mean()))
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="ReFiT-Synthetic-v0")
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--resets", type=int, default=4)
    parser.add_argument("--slate-size", type=int, default=20)
    parser.add_argument("--metric", default="ndcg", help="hits, recall or ndcg")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.02, 0.1])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| policy | " + " | ".join(f"tau = {t:g}" for t in args.temperatures) + " |")
    print("|---|" + "---|" * len(args.temperatures))
    cells: dict[str, list[str]] = {"pretrained mean": [], "random actions": []}
    for temperature in args.temperatures:
        venv = gym.make_vec(args.env, num_envs=args.users, slate_size=args.slate_size, slate_temperature=temperature,
                            reward={"slate": {"metric": args.metric}})
        policy = DenoiserPolicy(venv.base_model, action_mode="x0", log_std_init=-3.0)
        for name, acting in (("pretrained mean", policy), ("random actions", None)):
            means = mean_return(venv, acting, args.resets)
            cells[name].append(f"{np.mean(means):.3f} (resets {', '.join(f'{m:.3f}' for m in means)})")
    for name, row in cells.items():
        print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
