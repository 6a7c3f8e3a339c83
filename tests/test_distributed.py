"""Data-parallel training on torch.distributed (gloo, 2 CPU processes under torchrun)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from refit_gym.errors import ConfigError
from refit_gym.training.distributed import Distributed

from conftest import TINY_EXPERIMENT, assert_same_run

DATASET = "synthetic:n_users=300,n_items=120,seed=3"  # conftest's tiny_data
FINETUNE = {"users_per_batch": 32, "rollouts_per_user": 2, "exposed_steps": 2, "eval_every": 4, "max_updates": 12,
            "patience": 100, "time_budget_s": None, "lr": 3e-3}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(processes: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI in one process, or under torchrun with ``processes`` ranks (gloo, CPU)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    return subprocess.run([*launcher, "-m", "refit_gym.cli", *args, "--no-progress", "--device", "cpu"],
                          capture_output=True, text=True, env=ENV, timeout=timeout)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "config.yaml"
    path.write_text(yaml.safe_dump({**TINY_EXPERIMENT, "data": {"dataset": DATASET}, "finetune": FINETUNE}))
    return path


def max_weight_difference(first: Path, second: Path) -> float:
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


PLACEBO = ["--set", "finetune.shuffle_rewards_within_user=true", "--set", "finetune.pg_weight=0.1"]


@pytest.mark.parametrize("agent, settings", [("refit", []), ("supervised", []), ("refit", PLACEBO)],
                         ids=["refit", "supervised", "refit-placebo"])
def test_two_processes_fine_tune_to_the_one_process_result(config, tiny_pretrained, tmp_path, agent, settings):
    """Each rank takes half of every batch of users and draws its rows' noise (and the placebo's
    permutations) as the whole batch would; DistributedDataParallel averages the gradients.
    Tolerance: the same weights to 1e-4 and validation metrics to 2e-4 (float sums in another
    order; near-ties may swap ranks)."""
    common = ["finetune", "--config", str(config), "--pretrained", str(tiny_pretrained), "--agent", agent, *settings]
    one = run(1, *common, "--output", str(tmp_path / "one"))
    two = run(2, *common, "--output", str(tmp_path / "two"))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    single, parallel = json.loads(one.stdout), json.loads(two.stdout)  # rank 0 alone prints
    assert single["best_update"] == parallel["best_update"] > 0
    for key, value in single.items():
        assert parallel[key] == pytest.approx(value, abs=2e-4), key
    assert max_weight_difference(tmp_path / "one", tmp_path / "two") < 1e-4
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["processes"] == 2 and json.loads((tmp_path / "two" / "run.json").read_text())["status"] == "finished"


def test_the_pretraining_mix_under_torchrun_is_the_one_process_result(tmp_path):
    """Every rank computes the term on the whole batch with one process's draws (dropout included),
    so the average of the ranks' equal gradients is the one-process gradient. The base is trained
    for two epochs only, so that fine-tuning improves on it and the compared checkpoints are not the start."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**TINY_EXPERIMENT, "data": {"dataset": DATASET},
                                    "finetune": {**FINETUNE, "max_updates": 4, "pretrain_loss_weight": 1.0,
                                                 "pretrain_batch_size": 50}}))
    base = run(1, "pretrain", "--config", str(path), "--output", str(tmp_path / "base"), "--set", "pretrain.max_epochs=2",
               "--set", "pretrain.min_epochs=1")
    assert base.returncode == 0, base.stderr
    common = ["finetune", "--config", str(path), "--pretrained", str(tmp_path / "base")]
    one = run(1, *common, "--output", str(tmp_path / "one"))
    two = run(2, *common, "--output", str(tmp_path / "two"))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert max_weight_difference(tmp_path / "one", tmp_path / "two") < 1e-4
    assert max_weight_difference(tmp_path / "one", tmp_path / "base") > 1e-3  # the runs did move the weights


def test_a_killed_data_parallel_run_resumes_to_the_uninterrupted_result(config, tiny_pretrained, tmp_path):
    common = ["finetune", "--config", str(config), "--pretrained", str(tiny_pretrained)]
    full = run(2, *common, "--output", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    cut = tmp_path / "cut"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "refit_gym.cli", *common, "--output", str(cut), "--no-progress", "--device", "cpu"]
    process = subprocess.Popen(launcher, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    pointer, deadline = cut / "trainer_state" / "latest.json", time.monotonic() + 300
    while not (pointer.is_file() and json.loads(pointer.read_text())["snapshot"] in ("step-4", "step-8")):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    for pid in [process.pid, *descendants(process.pid)]:  # the launcher and both ranks
        os.kill(pid, signal.SIGKILL)
    process.wait()
    resumed = run(2, *common, "--output", str(cut), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at update" in resumed.stderr
    assert_same_run(tmp_path / "full", cut)


def test_two_process_pretraining_runs_and_lands_near_the_one_process_result(config, tmp_path):
    """The ranks' timestep and noise streams are their own (the importance sampler's history is
    gathered, so it is the same on every rank): the result matches one process in distribution.
    Tolerance: validation Recall@20 within 0.03 of the one-process run on this tiny data."""
    one = run(1, "pretrain", "--config", str(config), "--output", str(tmp_path / "one"))
    two = run(2, "pretrain", "--config", str(config), "--output", str(tmp_path / "two"))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    single, parallel = json.loads(one.stdout), json.loads(two.stdout)
    assert abs(single["valid/recall@20"] - parallel["valid/recall@20"]) < 0.03
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2
    assert not list((tmp_path / "two").glob("*.tmp"))


def test_shards_cover_the_batch_and_uneven_batches_are_refused():
    shards = [Distributed(rank, 3).shard(10) for rank in range(3)]
    assert [list(s) for s in shards] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert Distributed(1, 2).even_shard(32, "users") == range(16, 32)
    with pytest.raises(ConfigError, match=r"finetune.users_per_batch \(30\) must be divisible .* \(4\)"):
        Distributed(0, 4).even_shard(30, "finetune.users_per_batch")


def test_agents_that_run_another_librarys_loop_refuse_data_parallel(tiny_data, tiny_pretrained):
    pytest.importorskip("torchrl")
    from conftest import build_tiny_learner

    agent, _ = build_tiny_learner(tiny_data, tiny_pretrained, "torchrl-ppo")
    with pytest.raises(ConfigError, match="does not run data-parallel"):
        agent.distribute(Distributed(rank=0, world=2))
    assert not agent.distributed.active and agent._data_parallel is None  # it stayed a one-process agent
    single, _ = build_tiny_learner(tiny_data, tiny_pretrained, "refit", rollouts_per_user=1)
    with pytest.raises(ConfigError, match="rollouts_per_user = 1"):
        single.distribute(Distributed(rank=0, world=2))
