"""Pretraining on synthetic data, checkpoints, configs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from refit_gym.checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
from refit_gym.config import config_from_dict, load_config
from refit_gym.data.synthetic import make_synthetic
from refit_gym.errors import CheckpointError, ConfigError
from refit_gym.evaluation.evaluator import evaluate
from refit_gym.models import build_model
from refit_gym.training.pretrain import pretrain

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

SMALL = {
    "seed": 0,
    "device": "cpu",
    "model": {"dims": [32, 64]},
    "diffusion": {"steps": 5},
    "pretrain": {"batch_size": 100, "max_epochs": 30, "eval_every": 5, "min_epochs": 10, "plateau_patience": 1},
    "evaluation": {"ks": [10, 20]},
}


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_users=400, n_items=150, seed=0)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    output = tmp_path_factory.mktemp("pretrained")
    config = config_from_dict(SMALL)
    return pretrain(config, data, output_dir=output, progress=False, log=lambda _: None), output, config


def test_pretraining_beats_the_untrained_model_and_popularity_floor(data, trained):
    result, _, config = trained
    untrained = build_model(config.model, config.diffusion, data).eval()
    before = evaluate(untrained, data, splits=("valid",), ks=(20,)).metrics["valid"]["recall@20"]
    after = result.best_metrics["valid"]["recall@20"]
    assert after > before + 0.05, (before, after)


def test_pretraining_writes_a_checkpoint_log_and_metrics(trained):
    result, output, _ = trained
    for name in ("model.safetensors", "config.json", "metrics.json", "log.csv", "curves.png"):
        assert (output / name).is_file(), name
    record = json.loads((output / "metrics.json").read_text())
    assert record["best_epoch"] == result.best_epoch
    assert record["seed"] == 0 and "torch" in record["versions"]


def test_checkpoint_round_trip_reproduces_the_metrics(data, trained):
    result, output, _ = trained
    model, config = load_checkpoint(output, data)
    metrics = evaluate(model, data, splits=("valid",), ks=(10, 20)).metrics
    assert metrics["valid"]["recall@20"] == pytest.approx(result.best_metrics["valid"]["recall@20"], abs=1e-7)


def test_test_is_sealed_unless_reported_once_at_the_end(data, trained, tmp_path, monkeypatch):
    from refit_gym.evaluation import evaluator

    result, output, config = trained
    assert set(result.best_metrics) == {"valid"}
    assert set(json.loads((output / "metrics.json").read_text())["metrics"]) == {"valid"}
    assert not any(column.startswith("test") for column in (output / "log.csv").read_text().splitlines()[0].split(","))
    calls = []
    real = evaluator.evaluate
    monkeypatch.setattr(evaluator, "evaluate", lambda *a, **k: calls.append(k["splits"]) or real(*a, **k))
    short = config_from_dict({**SMALL, "pretrain": {**SMALL["pretrain"], "max_epochs": 10, "min_epochs": 10}})
    reported = pretrain(short, data, output_dir=tmp_path, progress=False, log=lambda _: None, report_test=True)
    assert calls.count(("test",)) == 1 and calls[-1] == ("test",) and all(c == ("valid",) for c in calls[:-1])
    model, _ = load_checkpoint(tmp_path, data)
    test = evaluate(model, data, splits=("test",), ks=SMALL["evaluation"]["ks"]).metrics["test"]
    assert reported.best_metrics["test"]["ndcg@20"] == pytest.approx(test["ndcg@20"], abs=1e-7)
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["test"] == reported.best_metrics["test"]


def test_same_seed_same_pretraining(data):
    config = config_from_dict({**SMALL, "pretrain": {**SMALL["pretrain"], "max_epochs": 5, "min_epochs": 5}})
    first = pretrain(config, data, progress=False, log=lambda _: None)
    second = pretrain(config, data, progress=False, log=lambda _: None)
    for a, b in zip(first.model.denoiser.parameters(), second.model.denoiser.parameters()):
        assert torch.equal(a, b)
    assert first.best_metrics == second.best_metrics


def test_the_expected_duration_is_logged_once_after_the_first_epoch(data):
    config = config_from_dict({**SMALL, "pretrain": {**SMALL["pretrain"], "max_epochs": 4, "min_epochs": 4}})
    lines: list[str] = []
    pretrain(config, data, progress=False, log=lines.append)
    estimates = [line for line in lines if "epochs (~" in line]
    assert len(estimates) == 1 and estimates[0].startswith("epoch 1 took"), lines


def test_checkpoint_for_other_data_is_refused(trained):
    _, output, _ = trained
    other = make_synthetic(n_users=300, n_items=120, seed=1)
    with pytest.raises(CheckpointError, match="400 users x 150 items but the data 'synthetic' has 300 x 120"):
        load_checkpoint(output, other)


def test_missing_or_broken_checkpoint_files_are_named(tmp_path, data, trained):
    with pytest.raises(CheckpointError, match="config.json"):
        read_checkpoint_config(tmp_path)
    _, output, config = trained
    copy = tmp_path / "copy"
    model = build_model(config.model, config.diffusion, data)
    save_checkpoint(copy, model, config, data)
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(copy, data)


def test_truncated_corrupted_or_foreign_checkpoints_are_named(tmp_path, data, trained):
    _, output, config = trained
    truncated = tmp_path / "truncated"
    shutil.copytree(output, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors is not the file config.json describes"):
        load_checkpoint(truncated, data)
    description = json.loads((truncated / "config.json").read_text())
    del description["weights_sha256"]  # a checkpoint without the digest (written by an older version)
    (truncated / "config.json").write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated or corrupted and cannot be read"):
        load_checkpoint(truncated, data)
    garbled = tmp_path / "garbled"
    shutil.copytree(output, garbled)
    (garbled / "config.json").write_text('{"format": "refit-gym-checkpoint/2", "experiment": {')
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        load_checkpoint(garbled, data)
    foreign = tmp_path / "foreign"  # the config says CF-Diff, the weights are DiffRec's
    shutil.copytree(output, foreign)
    description = json.loads((foreign / "config.json").read_text())
    description["experiment"]["model"] = {"name": "cfdiff", "d_model": 8, "hidden": 16}
    (foreign / "config.json").write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match=r"does not match the cfdiff model that config.json describes: 24 missing tensor\(s\) \(first: denoiser.attentions.0.in_proj_bias\); 8 unexpected"):
        load_checkpoint(foreign, data)


def test_a_format_1_checkpoint_still_loads(tmp_path, data, trained):
    """Format 1 saved DiffRec's denoiser alone (keys without the ``denoiser.`` prefix)."""
    from safetensors.torch import save_file

    _, output, _ = trained
    model, _ = load_checkpoint(output, data)
    old = tmp_path / "old"
    old.mkdir()
    save_file({k: v.contiguous() for k, v in model.denoiser.state_dict().items()}, str(old / "model.safetensors"))
    description = json.loads((output / "config.json").read_text())
    description["format"] = "refit-gym-checkpoint/1"
    description["model_shape"] = {"n_users": data.n_users, "n_items": data.n_items}
    del description["weights_sha256"]
    (old / "config.json").write_text(json.dumps(description))
    loaded, _ = load_checkpoint(old, data)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path, data, trained, monkeypatch):
    _, _, config = trained
    model = build_model(config.model, config.diffusion, data)
    save_checkpoint(tmp_path, model, config, data, metrics={"v": 1})
    before = (tmp_path / "model.safetensors").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("refit_gym.checkpoint.save_file", fail)
    with torch.no_grad():
        model.denoiser.out_layers[-1].bias.add_(1.0)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, model, config, data)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"v": 1}


def test_a_save_killed_between_its_renames_reads_as_the_new_checkpoint(tmp_path, data, trained, monkeypatch):
    """Killed after the weights' rename, before the description's: the pending description is read."""
    _, _, config = trained
    model = build_model(config.model, config.diffusion, data)
    save_checkpoint(tmp_path, model, config, data)
    with torch.no_grad():
        model.denoiser.out_layers[-1].bias.add_(1.0)
    real_replace = os.replace

    def killed_at_the_description(source, target):
        if Path(target).name == "config.json":
            raise KeyboardInterrupt("killed")
        real_replace(source, target)

    monkeypatch.setattr("refit_gym.checkpoint.os.replace", killed_at_the_description)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model, config, data, extra={"saved": "second"})
    monkeypatch.undo()
    assert "saved" not in json.loads((tmp_path / "config.json").read_text())  # the old description is still there
    assert read_checkpoint_config(tmp_path)["saved"] == "second"
    loaded, _ = load_checkpoint(tmp_path, data)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    second_weights = (tmp_path / "model.safetensors").read_bytes()

    def killed_writing_the_next_description(self, text):
        with open(self, "w") as handle:  # half written, as a kill inside write_text leaves it
            handle.write(text[: len(text) // 2])
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as patch:  # a second save killed before it renames anything: the pair still reads
        patch.setattr("refit_gym.checkpoint.Path.write_text", killed_writing_the_next_description)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path, model, config, data, extra={"saved": "third"})
    assert (tmp_path / "model.safetensors").read_bytes() == second_weights
    assert read_checkpoint_config(tmp_path)["saved"] == "second" and load_checkpoint(tmp_path, data)[0] is not None
    (tmp_path / "config.json.tmp").write_text('{"weights_sha256": "0"')  # a pending file cut short: not used
    (tmp_path / "model.safetensors").write_bytes(second_weights[:-8] + bytes(8))  # weights config.json does not describe
    with pytest.raises(CheckpointError, match=r"model.safetensors is not the file config.json describes"):
        load_checkpoint(tmp_path, data)
    first = tmp_path / "first"  # the first save of a folder killed there: no config.json yet
    monkeypatch.setattr("refit_gym.checkpoint.os.replace", killed_at_the_description)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(first, model, config, data, extra={"saved": "first"})
    monkeypatch.undo()
    assert not (first / "config.json").exists() and load_checkpoint(first, data)[0] is not None
    assert read_checkpoint_config(first)["saved"] == "first"


def test_unknown_config_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match="lrr"):
        config_from_dict({"pretrain": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match="bogus"):
        config_from_dict({"bogus": 1})
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [1, 2")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_exponent_floats_read_as_numbers_and_wrong_types_are_named(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("pretrain: {lr: 1e-3, batch_size: 64}\n")  # PyYAML alone reads 1e-3 as a string
    assert load_config(good).pretrain.lr == 1e-3
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: {lr: fast}\n")
    with pytest.raises(ConfigError, match="pretrain.lr must be a number"):
        load_config(bad)
    with pytest.raises(ConfigError, match="batch_size must be an int"):
        config_from_dict({"pretrain": {"batch_size": 64.5}})


def test_shipped_configs_load():
    for name in ("ml1m_diffrec.yaml", "synthetic_diffrec.yaml"):
        config = load_config(CONFIGS / name)
        assert config.model.name == "diffrec"
    ml1m = load_config(CONFIGS / "ml1m_diffrec.yaml")
    assert (ml1m.diffusion.steps, ml1m.diffusion.noise_scale, ml1m.model.dims) == (40, 0.005, [200, 600])


@pytest.mark.real_data
@pytest.mark.parametrize("config_name, n_users", [("ml1m_diffrec", 400), ("ml1m_tdiffrec", 400), ("ml1m_cfdiff", 32)])
def test_ml1m_smoke_a_few_pretraining_batches_and_scoring(real_data_dir, config_name, n_users):
    """Each ML-1M base model with its published settings: a few training batches on the same
    users lower the loss; the chain scores users."""
    from refit_gym.data import load_dataset
    from refit_gym.data.history import SequenceTable
    from refit_gym.diffusion import TimestepSampler

    data = load_dataset("diffrec_ml-1m_clean", data_dir=real_data_dir)
    assert (data.n_users, data.n_items) == (5949, 2810)
    config = load_config(CONFIGS / f"{config_name}.yaml", {"device": "cpu"})
    torch.manual_seed(0)
    model = build_model(config.model, config.diffusion, data)
    sampler = TimestepSampler(config.diffusion.steps, method="uniform")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    histories = SequenceTable(data.train_sequences, data.n_items)
    batch = histories.batch(torch.randperm(data.n_users, generator=generator)[:n_users])
    losses = []
    model.eval()  # no dropout: the same function on every step
    for _ in range(4):
        loss = model.training_loss(batch, sampler, generator=torch.Generator().manual_seed(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    scores = model.score(histories.batch(torch.arange(64)))
    assert scores.shape == (64, 2810) and torch.isfinite(scores).all()


def test_loading_a_checkpoint_leaves_the_global_rng_alone(data, trained):
    _, output, _ = trained
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    load_checkpoint(output, data)
    assert torch.equal(torch.rand(4), expected)
