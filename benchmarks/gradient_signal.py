"""Does each agent's gradient estimate carry signal? Pair cosine, cosine to the exact gradient, norm, cost.

From one pretrained checkpoint, for each agent of ``--agents`` (its learner built as the trainer
builds it, at the config's batch: ``finetune.users_per_batch`` users x its chains per user,
``rollouts_per_user`` or, for ``supervised`` and the slate agents on a deterministic chain (whose
``rollouts_per_user`` slates share one chain), 1),
on ``--repeats`` batches of users (different users each, the same batches for every agent),
:func:`agents.gradient_signal.gradient_signal` measures at the pretrained weights:

* **pair cosine**: the cosine between two independent estimates on the same users and hidden
  items (only the agent's own draws differ: exploration noise, categorical samples); 1 = no
  sampling noise, ~0 = mostly noise at this batch size;
* **exact cosine**: the cosine between the estimate and the exact gradient of the held-out
  negative log-likelihood (what ``supervised`` descends) on the same users and hidden items;
  positive = it points the way the supervised gradient does;
* the **norms** of the estimate and of the exact gradient, and the **seconds** per estimate.

Mean ± std over the repeats. ``sees`` is what the agent may see (``agents.base.SEES``): (a) only
the reward of its actions, (b) the reward plus its own probabilities, (c) the exact objective's
gradient.

An entry of ``--agents`` is an agent name or ``AGENT@VARIANT``; :data:`RECIPES` gives the
defaults' overrides of the config's ``finetune`` section (as ``benchmarks/finetune_table.py``'s
recipes: ``reinforce`` and ``ppo`` with the log-likelihood reward; ``reinforce@categorical`` the
categorical last step alone, 16 importance-weighted samples per rollout, the Gaussian term off).
``--agent-set LABEL:KEY=VALUE`` overrides one entry's ``finetune`` key, ``--set KEY=VALUE`` any
config field of every entry. Usage::

    REFIT_GYM_DATA=../shared/data python benchmarks/gradient_signal.py \\
        --pretrained runs/table/pretrain/diffrec-p0 --config configs/ml1m_diffrec.yaml --repeats 3 --threads 1 \\
        [--agents refit,supervised,reinforce,reinforce@categorical,ppo] \\
        [--agent-set reinforce@categorical:categorical_samples=64] [--set finetune.users_per_batch=64] \\
        [--output runs/gradient_signal/ml1m_diffrec.json]

It prints the markdown table and writes it (``.md``) beside the JSON (every repeat's numbers).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

PG_REWARD = {"loglik": {"weight": 1.0, "temperature": 0.1}}
RECIPES: dict[str, dict[str, Any]] = {
    "refit": {},
    "supervised": {"agent": "supervised"},
    "reinforce": {"agent": "reinforce", "reward": PG_REWARD, "pg_weight": 1.0},
    "reinforce@categorical": {"agent": "reinforce", "reward": PG_REWARD, "pg_weight": 0.0, "categorical_samples": 16},
    "ppo": {"agent": "ppo", "reward": PG_REWARD},
}
"""Overrides of the config's ``finetune`` section per ``--agents`` entry (an entry not here: none; ``refit``:
the config's recipe, which for ``configs/ml1m_dreamrec.yaml`` is the likelihood term alone)."""
DEFAULT_AGENTS = "refit,supervised,reinforce,reinforce@categorical,ppo"
MEASURES = ("pair_cosine", "exact_cosine", "norm", "exact_norm", "seconds")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", required=True, help="a pretrained checkpoint folder")
    parser.add_argument("--config", default="configs/ml1m_diffrec.yaml", help="the experiment config (data, finetune)")
    parser.add_argument("--agents", default=DEFAULT_AGENTS, help="comma-separated: agent names or AGENT@VARIANT")
    parser.add_argument("--agent-set", action="append", default=[], metavar="LABEL:KEY=VALUE",
                        help="override one entry's finetune key (e.g. reinforce@categorical:categorical_samples=64)")
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                        help="override a config field of every entry (e.g. finetune.users_per_batch=64)")
    parser.add_argument("--repeats", type=int, default=5, help="batches of users (different users each)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the batches of users and every estimate's draws")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="runs/gradient_signal/gradient_signal.json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def entries(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``label -> finetune overrides`` (the agent included) of every ``--agents`` entry."""
    from agents import agent_class
    from refit_gym.cli import parse_key_values

    labels = [label for label in args.agents.split(",") if label]
    out = {}
    for label in labels:
        agent = label.partition("@")[0]
        agent_class(agent)  # ConfigError naming the known agents
        out[label] = {**RECIPES.get(label, {}), "agent": agent}
    for item in args.agent_set:
        label, sep, assignment = item.partition(":")
        if not sep or label not in out:
            raise SystemExit(f"--agent-set {item!r}: expected LABEL:KEY=VALUE with LABEL one of --agents {labels}")
        values = parse_key_values([assignment], "--agent-set", "reinforce@categorical:categorical_samples=64")
        out[label].update({key.removeprefix("finetune."): value for key, value in values.items()})
    return out


def user_batches(n_users: int, batch: int, repeats: int, seed: int) -> list[np.ndarray]:
    """``repeats`` batches of ``batch`` distinct users: consecutive slices of seeded permutations."""
    from agents.trainer import UserSampler

    sampler, rng = UserSampler(n_users, batch), np.random.default_rng(seed)
    return [sampler.next(rng) for _ in range(repeats)]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from agents import agent_class
    from agents.config import finetune_config
    from agents.gradient_signal import gradient_signal
    from agents.trainer import build_learner
    from refit_gym.checkpoint import load_checkpoint
    from refit_gym.cli import parse_overrides
    from refit_gym.config import load_config
    from refit_gym.data import load_dataset
    from refit_gym.runtime import autocast, tune_cpu_runtime

    tune_cpu_runtime()  # as the CLI and the other benchmarks
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config, {"device": args.device, **parse_overrides(args.sets)})
    recipes = entries(args)
    data = load_dataset(config.data.dataset)
    base, _ = load_checkpoint(args.pretrained, data, device=args.device)
    rows = []
    for label, overrides in recipes.items():
        settings = finetune_config(config.finetune, **overrides)
        learner = build_learner(settings, base, data, args.device)
        batches = user_batches(data.n_users, settings.users_per_batch, args.repeats, args.seed)
        repeats = []
        for index, users in enumerate(batches):
            with autocast(settings.precision, args.device):
                repeats.append(gradient_signal(learner, users, (args.seed, index)))
        summary = {key: (statistics.mean(r[key] for r in repeats),
                         statistics.stdev(r[key] for r in repeats) if len(repeats) > 1 else 0.0) for key in MEASURES}
        own = {k: v for k, v in overrides.items() if k != "agent"}
        rows.append({"label": label, "agent": settings.agent, "overrides": own,
                     "sees": agent_class(settings.agent).information(settings), "users": len(batches[0]),
                     "chains_per_user": learner.group_size, "repeats": repeats, "summary": summary})
        del learner
    return {"config": str(args.config), "pretrained": str(args.pretrained), "dataset": config.data.dataset,
            "device": args.device, "threads": torch.get_num_threads(), "seed": args.seed, "n_repeats": args.repeats,
            "rows": rows}


def table(report: dict[str, Any]) -> str:
    """The markdown table of a report."""
    def cell(summary, key, digits=3):
        mean, std = summary[key]
        return f"{mean:.{digits}f} ± {std:.{digits}f}" if digits else f"{mean:.3g} ± {std:.2g}"

    lines = [f"Gradient signal at the pretrained weights of {report['pretrained']} ({report['dataset']}), "
             f"mean ± std over {report['n_repeats']} batches of users; {report['device']}, "
             f"{report['threads']} thread(s). Command: `{report['command']}`", "",
             "| agent | overrides | sees | users x chains per user | pair cosine | exact cosine | norm | exact norm "
             "| s / estimate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        overrides = ", ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in row["overrides"].items()) or "-"
        s = row["summary"]
        lines.append(f"| {row['label']} | {overrides} | {row['sees']} | {row['users']} x {row['chains_per_user']} | "
                     f"{cell(s, 'pair_cosine')} | {cell(s, 'exact_cosine')} | {cell(s, 'norm', 0)} | "
                     f"{cell(s, 'exact_norm', 0)} | {cell(s, 'seconds', 2)} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    report = measure(args)
    arguments = sys.argv[1:] if argv is None else argv
    report["command"] = shlex.join(["python", "benchmarks/gradient_signal.py", *arguments])
    report["seconds"] = time.perf_counter() - started
    markdown = table(report)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1))
    output.with_suffix(".md").write_text(markdown)
    print(markdown, end="")
    return report


if __name__ == "__main__":
    main()
