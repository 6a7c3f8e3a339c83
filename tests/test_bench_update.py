"""benchmarks/bench_update.py end to end on tiny synthetic data: both ways run and give the same losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_bench_update_times_both_ways_on_the_same_updates():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_update.py"), "--config", str(ROOT / "configs" / "synthetic_diffrec.yaml"),
         "--data", "synthetic:n_users=200,n_items=80,seed=3", "--set", "model.dims=[16,32]", "--set", "diffusion.steps=5",
         "--set", "finetune.users_per_batch=16", "--set", "finetune.rollouts_per_user=2", "--set", "finetune.exposed_steps=3",
         "--updates", "2", "--repeats", "1"],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert set(report["seconds_per_update"]) == {"once", "per step"}
    assert all(len(v) == 1 and v[0] > 0 for v in report["seconds_per_update"].values())
    assert report["largest_loss_difference"] == 0.0  # DiffRec's condition is the input itself: the same arithmetic
