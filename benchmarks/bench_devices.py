"""Benchmark: one ML-1M fine-tuning run on each device, in fp32 and bf16, and in 1 and 2 processes, side by side.

Every measurement is one subprocess running the command users run (``python -m refit_gym.cli
pretrain | finetune | evaluate ... --no-progress``), timed from outside (process start, imports and
data loading included: ``wall``), with the per-epoch / per-update times and the metrics read from
the files the run writes (``log.csv``, ``metrics.json``, ``results.json``) or, for ``evaluate``,
from its stdout JSON. Nothing here selects on test: no command is given ``--report-test`` and
``evaluate`` scores ``valid`` only. Parts (``--parts``, all by default):

* ``pretrain`` (per device in ``--devices``): ``refit-gym pretrain`` of the config's model for
  ``--pretrain-epochs`` epochs (validated once, after the last), s / epoch from the epochs that
  were not validated; with ``--pretrain-to-convergence`` also the config's own schedule to its end
  (epochs, seconds to the best epoch, the best epoch's validation metrics). fp32 only (pretraining
  has no bf16 switch).
* ``finetune`` (per device, fp32 and with ``--bf16`` also ``finetune.precision=bf16``):
  ``refit-gym finetune --agent refit --pretrained P`` for ``--updates`` updates, validated on the
  pretrained model (update 0) and after the last update only (``eval_every = updates``); s / update
  is the mean over the updates that were not validated, the first (warm-up) excluded when there
  are others; the final row's validation metrics are reported. bf16 runs evaluate in fp32 so that
  their metrics are the standard protocol's.
* ``evaluate`` (per device, fp32 and with ``--bf16`` bf16): ``refit-gym evaluate --checkpoint P
  --split valid [--precision bf16]``: one deterministic chain over every user (the chain the
  valid + test evaluation shares; test is not scored here), full ranking.
* ``processes`` (per device that has enough of them: the CPU always, CUDA with one GPU per
  process): the fine-tuning run above in each of ``--processes`` process counts, the ones above 1
  under ``torchrun`` (gloo on the CPU, nccl on CUDA), each process with ``--threads`` threads;
  the 1-process run is the ``finetune`` part's fp32 run when that ran. Reported: wall time,
  s / update, final validation metrics, and against the 1-process run the largest absolute
  difference of the best checkpoints' weights (``model.safetensors``; data-parallel training
  reproduces one process to float summation order, ~1e-4: tests/test_distributed.py) and of the
  final validation metrics. When no update beat the pretrained model on validation both best
  checkpoints are the pretrained weights and the weight difference says nothing: the report says so.

``--pretrained`` defaults to the checkpoint the ``pretrain`` part writes on the first device (the
synthetic smoke test uses this); pass a converged checkpoint for meaningful fine-tuning metrics.
Every subprocess gets ``OMP_NUM_THREADS = MKL_NUM_THREADS = --threads`` (default: the cores over
the largest process count). The 1-minute load average before and after each measurement is
recorded (``os.getloadavg``): on a shared machine, read the times with it. A failing subprocess
stops the benchmark with a non-zero exit, its command and the tail of its stderr (the partial
JSON is still written, with ``"error"``).

Usage (ML-1M; ``REFIT_GYM_DATA`` holds ``diffrec_ml-1m_clean``)::

    REFIT_GYM_DATA=../shared/data python benchmarks/bench_devices.py --pretrained DIR \\
        [--devices cpu,cuda] [--updates 200] [--pretrain-epochs 3] [--pretrain-to-convergence] [--bf16] \\
        [--processes 1,2] [--threads 1] [--parts pretrain,finetune,evaluate,processes] [--output runs/x.json]

    # smoke run (minutes, not a measurement):  --updates 5 --pretrain-epochs 1
    # synthetic (tests/test_bench_devices.py): --config configs/synthetic_diffrec.yaml --data synthetic:... --set ...

It prints a markdown table on stdout and writes the JSON (``--output``, default
``runs/bench_devices/<time>.json``) and the same table beside it (``.md``); the runs' folders go to
``<output without .json>_runs/`` (replaced when the benchmark is run again with the same output).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
PARTS = ("pretrain", "finetune", "evaluate", "processes")
STDERR_TAIL = 4000


class MeasurementFailed(RuntimeError):
    """A subprocess exited non-zero, or did not write what it should have."""


# ----------------------------------------------------------------------------- subprocesses
def cli(*args: str, processes: int = 1) -> list[str]:
    """``python -m refit_gym.cli ARGS --no-progress``, under torchrun when ``processes > 1``."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [*launcher, "-m", "refit_gym.cli", *args, "--no-progress"]


def run(command: list[str], threads: int, what: str, timeout: Optional[float]) -> dict[str, Any]:
    """Run ``command``; its wall time, stdout and the load average before and after.

    Raises:
        MeasurementFailed: a non-zero exit (the command and its stderr tail in the message) or a timeout.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    print(f"[bench_devices] {what}: {shlex.join(command)}", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        tail = (error.stderr or b"")[-STDERR_TAIL:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        raise MeasurementFailed(f"{what}: timed out after {timeout} s\ncommand: {shlex.join(command)}\n"
                                f"stderr (tail):\n{tail}") from None
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise MeasurementFailed(f"{what}: exit code {done.returncode}\ncommand: {shlex.join(command)}\n"
                                f"stderr (tail):\n{done.stderr[-STDERR_TAIL:]}")
    print(f"[bench_devices] {what}: {wall:.1f} s", file=sys.stderr, flush=True)
    return {"wall_s": wall, "stdout": done.stdout, "load_before": load_before, "load_after": os.getloadavg()[0],
            "command": shlex.join(command)}


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise MeasurementFailed(f"{what}: the run exited 0 but wrote no {path}")
    return json.loads(path.read_text())


def read_log(folder: Path, what: str) -> list[dict[str, str]]:
    path = folder / "log.csv"
    if not path.is_file():
        raise MeasurementFailed(f"{what}: the run exited 0 but wrote no {path}")
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def per_unit(rows: list[dict[str, str]], key: str) -> tuple[Optional[float], bool]:
    """Mean seconds per row (epoch or update) over the rows without a validation, the first
    excluded when there are others; ``(seconds, includes_validation)``. With no such row: the
    first row's own time, which includes its validation."""
    seconds = [float(row["seconds"]) for row in rows if int(row[key]) > 0]
    validated = [bool(row.get("valid_recall@20")) for row in rows if int(row[key]) > 0]
    steps = [b - a for a, b in zip([0.0, *seconds[:-1]], seconds)]
    plain = [s for s, v in zip(steps, validated) if not v]
    if len(plain) > 1:
        plain = plain[1:]
    if plain:
        return sum(plain) / len(plain), False
    return (steps[0], True) if steps else (None, False)


def metric(value: Any) -> Optional[float]:
    return None if value in (None, "") else float(value)


# ----------------------------------------------------------------------------- measurements
class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.rows: list[dict[str, Any]] = []
        self.finetune_folders: dict[tuple[str, str], Path] = {}

    def experiment_flags(self) -> list[str]:
        flags = ["--config", self.args.config]
        if self.args.data:
            flags += ["--data", self.args.data]
        for item in self.args.overrides:
            flags += ["--set", item]
        return flags

    def add(self, row: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        row = {**row, "threads": self.args.threads, "wall_s": result["wall_s"], "load_before": result["load_before"],
               "load_after": result["load_after"], "command": result["command"]}
        self.rows.append(row)
        return row

    def pretrain(self, device: str, epochs: Optional[int]) -> dict[str, Any]:
        """``epochs`` epochs (validated after the last only), or the config's schedule (``None``)."""
        name = f"pretrain-{device}-" + (f"{epochs}ep" if epochs else "converge")
        folder = self.work / name.replace(":", "")
        schedule = [] if epochs is None else ["--set", f"pretrain.max_epochs={epochs}", "--set",
                                              f"pretrain.eval_every={epochs}", "--set", "pretrain.time_budget_s=null"]
        what = f"pretrain on {device}" + (f", {epochs} epoch(s)" if epochs else ", to convergence")
        result = run(cli("pretrain", *self.experiment_flags(), *schedule, "--device", device, "--output", str(folder),
                         "--overwrite"), self.args.threads, what, self.args.timeout)
        record = read_json(folder / "metrics.json", what)
        seconds, with_validation = per_unit(read_log(folder, what), "epoch")
        valid = record["metrics"]["valid"]
        return self.add({
            "part": "pretrain" if epochs else "pretrain to convergence", "device": device, "precision": "fp32",
            "processes": 1, "unit": "epoch", "per_unit_s": seconds, "per_unit_includes_validation": with_validation,
            "epochs": record.get("epochs_run"), "best_epoch": record.get("best_epoch"), "loop_s": record.get("seconds"),
            "seconds_to_best": record.get("seconds_to_best"), "valid_recall@20": valid.get("recall@20"),
            "valid_ndcg@20": valid.get("ndcg@20"), "folder": str(folder)}, result)

    def finetune(self, device: str, precision: str, processes: int, part: str) -> dict[str, Any]:
        updates = self.args.updates
        name = f"finetune-{device}-{precision}-{processes}p".replace(":", "")
        folder = self.work / name
        flags = ["--set", f"finetune.max_updates={updates}", "--set", f"finetune.eval_every={updates}",
                 "--set", "finetune.patience=1000000", "--set", "finetune.time_budget_s=null",
                 "--set", f"finetune.precision={precision}"]
        what = f"finetune on {device}, {precision}, {processes} process(es) x {self.args.threads} thread(s)"
        result = run(cli("finetune", *self.experiment_flags(), *flags, "--agent", "refit", "--pretrained",
                         str(self.args.pretrained), "--device", device, "--output", str(folder), "--overwrite",
                         processes=processes), self.args.threads, what, self.args.timeout)
        results = read_json(folder / "results.json", what)
        rows = read_log(folder, what)
        seconds, with_validation = per_unit(rows, "update")
        final = rows[-1]
        if int(final["update"]) != updates:
            raise MeasurementFailed(f"{what}: the run stopped at update {final['update']} of {updates} "
                                    f"({results.get('stop_reason')})")
        self.finetune_folders[(device, f"{precision}-{processes}")] = folder
        return self.add({
            "part": part, "device": device, "precision": precision, "processes": results.get("processes", processes),
            "unit": "update", "per_unit_s": seconds, "per_unit_includes_validation": with_validation,
            "updates": updates, "loop_s": results["seconds"], "best_update": results["best_update"],
            "pretrained_valid_recall@20": results["pretrained_metrics"]["valid"].get("recall@20"),
            "best_valid_recall@20": results["best_metrics"]["valid"].get("recall@20"),
            "valid_recall@20": metric(final.get("valid_recall@20")), "valid_ndcg@20": metric(final.get("valid_ndcg@20")),
            "folder": str(folder)}, result)

    def evaluate(self, device: str, precision: str) -> dict[str, Any]:
        what = f"evaluate on {device}, {precision}"
        data = ["--data", self.args.data] if self.args.data else []
        result = run(cli("evaluate", "--checkpoint", str(self.args.pretrained), "--split", "valid", *data,
                         "--device", device, "--precision", precision), self.args.threads, what, self.args.timeout)
        try:
            metrics = json.loads(result["stdout"])
        except json.JSONDecodeError:
            raise MeasurementFailed(f"{what}: stdout is not the metrics JSON:\n{result['stdout'][-STDERR_TAIL:]}") from None
        return self.add({"part": "evaluate (valid)", "device": device, "precision": precision, "processes": 1,
                         "valid_recall@20": metrics.get("recall@20"), "valid_ndcg@20": metrics.get("ndcg@20")}, result)

    def compare(self, device: str, counts: list[int]) -> list[dict[str, Any]]:
        """Largest weight and final-metric differences of each process count's run against 1 process."""
        from safetensors.torch import load_file

        base = self.finetune_folders[(device, "fp32-1")]
        first = next(r for r in self.rows if r.get("folder") == str(base))
        weights = load_file(str(base / "model.safetensors"))
        out = []
        for n in counts:
            if n == 1:
                continue
            folder = self.finetune_folders[(device, f"fp32-{n}")]
            other_row = next(r for r in self.rows if r.get("folder") == str(folder))
            other = load_file(str(folder / "model.safetensors"))
            if other.keys() != weights.keys():
                raise MeasurementFailed(f"{folder}: its checkpoint holds other tensors than {base}'s")
            difference = max(float((weights[k].float() - other[k].float()).abs().max()) for k in weights)
            metrics = [abs(first[k] - other_row[k]) for k in ("valid_recall@20", "valid_ndcg@20")
                       if first[k] is not None and other_row[k] is not None]
            both_pretrained = first["best_update"] == 0 and other_row["best_update"] == 0
            out.append({"device": device, "processes": [1, n], "backend": "nccl" if device.startswith("cuda") else "gloo",
                        "max_abs_weight_difference": difference,
                        "best_updates": [first["best_update"], other_row["best_update"]],
                        "weights_are_the_pretrained_ones": both_pretrained,
                        "max_abs_final_valid_metric_difference": max(metrics) if metrics else None})
        return out


# ----------------------------------------------------------------------------- report
def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"`{report['command']}`", "",
             f"{report['machine']['cpu_count']} cores, {report['machine']['gpus'] or 'no GPU'}; "
             f"torch {report['machine']['torch']}; {report['settings']['threads']} thread(s) per process; "
             "wall = the whole command (start-up, data and checkpoint loading included); load = 1-minute load "
             "average before -> after.", "",
             "| part | device | precision | processes | wall s | s / unit | valid R@20 | valid N@20 | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        unit = ""
        if row.get("per_unit_s") is not None:
            unit = f"{fmt(row['per_unit_s'], 3)} / {row['unit']}" + (" (incl. validation)"
                                                                      if row.get("per_unit_includes_validation") else "")
        if row["part"] == "pretrain to convergence":
            unit += f"; {row['epochs']} epochs, best {row['best_epoch']} after {fmt(row['seconds_to_best'], 0)} s"
        lines.append(f"| {row['part']} | {row['device']} | {row['precision']} | {row['processes']} x {row['threads']} "
                     f"| {fmt(row['wall_s'], 1)} | {unit} | {fmt(row.get('valid_recall@20'), 5)} "
                     f"| {fmt(row.get('valid_ndcg@20'), 5)} | {fmt(row['load_before'], 1)} -> {fmt(row['load_after'], 1)} |")
    for comparison in report.get("process_comparisons", []):
        n = comparison["processes"][1]
        note = (" (both best checkpoints are the pretrained weights: no update beat it on validation, so this "
                "difference says nothing)" if comparison["weights_are_the_pretrained_ones"] else "")
        lines += ["", f"1 vs {n} processes on {comparison['device']} ({comparison['backend']}): max |weight difference| "
                      f"{comparison['max_abs_weight_difference']:.2e} (best checkpoints, updates "
                      f"{comparison['best_updates'][0]} and {comparison['best_updates'][1]}){note}; max |final valid "
                      f"metric difference| {fmt(comparison['max_abs_final_valid_metric_difference'], 6)}"]
    if report.get("error"):
        lines += ["", f"FAILED: {report['error'].splitlines()[0]}"]
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpu_count": os.cpu_count(), "gpus": ", ".join(gpus), "gpu_count": len(gpus), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "commit": commit,
            "load_at_start": os.getloadavg()}


# ----------------------------------------------------------------------------- main
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "ml1m_diffrec.yaml"),
                        help="experiment YAML, as the CLI's --config (default configs/ml1m_diffrec.yaml)")
    parser.add_argument("--data", help="dataset, as the CLI's --data (default: the config's)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="a config override passed to every pretrain and finetune command; repeatable")
    parser.add_argument("--pretrained", help="the checkpoint to fine-tune and evaluate (default: the one the "
                                             "pretrain part writes on the first device)")
    parser.add_argument("--devices", help="comma-separated (default: cpu, plus cuda when available)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--pretrain-epochs", type=int, default=3, help="epochs of the timed pretraining (default 3)")
    parser.add_argument("--pretrain-to-convergence", action="store_true",
                        help="also pretrain with the config's own schedule to its end (long on ML-1M)")
    parser.add_argument("--updates", type=int, default=200, help="fine-tuning updates (default 200)")
    parser.add_argument("--bf16", action="store_true", help="also fine-tune and evaluate under bf16 autocast")
    parser.add_argument("--processes", default="1,2", help="process counts to compare (default 1,2)")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: cores // max(processes))")
    parser.add_argument("--timeout", type=float, help="seconds allowed per command (default: no limit)")
    parser.add_argument("--output", help="the JSON to write (default runs/bench_devices/<time>.json)")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    args.devices = [d.strip() for d in (args.devices or ("cpu,cuda" if torch.cuda.is_available() else "cpu")).split(",")
                    if d.strip()]
    args.processes = sorted({int(n) for n in args.processes.split(",") if n.strip()})
    problems = []
    if unknown:
        problems.append(f"unknown --parts {unknown}; expected a subset of {list(PARTS)}")
    if any(d.startswith("cuda") for d in args.devices) and not torch.cuda.is_available():
        problems.append(f"--devices {','.join(args.devices)} names CUDA, which this machine does not have")
    if not args.processes or args.processes[0] < 1:
        problems.append("--processes needs counts >= 1, e.g. 1,2")
    if "processes" in args.parts and 1 not in args.processes:
        problems.append("--processes must include 1: the other counts are compared with it")
    if args.updates < 1 or args.pretrain_epochs < 1:
        problems.append("--updates and --pretrain-epochs must be >= 1")
    needs_checkpoint = {"finetune", "evaluate", "processes"} & set(args.parts)
    if not args.pretrained and needs_checkpoint and "pretrain" not in args.parts:
        problems.append(f"--parts {','.join(sorted(needs_checkpoint))} needs --pretrained (or the pretrain part)")
    if problems:
        parser.error("; ".join(problems))
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // max(args.processes))
    args.config = str(Path(args.config).resolve())
    if args.pretrained:
        args.pretrained = str(Path(args.pretrained).resolve())
    if args.data and not args.data.startswith("synthetic") and Path(args.data).exists():
        args.data = str(Path(args.data).resolve())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.output = Path(args.output or REPO / "runs" / "bench_devices" / f"{stamp}.json").resolve()
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    work = args.output.with_name(args.output.stem + "_runs")
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, work)
    report: dict[str, Any] = {
        "command": shlex.join(["python", sys.argv[0] if argv is None else "benchmarks/bench_devices.py",
                               *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": bench.rows, "process_comparisons": [],
    }
    import torch

    gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    code = 0
    try:
        if "pretrain" in args.parts:
            for device in args.devices:
                row = bench.pretrain(device, args.pretrain_epochs)
                if not args.pretrained:
                    args.pretrained = row["folder"]
                    report["settings"]["pretrained"] = row["folder"]
                if args.pretrain_to_convergence:
                    bench.pretrain(device, None)
        for device in args.devices:
            if "finetune" in args.parts:
                for precision in ("fp32", "bf16") if args.bf16 else ("fp32",):
                    bench.finetune(device, precision, 1, "finetune")
            if "evaluate" in args.parts:
                for precision in ("fp32", "bf16") if args.bf16 else ("fp32",):
                    bench.evaluate(device, precision)
        if "processes" in args.parts:
            for device in args.devices:
                if device.startswith("cuda") and gpu_count < max(args.processes):
                    report.setdefault("skipped", []).append(
                        f"processes on {device}: {max(args.processes)} processes need as many GPUs ({gpu_count} here)")
                    continue
                for n in args.processes:
                    if (device, f"fp32-{n}") not in bench.finetune_folders:
                        bench.finetune(device, "fp32", n, "finetune, processes")
                report["process_comparisons"] += bench.compare(device, args.processes)
    except MeasurementFailed as error:
        report["error"] = str(error)
        print(f"bench_devices: FAILED\n{error}", file=sys.stderr, flush=True)
        code = 1
    report["machine"]["load_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    args.output.with_suffix(".md").write_text(table)
    print(table, end="", flush=True)
    print(f"[bench_devices] wrote {args.output} and {args.output.with_suffix('.md')}; runs in {work}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
