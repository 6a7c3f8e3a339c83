"""Overhead of the env fronts over a raw torch loop: one full reverse chain for a batch of users.

Each repetition runs a full ``T``-step reverse chain (``ReFiT-ML1M-v0``, DiffRec: T = 40; any
scenario with ``--scenario``) for ``--batch`` users with the base model's denoiser as the policy
in ``x0`` mode (the action is the denoiser's ``x0`` estimate;
the env applies the posterior step plus the schedule's noise, i.e. the base model's own
stochastic chain) and computes the terminal reward (the default held-out log-likelihood):

(a) a raw torch loop: the same maths, no env (users, held-out mask, posterior step, noise,
    reward written out);
(b) the native Gymnasium vector env (numpy in / out; the policy converts with ``from_numpy``);
(c) the TorchRL env (tensors in / out, a step loop without storing the trajectory).

Repetitions are interleaved (a, b, c, a, b, c, ...); the ratios b/a and c/a are taken per
repetition and their median is reported, next to the ratio of the best (least disturbed) times,
since other processes share the machine. Targets: b/a <= 1.10, c/a <= 1.3.

Usage::

    python benchmarks/bench_env.py [--scenario ReFiT-ML1M-v0] [--data DATASET] [--checkpoint DIR] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from refit_gym.checkpoint import load_checkpoint
from refit_gym.data import load_dataset
from refit_gym.data.history import SequenceTable
from refit_gym.envs.core import held_out_counts_tensor
from refit_gym.envs.factory import DEFAULT_REWARD
from refit_gym.envs.policies import diffusion_step
from refit_gym.envs.scenarios import scenario_for
from refit_gym.envs.torchrl_env import DenoisingTorchRLEnv
from refit_gym.envs.vector_env import DenoisingVectorEnv
from refit_gym.rewards import build_reward
from refit_gym.rewards.base import EpisodeBatch, TrainingInteractions
from refit_gym.training.cache import fresh_model


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RawLoop:
    """(a): the chain written out in torch, no env."""

    def __init__(self, scenario: str, model, data, batch: int, device: torch.device) -> None:
        self.model, self.batch, self.device = model, batch, device
        self.diffusion = model.diffusion
        self.histories = SequenceTable(data.train_sequences, data.n_items, device)
        self.reward = build_reward(DEFAULT_REWARD, TrainingInteractions.from_data(data), device)
        self.std = torch.exp(0.5 * self.diffusion.posterior_log_variance_clipped).tolist()
        self.generator = torch.Generator(device=device)

    @torch.no_grad()
    def run(self, seed: int) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        self.generator.manual_seed(seed)
        users = torch.from_numpy(rng.integers(0, self.model.n_users, size=self.batch)).to(self.device)
        history = self.histories.batch(users)
        lengths = history.lengths()
        recent = history.visible_rank() >= (lengths - held_out_counts_tensor(lengths, 0.25)).unsqueeze(1)
        shown = history.hide(recent)
        visible = shown.item_mask()
        held_out = history.item_mask() & ~visible
        inputs = self.model.encode(shown)
        x = self.model.start_state(inputs, torch.randn(self.batch, self.model.state_dim, generator=self.generator,
                                                       device=self.device))
        for t in reversed(range(self.diffusion.steps)):
            step = self.diffusion.timestep_tensor(t, self.batch, self.device)
            x0 = self.diffusion.predict_x0(self.model.denoise(x, step, **inputs.condition), x, t)
            x = self.diffusion.q_posterior_mean_variance(x0, x, t)[0]
            if t > 0:
                x = x + self.std[t] * torch.randn(x.shape, generator=self.generator, device=self.device)
        episode = EpisodeBatch(users=users, visible=visible.float(), held_out=held_out)
        return self.reward(self.model.item_scores(x), episode)


class VectorLoop:
    """(b): the Gymnasium vector front."""

    def __init__(self, scenario: str, model, data, batch: int, device: torch.device) -> None:
        self.env = DenoisingVectorEnv(scenario, num_envs=batch, data=data, model=model, device=device)
        self.model, self.device = self.env.core.model, device

    @torch.no_grad()
    def run(self, seed: int) -> np.ndarray:
        obs, _ = self.env.reset(seed=seed)
        terminated = np.zeros(self.env.num_envs, dtype=bool)
        while not terminated.all():
            x_t = torch.from_numpy(obs["x_t"]).to(self.device)
            step = diffusion_step(torch.from_numpy(obs["t"])).to(self.device)
            condition = {name: torch.from_numpy(obs[name]).to(self.device) for name in self.model.condition_spec()}
            x0 = self.model.diffusion.predict_x0(self.model.denoise(x_t, step, **condition), x_t, step)
            obs, reward, terminated, _, _ = self.env.step(x0.cpu().numpy())
        return reward


class TorchRLLoop:
    """(c): the TorchRL front (a step loop; the trajectory is not stored)."""

    def __init__(self, scenario: str, model, data, batch: int, device: torch.device) -> None:
        self.env = DenoisingTorchRLEnv(scenario, num_envs=batch, data=data, model=model, device=device)
        self.model = self.env.core.model

    @torch.no_grad()
    def run(self, seed: int) -> torch.Tensor:
        self.env.set_seed(seed)
        td = self.env.reset()
        while True:
            step = diffusion_step(td["t"])
            condition = {name: td[name] for name in self.model.condition_spec()}
            x0 = self.model.denoise(td["x_t"], step, **condition)
            td["action"] = self.model.diffusion.predict_x0(x0, td["x_t"], step)
            td = self.env.step(td)["next"]
            if bool(td["done"].all()):
                return td["reward"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", default="ReFiT-ML1M-v0", help="env id (its dataset and base model)")
    parser.add_argument("--data", default=None, help="the dataset (default: the scenario's, from $REFIT_GYM_DATA)")
    parser.add_argument("--checkpoint", default=None,
                        help="a base-model checkpoint (default: the scenario's model, freshly initialised)")
    parser.add_argument("--batch", type=int, default=256, help="users per rollout")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions of (a, b, c)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    config = scenario_for(args.scenario).experiment()
    data = load_dataset(args.data or config.data.dataset, data_dir=config.data.data_dir)
    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint, data, device="cpu")
    else:
        model = fresh_model(config, data)
    model.eval().requires_grad_(False)
    model = model.to(device)
    print(f"{args.scenario}: data {data.name}: {data.n_users} users x {data.n_items} items; base "
          f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'freshly initialised ' + model.name}; "
          f"T = {model.diffusion.steps}; batch {args.batch}; device {device}; {torch.get_num_threads()} threads")

    variants = {}
    memory = {"baseline": {"peak_rss_mb_after_warmup": peak_rss_mb(), "rss_mb_after_warmup": current_rss_mb()}}
    for name, cls in (("a_raw", RawLoop), ("b_vector", VectorLoop), ("c_torchrl", TorchRLLoop)):
        variants[name] = cls(args.scenario, model, data, args.batch, device)
        variants[name].run(seed=10_000)  # warm-up
        memory[name] = {"peak_rss_mb_after_warmup": peak_rss_mb(), "rss_mb_after_warmup": current_rss_mb()}

    times: dict[str, list[float]] = {name: [] for name in variants}
    rewards: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, variant in variants.items():
            start = time.perf_counter()
            reward = variant.run(seed=repeat)
            times[name].append(time.perf_counter() - start)
            rewards[name].append(float(torch.as_tensor(reward).float().mean().cpu()))  # numpy or any device

    steps = model.diffusion.steps
    b_over_a = [b / a for a, b in zip(times["a_raw"], times["b_vector"])]
    c_over_a = [c / a for a, c in zip(times["a_raw"], times["c_torchrl"])]
    result = {
        "data": data.name,
        "batch": args.batch,
        "steps": steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "seconds": times,
        "median_seconds": {name: statistics.median(t) for name, t in times.items()},
        "user_steps_per_second": {name: args.batch * steps / statistics.median(t) for name, t in times.items()},
        "ratio_b_over_a": {
            "median": statistics.median(b_over_a),
            "of_best_times": min(times["b_vector"]) / min(times["a_raw"]),
            "all": b_over_a,
        },
        "ratio_c_over_a": {
            "median": statistics.median(c_over_a),
            "of_best_times": min(times["c_torchrl"]) / min(times["a_raw"]),
            "all": c_over_a,
        },
        "mean_terminal_reward": {name: statistics.mean(r) for name, r in rewards.items()},
        "memory": memory,
        "peak_rss_mb": peak_rss_mb(),
    }
    print(f"{'variant':<10} {'median s':>9} {'user-steps/s':>13} {'mean reward':>12}")
    for name in variants:
        print(f"{name:<10} {result['median_seconds'][name]:9.3f} {result['user_steps_per_second'][name]:13.0f} "
              f"{result['mean_terminal_reward'][name]:12.4f}")
    for label, key, target in (("b/a", "ratio_b_over_a", 1.10), ("c/a", "ratio_c_over_a", 1.30)):
        ratio = result[key]
        print(f"{label}: median of per-repeat ratios {ratio['median']:.3f}, ratio of best times "
              f"{ratio['of_best_times']:.3f} (target <= {target:.2f}); per repeat "
              + " ".join(f"{r:.3f}" for r in ratio["all"]))
    peaks = ", ".join(f"{name} {value['peak_rss_mb_after_warmup']:.0f}" for name, value in memory.items())
    print(f"peak RSS (MB) after loading (baseline) and after each variant's warm-up: {peaks}; "
          f"process peak {result['peak_rss_mb']:.0f}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
