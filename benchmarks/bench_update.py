"""Cost of one fine-tuning update, with the policy's condition encoded once per rollout or once per step.

An update (``agents.Agent.update``: collect the rollouts, the loss, the optimiser step) evaluates
the policy at every exposed step of a rollout and again at every trained step. A model whose
condition does not depend on ``x_t`` (DreamRec's history encoder) can encode it once for all of
them (:meth:`refit_gym.models.BaseModel.step_denoiser`, used by
:meth:`refit_gym.envs.policies.DenoiserPolicy.loc_function`). This benchmark runs the same
updates two ways in one process, repetitions interleaved, from the same starting weights:

* ``once``: the library as it is;
* ``per step``: ``loc_function`` replaced by a loop over ``loc``, which encodes the condition at
  every call (the code before the change).

It reports seconds per update (median of the repetitions, and the best) and the ratio, and
checks that the two ways give the same losses (exactly without the policy-gradient term; up to
rounding with it, the trained steps' gradient being the same sum in another order).

Usage::

    REFIT_GYM_DATA=../shared/data python benchmarks/bench_update.py --config configs/beauty_dreamrec.yaml \\
        [--pretrained runs/.../beauty_dreamrec-p3] [--updates 4] [--repeats 2] [--threads 1] [--set finetune.pg_weight=0]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np
import torch

from agents.config import finetune_config
from agents.trainer import build_learner
from refit_gym.checkpoint import load_checkpoint
from refit_gym.cli import parse_overrides
from refit_gym.config import load_config
from refit_gym.data import load_dataset
from refit_gym.runtime import autocast, tune_cpu_runtime
from refit_gym.training.cache import fresh_model


def per_step_loc_function(policy):
    """The reference: ``loc`` at every call (the condition encoded each time)."""
    return lambda **context: (lambda x_t, t: policy.loc(x_t, t, **context))


def timed_updates(agent, start: tuple[dict, dict], data, settings, n_updates: int, seed: int) -> tuple[float, list[float]]:
    """Seconds per update over ``n_updates`` from ``start`` (the policy's and the optimiser's
    states), and the losses; under the run's precision, as the trainer runs an update."""
    agent.policy.load_state_dict(start[0])
    agent.optimizer.load_state_dict(copy.deepcopy(start[1]))
    rng, generator = np.random.default_rng(seed), torch.Generator(device=agent.core.device).manual_seed(seed)
    losses, begin = [], time.perf_counter()
    for _ in range(n_updates):
        users = rng.choice(data.n_users, min(settings.users_per_batch, data.n_users), replace=False)
        with autocast(settings.precision, agent.core.device):
            losses.append(agent.update(users, rng, generator)["loss"])
    return (time.perf_counter() - begin) / n_updates, losses


def compare(agent, data, settings, n_updates: int = 4, repeats: int = 2, seed: int = 0) -> dict:
    """Both ways from the same weights, each warmed up once, in the order once, per step, per step,
    once, ... (so neither always runs first); the report printed by :func:`main`."""
    start = copy.deepcopy(agent.policy.state_dict()), copy.deepcopy(agent.optimizer.state_dict())
    ways = {"once": agent.policy.loc_function, "per step": per_step_loc_function(agent.policy)}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    losses: dict[str, list[float]] = {}
    try:
        for name, loc_function in ways.items():  # warm-up
            agent.policy.loc_function = loc_function
            timed_updates(agent, start, data, settings, 1, seed + 1)
        for repeat in range(repeats):
            for name in (list(ways) if repeat % 2 == 0 else list(ways)[::-1]):
                agent.policy.loc_function = ways[name]
                elapsed, losses[name] = timed_updates(agent, start, data, settings, n_updates, seed)
                seconds[name].append(elapsed)
    finally:
        del agent.policy.loc_function  # back to the class's method
        agent.policy.load_state_dict(start[0])
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "updates": n_updates,
        "seconds_per_update": {name: [round(v, 3) for v in values] for name, values in seconds.items()},
        "median_per_step_over_once": round(median["per step"] / median["once"], 2),
        "best_per_step_over_once": round(min(seconds["per step"]) / min(seconds["once"]), 2),
        "largest_loss_difference": max(abs(a - b) for a, b in zip(losses["once"], losses["per step"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--pretrained", default=None,
                        help="a pretrained checkpoint directory (default: fresh weights; the cost is the same)")
    parser.add_argument("--data", default=None, help="dataset (default: the config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--updates", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tune_cpu_runtime()
    torch.set_num_threads(args.threads)
    config = load_config(args.config, parse_overrides(args.set))
    data = load_dataset(args.data or config.data.dataset)
    base = load_checkpoint(args.pretrained, data)[0] if args.pretrained else fresh_model(config, data)
    settings = finetune_config(config.finetune)
    agent = build_learner(settings, base.to(args.device), data, device=args.device,
                          pretraining_reweight=config.diffusion.reweight)
    report = compare(agent, data, settings, args.updates, args.repeats, args.seed)
    print(json.dumps({"config": args.config, "overrides": args.set, "threads": args.threads, "device": args.device,
                      **report}, indent=2))


if __name__ == "__main__":
    main()
