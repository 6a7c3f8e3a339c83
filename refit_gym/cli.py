"""The ``refit-gym`` command line: pretrain, evaluate, baselines, data download, env listing, the main job.

Machine-readable results (metrics JSON) go to stdout; progress bars and messages go to stderr,
so ``refit-gym evaluate ... > metrics.json`` captures exactly the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from refit_gym.errors import ConfigError, RefitGymError
from refit_gym.runtime import PRECISIONS, tune_cpu_runtime


def _main_process() -> bool:
    """Not a data-parallel rank other than 0 (under torchrun only rank 0 reports)."""
    return os.environ.get("RANK", "0") == "0"


def _log(message: str) -> None:
    if _main_process():
        print(message, file=sys.stderr, flush=True)


def _load_data(dataset: str, data_dir: Optional[str]):
    from refit_gym.data import load_dataset

    data = load_dataset(dataset, data_dir=data_dir)
    summary = data.summary()
    _log(f"data: {summary['name']} ({summary['n_users']} users x {summary['n_items']} items, "
         f"{summary['n_train']} train / {summary['n_valid']} valid / {summary['n_test']} test)")
    return data


def parse_key_values(items: Sequence[str], flag: str = "--set", example: str = "finetune.lr=3e-5") -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` -> ``{KEY: VALUE}``, values read as YAML (``3e-5`` is a number,
    ``{loglik: 1.0}`` a mapping); ``flag`` and ``example`` name the option in errors."""
    from refit_gym.config import read_yaml

    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} expects KEY=VALUE (e.g. {example}), got {item!r}")
        try:
            values[key.strip()] = read_yaml(value)
        except ConfigError as error:
            raise ConfigError(f"{flag} value {value!r} is {error}") from None
    return values


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["finetune.lr=3e-5", ...]`` -> ``{"finetune.lr": 3e-5}`` (``--set``)."""
    return parse_key_values(items, "--set", "finetune.lr=3e-5")


def validate_experiment(config: Any, command: str) -> None:
    """Validate every section a command will use, before any work starts (a typo in the
    ``finetune`` section must not surface after minutes of pretraining)."""
    from refit_gym.envs.scenarios import env_config

    env_config(config.env)
    if command in ("finetune", "run"):
        from agents.config import finetune_config

        finetune_config(config.finetune)


def _parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``["hidden=128", ...]`` (``baseline --param``) -> ``{"hidden": 128}``."""
    return parse_key_values(items, "--param", "hidden=128")


def _experiment(args) -> Any:
    from refit_gym.config import load_config

    overrides = parse_overrides(getattr(args, "overrides", []))
    if getattr(args, "seed", None) is not None:
        overrides["seed"] = args.seed
    if getattr(args, "data", None):
        overrides["data.dataset"] = args.data
    if getattr(args, "device", None):
        overrides["device"] = args.device
    config = load_config(args.config, overrides)
    validate_experiment(config, args.command)
    return config


def _write_topk(path: str, top_items: np.ndarray, data: Any) -> None:
    """Row ``u`` = user ``u``'s top items, with item ids numbered as the dataset's files number them
    (a DiffuRec pickle's ids are 1-based: the loader's ``item_id_shift`` is undone; ``-1`` pads)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    shift = int((data.extras or {}).get("item_id_shift", 0))
    top_items = top_items.astype(np.int64)
    if shift:
        top_items = np.where(top_items >= 0, top_items - shift, top_items)
    np.save(out, top_items, allow_pickle=False)
    _log(f"wrote the top-{top_items.shape[1]} items of {top_items.shape[0]} users to {out}")


def _print_metrics(metrics: dict[str, float]) -> None:
    if _main_process():
        print(json.dumps(metrics, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------- commands
def cmd_pretrain(args) -> int:
    from refit_gym.training.pretrain import pretrain

    from refit_gym.training.run_folder import RunFolder

    config = _experiment(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    RunFolder.check(args.output, "pretrain", {**config.to_dict(), "init_from": "None", "processes": world},
                    args.resume, args.overwrite)
    data = _load_data(config.data.dataset, config.data.data_dir)
    result = pretrain(config, data, output_dir=args.output, progress=not args.no_progress, log=_log,
                      report_test=args.report_test, resume=args.resume, overwrite=args.overwrite)
    _log(f"best checkpoint (epoch {result.best_epoch}) in {args.output}")
    _print_metrics({"best_epoch": result.best_epoch, **{f"{s}/{k}": v for s, m in result.best_metrics.items() for k, v in m.items()}})
    return 0


def cmd_evaluate(args) -> int:
    from refit_gym.checkpoint import load_checkpoint, read_checkpoint_config
    from refit_gym.config import resolve_device
    from refit_gym.evaluation.evaluator import evaluate, protocol_from_config
    from refit_gym.training.run_folder import run_status

    description = read_checkpoint_config(args.checkpoint)
    experiment = description["experiment"]
    dataset = args.data or experiment["data"]["dataset"]
    data = _load_data(dataset, experiment["data"].get("data_dir"))
    device = resolve_device(args.device or "auto")
    model, config = load_checkpoint(args.checkpoint, data, device=device)
    status = run_status(args.checkpoint)
    if status not in (None, "finished"):
        _log(f"warning: {args.checkpoint} comes from a run that has not finished (status {status!r}: it was "
             "interrupted, or is still going); these are the metrics of its best checkpoint so far. Resume it with "
             "--resume")
    protocol = protocol_from_config(config.evaluation, model)
    if args.mask_history is not None:
        protocol = dataclasses.replace(protocol, mask_history=args.mask_history)
    result = evaluate(model, data, splits=(args.split,), ks=config.evaluation.ks, batch_size=config.evaluation.batch_size,
                      precision=args.precision or config.evaluation.precision, protocol=protocol,
                      device=device, export_topk=args.k if args.export_topk else None, progress=not args.no_progress)
    if args.export_topk:
        _write_topk(args.export_topk, result.top_items[args.split], data)
    _print_metrics(result.metrics[args.split])
    return 0


def cmd_baseline(args) -> int:
    from refit_gym.baselines import build_baseline, fit_baseline, tune_ease
    from refit_gym.baselines.ease import DEFAULT_W_MIN_GRID
    from refit_gym.config import resolve_device
    from refit_gym.evaluation.evaluator import evaluate, protocol_from_config

    config = _experiment(args)
    if args.name != "sasrec" and (args.params or args.tune):
        raise ConfigError(f"--param and --tune are SASRec options; {args.name!r} takes none")
    data = _load_data(config.data.dataset, config.data.data_dir)
    device = resolve_device(config.device)
    extra: dict[str, Any] = {}
    recency = args.name == "ease-recency"
    if args.name == "sasrec":
        recommender, extra = _fit_sasrec(args, config, data, device)
    elif args.name.startswith("ease") and (args.l2 is None or (recency and args.w_min is None)):
        l2_grid = None if args.l2 is None else (args.l2,)
        w_grid = None if not recency else (None if args.w_min is None else (args.w_min,))
        tuning = tune_ease(data, **({"l2_grid": l2_grid} if l2_grid else {}),
                           w_min_grid=(w_grid or DEFAULT_W_MIN_GRID) if recency else None, device=device,
                           progress=not args.no_progress)
        recommender = tuning.model
        extra = {"ease_l2": tuning.best_l2, **({"w_min": tuning.best_w_min} if recency else {})}
        chosen = f"l2 = {tuning.best_l2:g}" + (f", w_min = {tuning.best_w_min:g}" if recency else "")
        _log(f"{args.name}: {chosen} chosen on validation recall@20 ({tuning.best_score:.4f})")
    else:
        kwargs = {"l2": args.l2, "device": device} if args.name.startswith("ease") else {}
        if recency:
            kwargs["w_min"] = args.w_min
        recommender = fit_baseline(build_baseline(args.name, **kwargs), data)
    result = evaluate(recommender, data, splits=(args.split,), ks=config.evaluation.ks, device=device,
                      batch_size=config.evaluation.batch_size, export_topk=args.k if args.export_topk else None,
                      protocol=protocol_from_config(config.evaluation, recommender))
    if args.export_topk:
        _write_topk(args.export_topk, result.top_items[args.split], data)
    _print_metrics({**result.metrics[args.split], **extra})
    return 0


def _fit_sasrec(args, config: Any, data: Any, device: Any) -> tuple[Any, dict[str, Any]]:
    """SASRec with the config's seed, device and evaluation protocol, ``--param`` overrides; ``--tune``:
    the default grid chosen on validation."""
    from refit_gym.baselines import DEFAULT_SASREC_GRID, SASRecRecommender, tune_sasrec
    from refit_gym.baselines.sasrec import print_log

    params = {"seed": config.seed, "device": str(device), "protocol": config.evaluation.protocol or "sequential",
              "mask_history": config.evaluation.mask_history, "eval_batch_size": config.evaluation.batch_size,
              **_parse_params(args.params)}
    log = None if args.no_progress else print_log
    if args.tune:
        grid = {name: values for name, values in DEFAULT_SASREC_GRID.items() if name not in params}
        tuning = tune_sasrec(data, grid, log=log, **params)
        model = tuning.model
        _log(f"sasrec: {tuning.best_params} chosen on validation {tuning.metric} ({tuning.best_score:.4f})")
        extra = {f"sasrec_{name}": value for name, value in tuning.best_params.items()}
    else:
        model = SASRecRecommender(**params).fit(data, log=log)
        extra = {}
    config_metric = model.config.metric
    _log(f"sasrec: best valid {config_metric} {model.best_score:.4f} at epoch {model.best_epoch} "
         f"({len(model.log)} epochs, {model.epoch_seconds:.1f} s/epoch)")
    return model, {**extra, "sasrec_best_epoch": model.best_epoch, "sasrec_epochs": len(model.log)}


def cmd_finetune(args) -> int:
    from agents.trainer import finetune
    from agents.config import finetune_config
    from refit_gym.training.cache import cached_checkpoint, pretrained_checkpoint
    from refit_gym.training.run_folder import RunFolder

    config = _experiment(args)
    data = _load_data(config.data.dataset, config.data.data_dir)
    settings = finetune_config(config.finetune, **({"agent": args.agent} if args.agent else {}))
    pretrained = args.pretrained or cached_checkpoint(config, data)
    planned = {**config.to_dict(), "finetune": settings.to_dict(), "pretrained": str(pretrained)}
    RunFolder.check(args.output, "finetune", planned, args.resume, args.overwrite, inputs=(pretrained,))
    if not args.pretrained:  # (checked first: no pretraining for a command that is refused)
        pretrained = pretrained_checkpoint(config, data, progress=not args.no_progress, log=_log)
    result = finetune(config, data, pretrained, args.output, agent=args.agent, resume=args.resume,
                      overwrite=args.overwrite, progress=not args.no_progress, log=_log, report_test=args.report_test)
    _log(f"best fine-tuned checkpoint (update {result.best_update}) in {args.output}")
    _print_metrics({"best_update": result.best_update,
                    **{f"{s}/{k}": v for s, m in result.best_metrics.items() for k, v in m.items()}})
    return 0


def cmd_run(args) -> int:
    from agents.pipeline import run_main_job

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("refit-gym run is one process: under torchrun, run `pretrain` and then `finetune "
                          "--pretrained DIR` (both are data-parallel)")
    config = _experiment(args)
    run_main_job(config, args.output, pretrained=args.pretrained, progress=not args.no_progress, log=_log,
                 report_test=args.report_test, resume=args.resume, overwrite=args.overwrite)
    if _main_process():
        print((Path(args.output) / "results.md").read_text(), end="")  # the table on stdout: `> table.md` keeps it
    _log(f"results in {args.output}/results.json and results.md; the checkpoints are {args.output}/pretrained "
         f"and {args.output}/finetuned (refit-gym evaluate --checkpoint ...)")
    return 0


def cmd_download(args) -> int:
    from refit_gym.data import download_movielens_1m, resolve_data_dir

    target = resolve_data_dir(args.data_dir)
    path = download_movielens_1m(target, progress=not args.no_progress)
    _log(f"ML-1M is ready in {path}; use it with --data {path}")
    return 0


def cmd_envs(args) -> int:
    from refit_gym.envs.registration import list_envs

    for env_id, description in list_envs():
        print(f"{env_id:<26} {description}")
    return 0


def holdout_text(holdout: str, fraction: float, count: Optional[int]) -> str:
    """What an env hides from its input, in words (``refit-gym info``)."""
    if holdout == "none":
        return "none"
    if count is not None:
        return f"{holdout}: {count} item{'s' if count != 1 else ''} per user"
    return f"{holdout}: {100 * fraction:g}% of each user's training items"


def cmd_info(args) -> int:
    """What an env is: its YAML, versions, base model, chain, spaces, reward and dataset."""
    from refit_gym.envs.factory import build_env_parts
    from refit_gym.envs.scenarios import scenario_for
    from refit_gym.envs.spaces import single_action_space, single_observation_space

    scenario = scenario_for(args.env_id)
    config = scenario.experiment()
    print(f"{scenario.env_id}: {scenario.description}")
    print(f"  defined by   {scenario.path}")
    for version in scenario.versions:
        print(f"  version      {version}")
    parts = build_env_parts(scenario.env_id, pretrained=False, data_dir=args.data_dir)  # no pretraining needed
    core, data = parts.core, parts.data
    model = core.model
    print(f"  base model   {model.name} ({type(model).__module__}), state x_t of {core.state_dim} values, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"  chain        T = {core.steps} reverse steps, the agent takes the last {core.exposed_steps} "
          f"(episode length), action_mode {core.action_mode}, "
          f"hold-out {holdout_text(core.holdout, core.holdout_fraction, core.holdout_count)}")
    print(f"  observation  {single_observation_space(core)}")
    print(f"  action       {single_action_space(core)}")
    print(f"  reward       {json.dumps(core.config()['reward'])}")
    summary = data.summary()
    print(f"  data         {summary['name']}: {summary['n_users']:,} users x {summary['n_items']:,} items, "
          f"{summary['n_train']:,} train / {summary['n_valid']:,} valid / {summary['n_test']:,} test, density "
          f"{summary['density']:.2%}")
    print(f"  evaluation   protocol {config.evaluation.protocol or model.protocol}, ks {config.evaluation.ks}, "
          f"select on valid {config.pretrain.select_metric}")
    return 0


def cmd_plot(args) -> int:
    """Training curves of one or several runs, side by side (one line per run, one panel per column)."""
    import csv

    from refit_gym.training.run_log import plot_runs

    runs, x = {}, None
    for folder in args.runs:
        log = Path(folder) / "log.csv"
        if not log.is_file():
            raise ConfigError(f"{folder} holds no log.csv: pass the --output folder of a pretrain or finetune run")
        with log.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            raise ConfigError(f"{log} is empty")
        runs[str(folder)] = rows
        x = x or next(iter(rows[0]))
    columns = args.columns.split(",") if args.columns else [
        "train_loss", "valid_recall@20", "valid_ndcg@20", "reward/total", "held_out_mass", "kl_to_pretrained",
        "grad_norm", "valid_hr@20"]
    path = plot_runs(runs, x, columns, args.output, title=args.title)
    if path is None:
        raise ConfigError(f"none of the columns {columns} is in the logs (or matplotlib is missing)")
    _log(f"wrote {path} ({len(runs)} run(s))")
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refit-gym", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def common(p, config=True, data=True):
        if config:
            p.add_argument("--config", required=True, help="experiment YAML (see configs/)")
        if data:
            p.add_argument("--data", help="dataset: a name under $REFIT_GYM_DATA, a DiffRec split folder, "
                                          "a ratings file, a CSV, or synthetic[:k=v,...]")
        if config:
            p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                           help="override a config field (dotted key, YAML value), e.g. finetune.lr=3e-5; repeatable")
        p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the config's, or auto)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    report_test = "evaluate the selected checkpoint on test once, at the end (test is sealed otherwise)"

    def run_folder(p):
        group = p.add_mutually_exclusive_group()
        group.add_argument("--resume", action="store_true",
                           help="continue the unfinished run in --output (same config; refused otherwise)")
        group.add_argument("--overwrite", action="store_true",
                           help="replace the run already in --output (a folder holding a run is refused otherwise)")
    p = commands.add_parser("pretrain", help="train a base diffusion recommender until it converges")
    common(p)
    p.add_argument("--output", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--report-test", action="store_true", help=report_test)
    run_folder(p)
    p.set_defaults(handler=cmd_pretrain)

    p = commands.add_parser("evaluate", help="evaluate a checkpoint; prints a metrics JSON on stdout")
    common(p, config=False)
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (pretrained or fine-tuned)")
    p.add_argument("--split", choices=("valid", "test"), required=True)
    p.add_argument("--export-topk", metavar="FILE.npy", help="write each user's ranked top-k item ids (int64, n_users x k)")
    p.add_argument("--k", type=int, default=100, help="k for --export-topk (default 100)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="fp32, or bf16 autocast of the scoring chain (default: the checkpoint's evaluation.precision; "
                        "docs/devices.md)")
    p.add_argument("--mask-history", action=argparse.BooleanOptionalAction, default=None,
                   help="exclude (or, --no-mask-history, rank) the items seen before the split (default: the "
                        "checkpoint's evaluation.mask_history: excluded for cf, ranked for sequential; docs/evaluation.md)")
    p.set_defaults(handler=cmd_evaluate)

    p = commands.add_parser("baseline", help="fit and evaluate a baseline (popularity, EASE, recency-weighted EASE, "
                                             "SASRec)")
    p.add_argument("name", choices=("popularity", "ease", "ease-recency", "sasrec"))
    common(p)
    p.add_argument("--split", choices=("valid", "test"), required=True)
    p.add_argument("--l2", type=float, help="EASE's l2; default: tuned on validation recall@20")
    p.add_argument("--w-min", type=float, dest="w_min",
                   help="ease-recency: weight of a user's oldest item (the newest gets 1); default: tuned on validation")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", dest="params",
                   help="sasrec: a hyper-parameter (YAML value), e.g. max_epochs=50 or hidden=128; repeatable "
                        "(docs/evaluation.md)")
    p.add_argument("--tune", action="store_true",
                   help="sasrec: choose hidden, dropout and max_len on validation ndcg@10 (8 fits)")
    p.add_argument("--export-topk", metavar="FILE.npy")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--seed", type=int)
    p.set_defaults(handler=cmd_baseline)

    p = commands.add_parser("finetune", help="fine-tune a pretrained model with an RL agent (ReFiT)")
    common(p)
    p.add_argument("--pretrained", help="pretrained checkpoint directory (default: pretrain the config's model, cached)")
    p.add_argument("--output", required=True, help="checkpoint directory to write (evaluate reads it)")
    p.add_argument("--agent", help="refit (default), supervised, reinforce, ppo, torchrl-ppo, sb3-ppo")
    p.add_argument("--seed", type=int)
    p.add_argument("--report-test", action="store_true", help=report_test)
    run_folder(p)
    p.set_defaults(handler=cmd_finetune)

    p = commands.add_parser("run", help="the main job: pretrain -> fine-tune -> evaluate, next to baselines")
    common(p)
    p.add_argument("--output", required=True, help="output directory (one sub-folder per stage)")
    p.add_argument("--pretrained", help="skip pretraining: start from this checkpoint directory")
    p.add_argument("--seed", type=int)
    p.add_argument("--report-test", action="store_true",
                   help="add test columns, computed once for each final model (test is sealed otherwise)")
    run_folder(p)
    p.set_defaults(handler=cmd_run)

    p = commands.add_parser("download", help="download a public dataset (needs internet)")
    p.add_argument("dataset", choices=("ml-1m",))
    p.add_argument("--data-dir", help="where to put it (default: $REFIT_GYM_DATA or the user cache)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=cmd_download)

    p = commands.add_parser("envs", help="list the registered environment ids")
    p.set_defaults(handler=cmd_envs)

    p = commands.add_parser("info", help="what an environment is: YAML, versions, model, chain, spaces, reward, data")
    p.add_argument("env_id", help="a registered id (see `refit-gym envs`) or a scenario YAML")
    p.add_argument("--data-dir", help="where its dataset lives (default: $REFIT_GYM_DATA)")
    p.set_defaults(handler=cmd_info)

    p = commands.add_parser("plot", help="training curves of one or several runs side by side (PNG)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="--output folders of pretrain / finetune runs")
    p.add_argument("--output", default="curves.png", help="the PNG to write (default curves.png)")
    p.add_argument("--columns", help="comma-separated log.csv columns (default: loss, validation, reward, ...)")
    p.add_argument("--title", help="a title for the figure")
    p.set_defaults(handler=cmd_plot)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    tune_cpu_runtime()  # flush denormals; the heap policy only with REFIT_GYM_HEAP_ALLOCATOR=1 (refit_gym/runtime.py)
    try:
        return args.handler(args)
    except RefitGymError as error:
        _log(f"refit-gym {args.command}: error: {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
