"""The command line contract: exact forms that the docs, scripts and outside checks rely on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from refit_gym.cli import main
from refit_gym.data import load_dataset

DATASET = "synthetic:n_users=200,n_items=80,seed=0"


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "seed": 0, "device": "cpu",
        "data": {"dataset": DATASET},
        "model": {"dims": [16, 32]},
        "diffusion": {"steps": 4},
        "pretrain": {"batch_size": 50, "max_epochs": 10, "eval_every": 5, "min_epochs": 5},
        "evaluation": {"ks": [10, 20]},
        "finetune": {"users_per_batch": 16, "rollouts_per_user": 2, "max_updates": 4, "eval_every": 2,
                     "time_budget_s": None},
    }))
    return path


@pytest.fixture(scope="module")
def pretrained(config_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("pretrained")
    assert main(["pretrain", "--config", str(config_file), "--output", str(output), "--no-progress"]) == 0
    return output


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_evaluate_prints_metrics_json_and_exports_topk(pretrained, tmp_path, capsys):
    capsys.readouterr()
    top = tmp_path / "top.npy"
    code = main(["evaluate", "--checkpoint", str(pretrained), "--split", "test", "--export-topk", str(top),
                 "--k", "15", "--no-progress"])
    assert code == 0
    metrics = _json(capsys)
    assert {"recall@20", "ndcg@20", "recall@10"} <= set(metrics)
    ranked = np.load(top, allow_pickle=False)
    data = load_dataset(DATASET)
    assert ranked.dtype == np.int64 and ranked.shape == (data.n_users, 15)
    seen = data.seen_before("test")
    for user in range(0, data.n_users, 17):  # masked items never appear
        assert not set(ranked[user]) & set(seen.indices[seen.indptr[user]:seen.indptr[user + 1]])


def test_evaluate_precision_flag_reaches_the_evaluator(pretrained, capsys, monkeypatch):
    """``--precision bf16`` overrides the checkpoint's ``evaluation.precision`` (fp32 here); bfloat16
    keeps 8 bits of mantissa, so near-ties may swap: Recall@20 within 0.02 of fp32."""
    import refit_gym.evaluation.evaluator as evaluator

    real, seen = evaluator.evaluate, []

    def spy(*args, **kwargs):
        seen.append(kwargs["precision"])
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluator, "evaluate", spy)
    capsys.readouterr()
    metrics = {}
    for flags in ([], ["--precision", "bf16"]):
        assert main(["evaluate", "--checkpoint", str(pretrained), "--split", "valid", "--no-progress", *flags]) == 0
        metrics[flags[-1] if flags else "default"] = _json(capsys)
    assert seen == ["fp32", "bf16"]
    assert abs(metrics["bf16"]["recall@20"] - metrics["default"]["recall@20"]) < 0.02


def test_evaluate_mask_history_flag_overrides_the_checkpoints_protocol(pretrained, tmp_path, capsys):
    """A cf checkpoint excludes the seen items by default; ``--no-mask-history`` ranks them (they
    then fill the top of a trained model's list), ``--mask-history`` is the default's result."""
    data = load_dataset(DATASET)
    seen = data.seen_before("valid")
    capsys.readouterr()
    metrics, ranked = {}, {}
    for flag in ("default", "--mask-history", "--no-mask-history"):
        top = tmp_path / f"{flag}.npy"
        flags = [] if flag == "default" else [flag]
        assert main(["evaluate", "--checkpoint", str(pretrained), "--split", "valid", "--no-progress",
                     "--export-topk", str(top), "--k", "10", *flags]) == 0
        metrics[flag], ranked[flag] = _json(capsys), np.load(top)
    assert metrics["--mask-history"] == metrics["default"]
    np.testing.assert_array_equal(ranked["--mask-history"], ranked["default"])
    in_history = [len(set(ranked["--no-mask-history"][u]) & set(seen.indices[seen.indptr[u]:seen.indptr[u + 1]]))
                  for u in range(data.n_users)]
    assert sum(in_history) > 0
    assert metrics["--no-mask-history"]["recall@20"] < metrics["default"]["recall@20"]


def test_baselines_from_the_cli(config_file, tmp_path, capsys):
    capsys.readouterr()
    assert main(["baseline", "popularity", "--config", str(config_file), "--split", "test"]) == 0
    popularity = _json(capsys)
    assert main(["baseline", "ease", "--config", str(config_file), "--split", "valid", "--no-progress",
                 "--export-topk", str(tmp_path / "ease.npy"), "--k", "10"]) == 0
    ease = _json(capsys)
    assert ease["ease_l2"] > 0 and 0 <= popularity["recall@20"] <= 1
    assert np.load(tmp_path / "ease.npy").shape[1] == 10


def test_finetune_writes_a_checkpoint_that_evaluate_reads(config_file, pretrained, tmp_path, capsys):
    output = tmp_path / "ft"
    assert main(["finetune", "--config", str(config_file), "--pretrained", str(pretrained), "--output", str(output),
                 "--agent", "supervised", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(output), "--split", "valid", "--no-progress"]) == 0
    assert "recall@20" in _json(capsys)


def test_set_overrides_config_fields_and_names_bad_ones(config_file, pretrained, tmp_path, capsys):
    output = tmp_path / "ft"
    assert main(["finetune", "--config", str(config_file), "--pretrained", str(pretrained), "--output", str(output),
                 "--agent", "reinforce", "--set", "finetune.max_updates=2", "--set", "finetune.categorical_samples=16",
                 "--set", "finetune.pg_weight=0", "--set", "finetune.lr=3e-5", "--no-progress"]) == 0
    results = json.loads((output / "results.json").read_text())
    assert results["updates"] == 2 and results["config"]["finetune"]["categorical_samples"] == 16
    assert results["config"]["finetune"]["pg_weight"] == 0 and results["config"]["finetune"]["lr"] == 3e-5
    capsys.readouterr()
    for bad, named in (("finetune.max_updates", "KEY=VALUE"), ("finetune.typo_key=1", "typo_key"),
                       ("finetune.lr=-1", "finetune.lr"), ("finetune.lr=fast", "finetune.lr must be a number"),
                       ("seed.x=1", "'seed' is not a section"), ("finetune.reward={a: 1", "not valid YAML")):
        assert main(["finetune", "--config", str(config_file), "--pretrained", str(pretrained),
                     "--output", str(tmp_path / "bad"), "--set", bad, "--no-progress"]) == 2
        assert named in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # rejected before anything was written


def test_errors_are_reported_with_exit_code_2(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--split", "test"]) == 2
    assert "config.json" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: {lr: 1e-3, typo_key: 3}\n")
    assert main(["pretrain", "--config", str(bad), "--output", str(tmp_path / "out")]) == 2
    assert "typo_key" in capsys.readouterr().err


def test_envs_lists_the_registered_ids(capsys):
    assert main(["envs"]) == 0
    out = capsys.readouterr().out
    assert "ReFiT-ML1M-v0" in out and "ReFiT-Synthetic-v0" in out


def test_info_plot_and_pointers_to_checkpoints(tmp_path, capsys):
    from refit_gym.cli import main

    assert main(["info", "ReFiT-Synthetic-v0"]) == 0
    out = capsys.readouterr().out
    assert "ReFiT-Synthetic-v0" in out and "T = 10 reverse steps" in out and "synthetic.yaml" in out
    assert "Box(-10.0, 10.0, (298,), float32)" in out and "HeldOutLogLikelihood" in out
    assert "hold-out recent: 25% of each user's training items" in out
    for name, shift in (("a", 0.0), ("b", 0.1)):
        (tmp_path / name).mkdir()
        rows = "\n".join(f"{u},{-5 + u * 0.1 + shift},{0.1 + u * 0.01}" for u in range(1, 6))
        (tmp_path / name / "log.csv").write_text("update,reward/total,valid_recall@20\n" + rows + "\n")
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert main(["plot", str(tmp_path), "--output", str(tmp_path / "d.png")]) == 2
    assert "holds no log.csv" in capsys.readouterr().err
    (tmp_path / "run" / "finetuned").mkdir(parents=True)
    (tmp_path / "run" / "finetuned" / "config.json").write_text("{}")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--split", "valid"]) == 2
    assert "the checkpoints inside it are" in capsys.readouterr().err


def test_info_says_how_much_each_hold_out_hides():
    from refit_gym.cli import holdout_text

    assert holdout_text("recent", 0.25, None) == "recent: 25% of each user's training items"
    assert holdout_text("random", 0.125, None) == "random: 12.5% of each user's training items"
    assert holdout_text("recent", 0.25, 1) == "recent: 1 item per user"  # the sequential scenarios: the count wins
    assert holdout_text("random", 0.25, 5) == "random: 5 items per user"
    assert holdout_text("none", 0.25, None) == "none"
