"""benchmarks/sasrec_baseline.py end to end on a tiny sequential pickle: seeds in parallel processes
equal seeds in one process, and ``--resume`` keeps what is finished and trains only what is missing."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "sasrec_baseline.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = ["--grid", "dropout=0.1,0.3", "--param", "hidden=16", "--param", "n_blocks=1", "--param", "max_len=8",
        "--param", "batch_size=32", "--max-epochs", "3", "--eval-every", "1", "--patience", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A DiffuRec-style ``dataset.pkl``: 120 users walk one cycle over 20 items (item ids from 1)."""
    rng = np.random.default_rng(0)
    cycle = rng.permutation(20) + 1
    train, val, test = {}, {}, {}
    for user in range(120):
        start, length = int(rng.integers(20)), int(rng.integers(8, 13))
        items = [int(cycle[(start + k) % 20]) for k in range(length + 2)]
        train[user], val[user], test[user] = items[:-2], [items[-2]], [items[-1]]
    folder = tmp_path_factory.mktemp("data") / "tiny_seq"
    folder.mkdir()
    (folder / "dataset.pkl").write_bytes(pickle.dumps({"train": train, "val": val, "test": test}))
    return folder.parent


def bench(data_dir: Path, output: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--dataset", "tiny_seq", "--data-dir", str(data_dir), *TINY,
               "--output", str(output), *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)


def results(output: Path) -> dict:
    return json.loads((output / "results.json").read_text())


def test_parallel_seeds_equal_one_process_and_resume_trains_only_the_missing_seed(data_dir, tmp_path):
    serial = bench(data_dir, tmp_path / "serial", "--seeds", "0", "1", "2")
    assert serial.returncode == 0, serial.stderr
    parallel = bench(data_dir, tmp_path / "parallel", "--seeds", "0", "1", "2", "--workers", "2")
    assert parallel.returncode == 0, parallel.stderr
    first = bench(data_dir, tmp_path / "resumed", "--seeds", "0", "1")
    assert first.returncode == 0, first.stderr
    kept = results(tmp_path / "resumed")["runs"]
    resume = bench(data_dir, tmp_path / "resumed", "--seeds", "0", "1", "2", "--resume")
    assert resume.returncode == 0, resume.stderr
    assert "tune_sasrec" not in resume.stderr  # the tuning was kept, not rerun
    assert "seed 0: sasrec" not in resume.stderr and "seed 1: sasrec" not in resume.stderr
    assert "seed 2: sasrec" in resume.stderr  # only the missing seed trained

    reference = results(tmp_path / "serial")
    for name in ("parallel", "resumed"):
        other = results(tmp_path / name)
        assert other["chosen"] == reference["chosen"]
        assert [run["seed"] for run in other["runs"]] == [0, 1, 2]
        for mine, theirs in zip(other["runs"], reference["runs"]):
            assert mine["best_epoch"] == theirs["best_epoch"], name
            for split in ("valid", "test"):
                for metric, value in theirs["metrics"][split].items():
                    assert mine["metrics"][split][metric] == pytest.approx(value, abs=1e-6), (name, split, metric)
    resumed = results(tmp_path / "resumed")
    assert resumed["runs"][:2] == kept  # the finished seeds are kept as they were
    assert len(resumed["resumed_by"]) == 1 and "--resume" in resumed["resumed_by"][0]
    assert "Resumed by:" in (tmp_path / "resumed" / "results.md").read_text()
    assert {run["seed"] for run in resumed["runs"]} == {0, 1, 2}
    assert len({run["metrics"]["test"]["ndcg@10"] for run in resumed["runs"]}) > 1  # the seeds differ


def test_resume_refuses_another_experiment_and_bad_workers(data_dir, tmp_path):
    assert bench(data_dir, tmp_path / "out", "--seeds", "0").returncode == 0
    before = (tmp_path / "out" / "results.json").read_text()
    other = bench(data_dir, tmp_path / "out", "--seeds", "0", "1", "--resume", "--param", "lr=0.01")
    assert other.returncode != 0 and "fixed" in other.stderr and "another --output" in other.stderr
    seed = bench(data_dir, tmp_path / "out", "--seeds", "1", "0", "--resume")
    assert seed.returncode != 0 and "tuning" in seed.stderr and "seed 0" in seed.stderr
    assert (tmp_path / "out" / "results.json").read_text() == before  # nothing already written is lost
    workers = bench(data_dir, tmp_path / "out2", "--workers", "0")
    assert workers.returncode != 0 and "--workers" in workers.stderr
