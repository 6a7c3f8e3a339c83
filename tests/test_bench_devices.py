"""benchmarks/bench_devices.py end to end on tiny synthetic data (CPU, 1 and 2 processes under torchrun)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_devices.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = ["--config", str(ROOT / "configs" / "synthetic_diffrec.yaml"), "--data", "synthetic:n_users=300,n_items=120,seed=3",
        "--set", "model.dims=[32,64]", "--set", "diffusion.steps=5", "--set", "pretrain.batch_size=100",
        "--set", "pretrain.max_epochs=6", "--set", "pretrain.min_epochs=2", "--set", "pretrain.eval_every=2",
        "--set", "evaluation.ks=[10,20]", "--set", "finetune.users_per_batch=32", "--set", "finetune.rollouts_per_user=2",
        "--set", "finetune.exposed_steps=2", "--set", "finetune.lr=3e-3"]
"""Conftest's tiny DiffRec; the convergence run's schedule is capped at 6 epochs (the timed ones override it)."""


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=300)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("bench") / "devices.json"
    done = bench(*TINY, "--devices", "cpu", "--pretrain-epochs", "2", "--pretrain-to-convergence", "--updates", "6",
                 "--bf16", "--processes", "1,2", "--threads", "1", "--output", str(output))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == output.with_suffix(".md").read_text()  # the table on stdout is the one written
    return json.loads(output.read_text())


def test_every_row_is_measured_with_finite_times_and_valid_metrics(report):
    rows = {(r["part"], r["precision"], r["processes"]): r for r in report["rows"]}
    assert set(rows) == {("pretrain", "fp32", 1), ("pretrain to convergence", "fp32", 1), ("finetune", "fp32", 1),
                         ("finetune", "bf16", 1), ("evaluate (valid)", "fp32", 1), ("evaluate (valid)", "bf16", 1),
                         ("finetune, processes", "fp32", 2)}
    for row in report["rows"]:
        assert row["device"] == "cpu" and row["threads"] == 1
        assert math.isfinite(row["wall_s"]) and row["wall_s"] > 0, row
        assert 0 < row["valid_recall@20"] <= 1 and 0 < row["valid_ndcg@20"] <= 1, row
        if row["part"] != "evaluate (valid)":
            assert math.isfinite(row["per_unit_s"]) and 0 < row["per_unit_s"] < row["wall_s"], row
    assert rows[("finetune", "fp32", 1)]["updates"] == 6
    assert not rows[("finetune", "fp32", 1)]["per_unit_includes_validation"]
    assert rows[("pretrain to convergence", "fp32", 1)]["epochs"] == 6
    # the evaluation and the timed pretraining's own validation score the same checkpoint on the same protocol
    assert rows[("evaluate (valid)", "fp32", 1)]["valid_recall@20"] == pytest.approx(
        rows[("pretrain", "fp32", 1)]["valid_recall@20"], abs=1e-9)
    assert "error" not in report


def test_two_processes_reproduce_the_one_process_weights(report):
    """Tolerance as tests/test_distributed.py: 1e-4 on the weights, 2e-4 on validation metrics;
    an update must have beaten the pretrained model, or the weights compared would be its own."""
    (comparison,) = report["process_comparisons"]
    assert comparison["processes"] == [1, 2] and comparison["backend"] == "gloo"
    assert not comparison["weights_are_the_pretrained_ones"] and min(comparison["best_updates"]) > 0
    assert comparison["max_abs_weight_difference"] < 1e-4
    assert comparison["max_abs_final_valid_metric_difference"] < 2e-4


def test_a_failing_command_fails_the_benchmark_loudly(tmp_path):
    output = tmp_path / "failed.json"
    done = bench("--parts", "evaluate", "--devices", "cpu", "--pretrained", str(tmp_path / "no_such_checkpoint"),
                 "--output", str(output))
    assert done.returncode == 1
    assert "FAILED" in done.stderr and "-m refit_gym.cli evaluate --checkpoint" in done.stderr
    assert "no_such_checkpoint" in done.stderr.split("stderr (tail):", 1)[1]  # the CLI's own error message
    assert "evaluate on cpu" in json.loads(output.read_text())["error"]
