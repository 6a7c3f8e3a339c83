"""benchmarks/finetune_table.py: the parts a results table rests on, checked without training anything
but the tiny bases of ``conftest``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("finetune_table", REPO / "benchmarks" / "finetune_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sasrec_results(path: Path, seeds=(0, 1, 2), dataset="diffurec_amazon_beauty", finished=True) -> Path:
    def metrics(seed):
        value = 0.05 + 0.01 * seed
        return {split: {"hr@10": 2 * value, "ndcg@10": value, "hr@20": 3 * value, "ndcg@20": 1.5 * value}
                for split in ("valid", "test")}

    result = {"dataset": dataset, "command": "python benchmarks/sasrec_baseline.py ...", "chosen": {"dropout": 0.2},
              "popularity": {split: {"hr@10": 0.01, "ndcg@10": 0.005, "hr@20": 0.02, "ndcg@20": 0.007}
                             for split in ("valid", "test")},
              "runs": [{"seed": s, "metrics": metrics(s)} for s in seeds]}
    if finished:
        result["summary"] = {}
    path.write_text(json.dumps(result))
    return path


def test_each_base_names_its_protocol_and_dataset(table, monkeypatch):
    monkeypatch.chdir(REPO)
    assert table.protocol_of("diffrec") == ("cf", "diffrec_ml-1m_clean")
    assert table.protocol_of("beauty_seq") == ("sequential", "diffurec_amazon_beauty")
    assert table.config_path("beauty_seq") == Path("configs/beauty_seq.yaml")
    assert table.config_path("cfdiff") == Path("configs/ml1m_cfdiff.yaml")


def test_the_sequential_reference_is_read_per_seed_from_a_finished_sasrec_run(table, tmp_path):
    out = table.sequential_baselines("diffurec_amazon_beauty", [0, 1, 2], str(_sasrec_results(tmp_path / "r.json")))
    sasrec = out["SASRec"]
    assert [run["test"]["ndcg@10"] for run in sasrec["seeds"]] == pytest.approx([0.05, 0.06, 0.07])
    assert sasrec["test"]["ndcg@10"] == pytest.approx(0.06) and sasrec["chosen_on_valid"] == {"dropout": 0.2}
    assert out["popularity"]["test"]["hr@20"] == 0.02


@pytest.mark.parametrize("change, message", [
    ({"seeds": (0, 1)}, "seeds"),
    ({"dataset": "diffurec_ml-1m"}, "diffurec_ml-1m"),
    ({"finished": False}, "finished: False"),
])
def test_a_sasrec_run_of_other_data_seeds_or_unfinished_is_refused(table, tmp_path, change, message):
    path = _sasrec_results(tmp_path / "r.json", **change)
    with pytest.raises(SystemExit, match=message):
        table.sequential_baselines("diffurec_amazon_beauty", [0, 1, 2], str(path))
    with pytest.raises(SystemExit, match="needs the SASRec baseline.*or, to compare fine-tuning arms without it, "
                                         "--without-sasrec"):
        table.sequential_baselines("diffurec_amazon_beauty", [0, 1, 2], None)


def test_every_recipe_is_a_valid_finetune_section_of_every_shipped_base_config(table):
    """A misspelt or out-of-range recipe key fails here, not after an hour of pretraining."""
    from agents.config import finetune_config
    from refit_gym.config import load_config

    for base in ("ml1m_diffrec", "ml1m_tdiffrec", "ml1m_cfdiff", "ml1m_seq", "beauty_seq", "beauty_dreamrec",
                 "ml1m_dreamrec"):
        section = load_config(REPO / "configs" / f"{base}.yaml").finetune
        for name, recipe in table.RUNS.items():
            overrides = {k: v for k, v in recipe.items() if k != "continued"}
            try:
                applied = table.with_recipe(section, overrides)
            except ValueError as error:  # term options for a term this base's reward does not have
                assert "reward_term_options" in overrides and "does not have" in str(error), name
                assert not set(overrides["reward_term_options"]) & set(section.get("reward") or {}), name
                continue
            assert finetune_config(applied).agent == overrides.get("agent", section["agent"]), name
            for term, options in overrides.get("reward_term_options", {}).items():
                assert applied["reward"][term] == {**section["reward"][term], **options}, name


@pytest.fixture
def tiny_base_config(table, tmp_path, monkeypatch):
    """``configs/<base>.yaml`` of the tiny pretrained base (``conftest.TINY_EXPERIMENT``) under the name ``tiny``."""
    import yaml
    from conftest import TINY_EXPERIMENT

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_EXPERIMENT))
    monkeypatch.setattr(table, "config_path", lambda base: path if base == "tiny" else pytest.fail(base))
    return path


def test_a_base_pretrained_elsewhere_is_copied_and_summarised_from_its_own_metrics(table, tiny_pretrained,
                                                                                   tiny_base_config, tiny_data,
                                                                                   tmp_path):
    from refit_gym.checkpoint import load_checkpoint

    spec = {"base": "tiny", "seed": 0, "sets": [], "folder": str(tmp_path / "pretrain" / "tiny-p0"),
            "checkpoint": str(tiny_pretrained)}
    summary = table.pretrain_unit(spec)
    saved = json.loads((tiny_pretrained / "metrics.json").read_text())
    assert summary["valid"] == saved["metrics"]["valid"] and summary["best_epoch"] == saved["best_epoch"]
    assert summary["seconds"] == saved["seconds"] and summary["epochs"] == saved["epochs_run"]
    folder = Path(spec["folder"])
    assert (folder / "model.safetensors").read_bytes() == (tiny_pretrained / "model.safetensors").read_bytes()
    load_checkpoint(folder, tiny_data)  # the copy is a whole checkpoint: the fine-tuning and test units load it
    assert table.pretrain_unit(spec) == json.loads((folder / "summary.json").read_text())  # resumed, not redone


@pytest.mark.parametrize("change, message", [
    ({"seed": 1}, "seed: the checkpoint has 0, the base 1"),
    ({"sets": ["diffusion.steps=7"]}, "diffusion.steps: the checkpoint has 5, the base 7"),
])
def test_a_base_checkpoint_of_another_model_or_seed_is_refused_by_name(table, tiny_pretrained, tiny_base_config,
                                                                       tmp_path, change, message):
    spec = {"base": "tiny", "seed": 0, "sets": [], "folder": str(tmp_path / "p"), "checkpoint": str(tiny_pretrained),
            **change}
    with pytest.raises(SystemExit, match=message):
        table.pretrain_unit(spec)
    assert not (tmp_path / "p").exists()


@pytest.fixture
def tiny_continued(tiny_pretrained, tiny_data, tmp_path, monkeypatch):
    """The tiny base continued for 2 epochs with seed 3 (as the ``continued`` control does, with its own
    fine-tuning seed), recorded relative to the working folder as the table's runs record it."""
    from conftest import TINY_EXPERIMENT
    from refit_gym.config import config_from_dict
    from refit_gym.training.pretrain import pretrain

    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_pretrained, "base")
    config = config_from_dict({**TINY_EXPERIMENT, "seed": 3})
    config.pretrain.max_epochs, config.pretrain.min_epochs, config.pretrain.eval_every = 2, 0, 1
    pretrain(config, tiny_data, output_dir="continued", progress=False, log=lambda _: None, init_from="base")
    return Path("continued")


def test_a_continued_base_keeps_the_seed_of_its_first_stage_and_sums_its_seconds(table, tiny_continued,
                                                                                 tiny_base_config):
    spec = {"base": "tiny", "seed": 0, "sets": [], "folder": "pretrain/tiny-p0", "checkpoint": str(tiny_continued)}
    summary = table.pretrain_unit(spec)
    first, last = (json.loads((Path(f) / "metrics.json").read_text()) for f in ("base", tiny_continued))
    assert summary["stages"] == ["base", "continued"]
    assert summary["valid"] == last["metrics"]["valid"] and summary["epochs"] == last["epochs_run"] == 2
    assert summary["seconds"] == pytest.approx(first["seconds"] + last["seconds"])
    assert summary["seconds_to_best"] == pytest.approx(first["seconds"] + last["seconds_to_best"])
    assert (Path(spec["folder"]) / "model.safetensors").read_bytes() == (tiny_continued / "model.safetensors").read_bytes()
    # a continuation that found nothing better keeps its start: the base's best came in the first stage
    (tiny_continued / "metrics.json").write_text(json.dumps({**last, "best_epoch": 0, "seconds_to_best": 0.0}))
    kept = table.pretrain_unit({**spec, "folder": "pretrain/tiny-p0-kept"})
    assert kept["seconds_to_best"] == pytest.approx(first["seconds_to_best"])
    assert kept["seconds"] == pytest.approx(first["seconds"] + last["seconds"])


def test_a_continued_base_of_another_seed_or_a_lost_first_stage_is_refused_by_name(table, tiny_continued,
                                                                                  tiny_base_config):
    import shutil

    spec = {"base": "tiny", "seed": 3, "sets": [], "folder": "p", "checkpoint": str(tiny_continued)}
    with pytest.raises(SystemExit, match="seed: the checkpoint has 0, the base 3"):  # 3 is the continuation's seed
        table.pretrain_unit(spec)
    shutil.rmtree("base")
    with pytest.raises(SystemExit, match="was continued from base, which is not a directory"):
        table.pretrain_unit({**spec, "seed": 0})
    assert not Path("p").exists()


def test_base_checkpoint_items_are_parsed_and_bad_ones_refused(table, tmp_path):
    assert table.base_checkpoints([f"tiny:2={tmp_path}"], ["tiny"], [0, 2]) == {("tiny", 2): str(tmp_path)}
    for item in [f"tiny:1={tmp_path}", f"other:0={tmp_path}", "tiny:0=", f"tiny={tmp_path}"]:
        with pytest.raises(SystemExit, match="expected BASE:SEED=PATH"):
            table.base_checkpoints([item], ["tiny"], [0, 2])
    with pytest.raises(SystemExit, match="is not a directory"):
        table.base_checkpoints([f"tiny:0={tmp_path / 'missing'}"], ["tiny"], [0])


def test_without_sasrec_the_sequential_baseline_is_popularity_counted_here(table, tmp_path, monkeypatch):
    import pickle

    from refit_gym.baselines import PopularityRecommender, fit_baseline
    from refit_gym.data import load_dataset
    from refit_gym.evaluation.evaluator import evaluate

    folder = tmp_path / "seq"
    folder.mkdir()
    train = {u: [(u + k) % 25 + 1 for k in range(5)] for u in range(30)}
    val = {u: [(u + 5) % 25 + 1] for u in range(30)}
    test = {u: [(u + 6) % 25 + 1] for u in range(30)}
    (folder / "dataset.pkl").write_bytes(pickle.dumps({"train": train, "val": val, "test": test}))
    out = table.sequential_baselines(str(folder), [0, 1, 2], None, without_sasrec=True)
    data = load_dataset(str(folder))
    reference = evaluate(fit_baseline(PopularityRecommender(), data), data, ks=(5, 10, 20), protocol="sequential")
    assert list(out) == ["popularity"] and out["popularity"]["chosen_on_valid"] == {}
    assert out["popularity"]["test"] == reference.metrics["test"] and out["popularity"]["valid"]["hr@20"] > 0
    # the flag is for sequential tables given no SASRec result, and says so before anything is trained
    for argv in (["--bases", "diffrec", "--without-sasrec"], ["--bases", "beauty_seq", "--without-sasrec",
                                                               "--sasrec-results", "r.json"]):
        monkeypatch.setattr("sys.argv", ["finetune_table.py", "--output", str(tmp_path / "t"), *argv])
        with pytest.raises(SystemExit, match="--without-sasrec is for a sequential table given no --sasrec-results"):
            table.main()
    assert not (tmp_path / "t" / "pretrain").exists()


def test_arms_from_the_same_bases_are_compared_paired_over_pretraining_seeds(table):
    """``--compare`` and the against-the-base column: the per-seed means are paired (scipy's
    ``ttest_rel`` is the reference); a seed only one arm ran from is left out and the count says so."""
    from scipy import stats

    def summaries(values_by_pretrain_seed):
        return [{"spec": {"seed": f, "pretrain_seed": s, "run": "refit"}, "test": {"ndcg@20": v}}
                for s, values in values_by_pretrain_seed.items() for f, v in enumerate(values)]

    a = summaries({0: [0.30, 0.32], 1: [0.41], 2: [0.52], 7: [0.9]})
    b = summaries({0: [0.29], 1: [0.40], 2: [0.50]})
    by_seed_a, by_seed_b = (table.values_by_seed(x, "ndcg@20") for x in (a, b))
    assert by_seed_a[0] == [0.30, 0.32]
    difference, p, seeds = table.paired_by_seed(by_seed_a, by_seed_b)
    reference = stats.ttest_rel([0.31, 0.41, 0.52], [0.29, 0.40, 0.50])
    assert seeds == 3 and difference == pytest.approx(0.05 / 3) and p == pytest.approx(reference.pvalue)
    # the same values unpaired: the seeds' spread hides a difference the pairing shows
    assert table.welch([0.31, 0.41, 0.52], [0.29, 0.40, 0.50])[1] > 0.5 > 0.05 > p
    # a base's own seed is its spec's seed
    assert table.values_by_seed([{"spec": {"seed": 4}, "test": {"ndcg@20": 0.2}}], "ndcg@20") == {4: [0.2]}
    assert table.paired_by_seed({0: [0.3]}, {0: [0.1], 1: [0.2]})[1:] == (pytest.approx(float("nan"), nan_ok=True), 1)
    with pytest.raises(ValueError, match=r"no pretraining seed in common: \[0\] and \[1\]"):
        table.paired_by_seed({0: [0.3]}, {1: [0.1]})


def test_a_finished_table_compiles_paired_comparisons_in_the_order_asked(table, tiny_base_config, tmp_path,
                                                                         monkeypatch):
    """``--compile-only`` on finished units (written here, nothing trained): the ``--compare`` row is
    A − B paired over pretraining seeds, and the against-the-base column is paired too."""
    from scipy import stats

    monkeypatch.chdir(tmp_path)
    metrics = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")
    base = {0: 0.30, 1: 0.40, 2: 0.50}
    arms = {"refit": {0: 0.33, 1: 0.42, 2: 0.54}, "no_collab": {0: 0.32, 1: 0.41, 2: 0.52}}

    def unit(folder, spec, value, **extra):
        Path(folder).mkdir(parents=True)
        scores = {m: value for m in metrics}
        (Path(folder) / "summary.json").write_text(json.dumps({"spec": spec, "valid": scores, "seconds": 1.0, **extra}))
        (Path(folder) / "test.json").write_text(json.dumps(scores))

    for s, value in base.items():
        folder = f"t/pretrain/tiny-p{s}"
        unit(folder, {"base": "tiny", "seed": s, "sets": [], "folder": folder}, value, seconds_to_best=1.0)
        for run, values in arms.items():
            folder = f"t/finetune/tiny-p{s}-{run}-f0"
            unit(folder, {"base": "tiny", "seed": 0, "pretrain_seed": s, "run": run, "sets": [],
                          "pretrained": f"t/pretrain/tiny-p{s}", "updates": 400, "budget": 900.0, "eval_every": 40,
                          "continued_lr": 1e-4, "continued_epochs": 120, "folder": folder},  # the defaults
                 values[s], sees="c", updates=10, best_update=5)
    reference = {m: 0.1 for m in metrics}
    Path("t/baselines.json").write_text(json.dumps({name: {"chosen_on_valid": {}, "valid": reference, "test": reference}
                                                    for name in ("popularity", "EASE", "recency-weighted EASE")}))
    monkeypatch.setattr("sys.argv", ["finetune_table.py", "--output", "t", "--bases", "tiny", "--pretrain-seeds", "0",
                                     "1", "2", "--runs", "refit,no_collab", "--compare", "no_collab:refit",
                                     "--compile-only"])
    table.main()
    compiled = json.loads(Path("t/table.json").read_text())
    comparison = next(c for c in compiled["comparisons"] if c["metric"] == "ndcg@20")
    a, b = [arms["no_collab"][s] for s in base], [arms["refit"][s] for s in base]
    assert (comparison["a"], comparison["b"], comparison["paired_seeds"]) == ("no_collab", "refit", 3)
    assert comparison["difference"] == pytest.approx(-0.04 / 3)
    assert comparison["paired_p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert comparison["welch_p"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    text = Path("t/table.md").read_text()
    assert f"| tiny | no_collab | refit | -0.0133, paired p {stats.ttest_rel(a, b).pvalue:.2g} (3)" in text
    against_base = stats.ttest_rel(b, list(base.values())).pvalue
    row = next(line for line in text.splitlines() if line.startswith("| tiny + refit |"))
    assert f"+{against_base:.1e}" in row


def test_threads_per_worker_default_to_the_cpu_count_shared_and_can_be_set(table, tiny_base_config, tmp_path,
                                                                          monkeypatch):
    """``--threads`` sets each worker's torch threads (two tables side by side on 2 cores: 1 each);
    a count below 1 is refused before anything is written."""
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(table, "run_stage", lambda function, specs, workers, threads: seen.append(threads) or [])
    monkeypatch.setattr(table.os, "cpu_count", lambda: 8)
    argv = ["finetune_table.py", "--output", "t", "--bases", "tiny", "--runs", "", "--compile-only"]
    for extra, expected in (([], 8), (["--workers", "2"], 4), (["--workers", "2", "--threads", "1"], 1)):
        seen.clear()
        monkeypatch.setattr("sys.argv", argv + extra)
        table.main()
        assert seen and set(seen) == {expected}
    monkeypatch.setattr("sys.argv", ["finetune_table.py", "--output", "u", "--threads", "0"])
    with pytest.raises(SystemExit, match="--threads 0: must be at least 1"):
        table.main()
    assert not Path("u").exists()


def test_a_finished_unit_is_reused_whatever_the_options_its_kind_of_run_does_not_use(table, tmp_path):
    """A fine-tuning arm finished under other ``--continued-*`` options is the same arm (and a control
    under another ``--updates`` / ``--eval-every``); a key the unit uses still refuses it, named."""
    arm = {"base": "tiny", "seed": 0, "pretrain_seed": 3, "run": "refit", "sets": [], "pretrained": "p",
           "updates": 400, "budget": 900.0, "eval_every": 10, "continued_lr": 5e-4, "continued_epochs": 1000,
           "continued_eval_every": 1, "folder": str(tmp_path / "arm")}
    control = {**arm, "run": "continued", "folder": str(tmp_path / "control")}
    base = {"base": "tiny", "seed": 3, "sets": [], "folder": str(tmp_path / "base")}
    unknown = {**arm, "run": "not_a_recipe", "folder": str(tmp_path / "unknown")}
    for spec in (arm, control, base, unknown):
        Path(spec["folder"]).mkdir()
        (Path(spec["folder"]) / "summary.json").write_text(json.dumps({"spec": spec, "valid": {}}))
    other_control_options = {"continued_lr": 1e-4, "continued_epochs": 120}
    assert table._summary(Path(arm["folder"]), {**arm, **other_control_options})["spec"] == arm
    without_eval_every = {k: v for k, v in arm.items() if k != "continued_eval_every"}
    assert table._summary(Path(arm["folder"]), without_eval_every)["spec"] == arm
    assert table._summary(Path(control["folder"]), {**control, "updates": 4000, "eval_every": 40})["spec"] == control
    refused = [(arm, {"eval_every": 20}, "eval_every: 10 then, 20 now"),
               (arm, {"updates": 4000}, "updates: 400 then, 4000 now"),
               (arm, {"budget": 330.0}, "budget: 900.0 then, 330.0 now"),
               (control, {"continued_lr": 1e-4}, "continued_lr: 0.0005 then, 0.0001 now"),
               (control, {"continued_epochs": 120}, "continued_epochs: 1000 then, 120 now"),
               (control, {"budget": 330.0}, "budget: 900.0 then, 330.0 now"),
               (base, {"seed": 4}, "seed: 3 then, 4 now"),
               (unknown, {"continued_lr": 1e-4}, "continued_lr: 0.0005 then, 0.0001 now")]  # not in RUNS: every key
    for spec, change, named in refused:
        with pytest.raises(SystemExit, match=rf"was run with another spec \({named}\): move it away"):
            table._summary(Path(spec["folder"]), {**spec, **change})
    without = {k: v for k, v in control.items() if k != "continued_eval_every"}
    with pytest.raises(SystemExit, match=r"\(continued_eval_every: 1 then, '<absent>' now\)"):
        table._summary(Path(control["folder"]), without)
