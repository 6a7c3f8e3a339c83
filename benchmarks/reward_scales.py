"""Measure: the scale of every built-in reward term on ``ReFiT-Synthetic-v0`` (for ``docs/rewards.md``).

One episode per seed (``reset(seed=s)``, ``s = 0 .. episodes - 1``, so each seed draws its own
user) through the single-user Gymnasium env, with every built-in term in the reward at weight 1
and the held-out shaping switched on, for two policies:

* ``pretrained``: the pretrained denoiser as the policy (its ``x0`` estimate as the action, the
  env adding the schedule's posterior noise), as in the env docstring's "Typical returns";
* ``random``: uniformly random actions from the action space (seeded with the episode's seed).

Prints, per term, the mean and the standard deviation over episodes of its unweighted value at
the terminal step (``info["reward_terms"]``), and of the episode's summed shaping rewards.

Usage::

    python benchmarks/reward_scales.py [--episodes 100]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import gymnasium as gym
import numpy as np
import torch

import refit_gym  # noqa: F401  (registers the ids)
from refit_gym.envs.policies import denoiser_action

REWARD = {"loglik": 1.0, "likelihood": 1.0, "collaborative": {"k": 20}, "recall": {"k": 20}, "ndcg": {"k": 20}}


def run(policy: str, episodes: int) -> dict[str, list[float]]:
    env = gym.make("ReFiT-Synthetic-v0", reward=REWARD, shaping="held_out")
    base = env.unwrapped.base_model
    values: dict[str, list[float]] = defaultdict(list)
    for seed in range(episodes):
        observation, _ = env.reset(seed=seed)
        env.action_space.seed(seed)
        shaping, done = 0.0, False
        while not done:
            if policy == "pretrained":
                x_t = torch.as_tensor(observation["x_t"]).unsqueeze(0)
                t = torch.as_tensor(observation["t"]).unsqueeze(0)
                with torch.no_grad():
                    action = denoiser_action(base.denoise, base.diffusion, x_t, t, "x0")[0].numpy()
            else:
                action = env.action_space.sample()
            observation, _, done, _, info = env.step(action)
            shaping += info["reward_terms"]["shaping"]
        for name, value in info["reward_terms"].items():
            if name != "shaping":
                values[name].append(value)
        values["shaping (episode sum)"].append(shaping)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=100)
    args = parser.parse_args()
    results = {policy: run(policy, args.episodes) for policy in ("pretrained", "random")}
    print(f"| term | pretrained denoiser | random actions |  ({args.episodes} episodes, mean ± std)")
    print("|---|---|---|")
    for name in results["pretrained"]:
        cells = [f"{np.mean(results[p][name]):.3g} ± {np.std(results[p][name]):.2g}" for p in results]
        print(f"| `{name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
