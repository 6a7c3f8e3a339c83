"""Crash-safe runs: SIGKILL and resume, run-folder rules, early config validation, NaN stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from refit_gym.cli import main
from refit_gym.errors import ConfigError, TrainingError
from refit_gym.training.run_folder import RunFolder, config_differences, run_status

from conftest import TINY_EXPERIMENT, assert_same_run

DATASET = "synthetic:n_users=300,n_items=120,seed=3"  # conftest's tiny_data
FINETUNE = {"users_per_batch": 32, "rollouts_per_user": 2, "exposed_steps": 2, "eval_every": 4, "max_updates": 24,
            "patience": 100, "time_budget_s": None, "lr": 1e-3}

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def write_config(folder: Path, **sections) -> Path:
    config = {**TINY_EXPERIMENT, "data": {"dataset": DATASET}, "finetune": FINETUNE, **sections}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "refit_gym.cli", *args, "--no-progress", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=timeout)


def kill_when(args: list[str], ready, timeout: float = 300) -> None:
    """Start the CLI with ``args``, SIGKILL it once ``ready()`` holds (polled), and wait for it to die."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "refit_gym.cli", *args, "--no-progress", "--device", "cpu"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed: {process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the run never reached the point to kill it at")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def snapshot_step(state_dir: Path) -> int:
    pointer = state_dir / "latest.json"
    try:
        return int(json.loads(pointer.read_text())["snapshot"].split("-")[1])
    except (OSError, ValueError, KeyError):
        return -1


def test_a_killed_finetune_resumes_to_the_uninterrupted_result(tmp_path, tiny_pretrained):
    config = write_config(tmp_path)
    common = ["finetune", "--config", str(config), "--pretrained", str(tiny_pretrained)]
    full = cli(*common, "--output", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    cut = tmp_path / "cut"
    kill_when([*common, "--output", str(cut)], lambda: snapshot_step(cut / "trainer_state") >= 12)
    assert run_status(cut) == "running"
    unfinished = cli("evaluate", "--checkpoint", str(cut), "--split", "valid")
    assert unfinished.returncode == 0 and "has not finished" in unfinished.stderr
    refused = cli(*common, "--output", str(cut))
    assert refused.returncode == 2 and "--resume" in refused.stderr and "--overwrite" in refused.stderr
    resumed = cli(*common, "--output", str(cut), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at update" in resumed.stderr
    assert_same_run(tmp_path / "full", cut)
    assert json.loads(resumed.stdout) == json.loads(full.stdout)


def test_a_killed_pretraining_resumes_to_the_uninterrupted_result(tmp_path):
    config = write_config(tmp_path, pretrain={"batch_size": 100, "max_epochs": 24, "eval_every": 3, "min_epochs": 24})
    full = cli("pretrain", "--config", str(config), "--output", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    cut = tmp_path / "cut"
    kill_when(["pretrain", "--config", str(config), "--output", str(cut)],
              lambda: snapshot_step(cut / "training_state") >= 9)
    resumed = cli("pretrain", "--config", str(config), "--output", str(cut), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "full" / "model.safetensors").read_bytes() == (cut / "model.safetensors").read_bytes()
    assert json.loads(resumed.stdout) == json.loads(full.stdout)
    assert run_status(cut) == "finished" and not (cut / "training_state").exists()


def test_the_pretraining_behind_gym_make_resumes_after_a_kill(tmp_path):
    script = ("import gymnasium as gym, refit_gym, sys; "
              "env = gym.make('ReFiT-Synthetic-v0', dataset='synthetic:n_users=120,n_items=60,seed=0'); "
              "print(type(env.unwrapped.base_model).__name__)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "killed")}
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    checkpoints = tmp_path / "killed" / "refit_gym" / "checkpoints"
    deadline = time.monotonic() + 300
    while not any(snapshot_step(p / "training_state") >= 10 for p in checkpoints.glob(".*.partial")):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    again = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and again.stdout.strip() == "DiffRec", again.stderr
    assert "resuming the interrupted pretraining" in again.stderr
    reference_env = {**env, "XDG_CACHE_HOME": str(tmp_path / "reference")}
    reference = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=reference_env,
                               timeout=300)
    assert reference.returncode == 0, reference.stderr
    (resumed,) = checkpoints.glob("*-diffrec-*")
    (uninterrupted,) = (tmp_path / "reference" / "refit_gym" / "checkpoints").glob("*-diffrec-*")
    assert (resumed / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    assert not list(checkpoints.glob(".*.partial"))  # no staging folder left behind


def test_processes_that_miss_the_same_cache_entry_at_once_pretrain_it_once(tmp_path):
    """The workers of an asynchronous vector env (or parallel test workers) build the same env on a
    fresh machine together: one pretrains, the others wait and load its checkpoint (before the
    cache's lock, two trained into one staging folder and one crashed on a file the other moved)."""
    script = ("import gymnasium as gym, refit_gym, torch; "
              "env = gym.make('ReFiT-Synthetic-v0', dataset='synthetic:n_users=400,n_items=200,seed=4'); "
              "print(float(sum(p.double().sum() for p in env.unwrapped.base_model.parameters())))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path)}
    processes = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    pretrained = [err for _, err in outputs if "pretraining it now" in err]
    assert len(pretrained) == 1, [err[-2000:] for _, err in outputs]
    assert outputs[0][0] == outputs[1][0]  # the same weights
    checkpoints = tmp_path / "refit_gym" / "checkpoints"
    assert len(list(checkpoints.glob("*-diffrec-*"))) == 1 and not list(checkpoints.glob(".*.partial"))


# ------------------------------------------------------------------ the rules of a run folder
def test_run_folder_rules(tmp_path):
    config = {"finetune": {"agent": "refit", "lr": 1e-3}, "seed": 0, "device": "cpu"}
    folder = RunFolder.claim(tmp_path / "run", "finetune", config)
    folder.finish(updates=3)
    with pytest.raises(ConfigError, match="already holds a finished finetune run.*--resume.*--overwrite"):
        RunFolder.claim(tmp_path / "run", "finetune", config)
    changed = {**config, "finetune": {"agent": "reinforce", "lr": 1e-4}}
    with pytest.raises(ConfigError, match=r"finetune.agent: 'refit' -> 'reinforce'; finetune.lr: 0.001 -> 0.0001"):
        RunFolder.claim(tmp_path / "run", "finetune", changed, resume=True)
    with pytest.raises(ConfigError, match="holds a finetune run, not a pretrain run"):
        RunFolder.claim(tmp_path / "run", "pretrain", config, resume=True)
    assert RunFolder.claim(tmp_path / "run", "finetune", {**config, "device": "cuda"}, resume=True).finished
    with pytest.raises(ConfigError, match="nothing to resume"):
        RunFolder.claim(tmp_path / "empty", "finetune", config, resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds no refit-gym run"):
        RunFolder.claim(tmp_path / "other", "finetune", config, overwrite=True)
    assert (tmp_path / "other" / "precious.txt").read_text() == "keep me"
    (tmp_path / "run" / "log.csv").write_text("old")
    replaced = RunFolder.claim(tmp_path / "run", "finetune", changed, overwrite=True)
    assert not (tmp_path / "run" / "log.csv").exists() and not replaced.resumed
    assert config_differences({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == ["a.c: (absent) -> 2"]


def test_a_finished_run_is_not_silently_overwritten(tmp_path, tiny_pretrained):
    config = write_config(tmp_path, finetune={**FINETUNE, "max_updates": 4})
    common = ["finetune", "--config", str(config), "--pretrained", str(tiny_pretrained), "--output", str(tmp_path / "ft")]
    assert main(common + ["--no-progress", "--device", "cpu"]) == 0
    before = (tmp_path / "ft" / "model.safetensors").read_bytes()
    assert main(common + ["--no-progress", "--device", "cpu", "--set", "finetune.lr=1e-4", "--seed", "7"]) == 2
    assert (tmp_path / "ft" / "model.safetensors").read_bytes() == before
    assert main(common + ["--no-progress", "--device", "cpu", "--resume", "--agent", "reinforce"]) == 2
    assert main(common + ["--no-progress", "--device", "cpu", "--overwrite", "--set", "finetune.lr=1e-4"]) == 0


def test_config_errors_surface_before_any_work(tmp_path, capsys):
    config = write_config(tmp_path, finetune={"lr_rate": 1e-4})
    started = time.perf_counter()
    assert main(["run", "--config", str(config), "--output", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "lr_rate" in capsys.readouterr().err and time.perf_counter() - started < 10
    assert not (tmp_path / "run").exists()
    config = write_config(tmp_path)
    assert main(["finetune", "--config", str(config), "--output", str(tmp_path / "ft"), "--no-progress",
                 "--set", "finetune.lr=abc"]) == 2
    assert "finetune.lr must be a number, got 'abc'" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data, tiny_pretrained,
                                                                     monkeypatch):
    from agents.refit import RefitAgent
    from agents.trainer import finetune
    from refit_gym.checkpoint import load_checkpoint
    from refit_gym.config import config_from_dict

    real, calls = RefitAgent.loss, {"n": 0}

    def nan_after_six(self, rollout, generator=None):
        calls["n"] += 1
        terms = real(self, rollout, generator)
        return {**terms, "loss": terms["loss"] * float("nan")} if calls["n"] > 6 else terms

    monkeypatch.setattr(RefitAgent, "loss", nan_after_six)
    config = config_from_dict({**TINY_EXPERIMENT, "finetune": FINETUNE})
    expected = r"update 7: .*loss became nan .*no step was taken.*last good checkpoint \(update \d+\) is intact"
    with pytest.raises(TrainingError, match=expected):
        finetune(config, tiny_data, tiny_pretrained, tmp_path / "ft", progress=False, log=lambda _: None)
    model, _ = load_checkpoint(tmp_path / "ft", tiny_data)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert run_status(tmp_path / "ft") == "running"  # unfinished, resumable from update 4


def test_a_nan_pretraining_loss_stops_with_a_message(tmp_path, tiny_data, monkeypatch):
    from refit_gym.config import config_from_dict
    from refit_gym.models.diffrec import DiffRec
    from refit_gym.training.pretrain import pretrain

    monkeypatch.setattr(DiffRec, "training_loss", lambda self, *a, **k: torch.tensor(float("inf")))
    with pytest.raises(TrainingError, match="loss became inf in epoch 1 .*Lower pretrain.lr"):
        pretrain(config_from_dict(TINY_EXPERIMENT), tiny_data, output_dir=tmp_path, progress=False, log=lambda _: None)


def test_test_metrics_of_finished_runs_are_computed_on_the_runs_device(tmp_path, tiny_data, tiny_pretrained,
                                                                         monkeypatch):
    """A finished pretraining or fine-tuning run resumed with ``report_test``, and ``finetune_table``'s test of a
    selected checkpoint, load the checkpoint on the run's device (a GPU table once scored its test on the CPU:
    200 s of an idle GPU per table)."""
    import importlib.util
    import shutil

    import agents.trainer as trainer
    import refit_gym.checkpoint as checkpoint
    from refit_gym.config import config_from_dict
    from refit_gym.training.pretrain import pretrain

    real, devices = checkpoint.load_checkpoint, []

    def spy(directory, data, device="(not given)"):
        devices.append(str(device))
        return real(directory, data, device="cpu" if device == "(not given)" else device)

    base = tmp_path / "base"
    shutil.copytree(tiny_pretrained, base)
    config = config_from_dict(TINY_EXPERIMENT)
    finetuned = tmp_path / "ft"
    trainer.finetune(config_from_dict({**TINY_EXPERIMENT, "finetune": {**FINETUNE, "max_updates": 2}}), tiny_data,
                     base, finetuned, progress=False, log=lambda _: None)
    monkeypatch.setattr(checkpoint, "load_checkpoint", spy)
    monkeypatch.setattr(trainer, "load_checkpoint", spy)

    result = pretrain(config, tiny_data, output_dir=base, resume=True, report_test=True, progress=False,
                      log=lambda _: None)
    assert devices == ["cpu"] and "test" in result.best_metrics
    devices.clear()
    result = trainer.finetune(config_from_dict({**TINY_EXPERIMENT, "finetune": {**FINETUNE, "max_updates": 2}}),
                              tiny_data, base, finetuned, resume=True, report_test=True, progress=False,
                              log=lambda _: None)
    assert devices == ["cpu"] and "test" in result.best_metrics
    devices.clear()
    spec = importlib.util.spec_from_file_location("finetune_table", Path(__file__).resolve().parents[1]
                                                  / "benchmarks" / "finetune_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    test = table.test_unit({"base": "synthetic", "sets": [f"data.dataset={DATASET}", "device=cpu"],
                            "folder": str(base)})
    assert devices == ["cpu"] and test == json.loads((base / "test.json").read_text())


def _tiny_cache_config():
    from refit_gym.config import config_from_dict

    return config_from_dict({**TINY_EXPERIMENT, "pretrain": {**TINY_EXPERIMENT["pretrain"], "max_epochs": 5,
                                                             "min_epochs": 5}})


def test_a_cache_on_a_file_system_without_locks_pretrains_unlocked_with_a_warning(tmp_path, tiny_data, monkeypatch,
                                                                                   caplog):
    import errno
    import fcntl

    from refit_gym.training.cache import is_cached, pretrained_checkpoint

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    directory = pretrained_checkpoint(_tiny_cache_config(), tiny_data, cache_dir=tmp_path, progress=False,
                                      log=lambda _: None)
    assert is_cached(directory)
    assert "cannot lock" in caplog.text and "No locks available" in caplog.text


def test_a_cache_entry_folder_holding_no_checkpoint_is_refused_by_name_and_the_training_kept(tmp_path, tiny_data):
    from refit_gym.training.cache import cached_checkpoint, pretrained_checkpoint, staging_folder

    config = _tiny_cache_config()
    directory = cached_checkpoint(config, tiny_data, tmp_path)
    directory.mkdir(parents=True)
    (directory / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=f"{directory.name} exists and holds no complete checkpoint.*remove"):
        pretrained_checkpoint(config, tiny_data, cache_dir=tmp_path, progress=False, log=lambda _: None)
    assert (directory / "notes.txt").read_text() == "not a checkpoint"
    assert (staging_folder(config, tiny_data, tmp_path) / "model.safetensors").is_file()
