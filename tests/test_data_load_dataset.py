"""load_dataset: dispatch on names, folders, files and synthetic specs."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from refit_gym.data import load_dataset
from refit_gym.data.loaders import parse_synthetic_spec
from refit_gym.errors import ConfigError, DataError


def _diffrec_folder(folder):
    folder.mkdir(parents=True)
    np.save(folder / "train_list.npy", np.array([[0, 0], [0, 1], [1, 2], [1, 3]]))
    np.save(folder / "valid_list.npy", np.array([[0, 2], [1, 0]]))
    np.save(folder / "test_list.npy", np.array([[0, 3], [1, 1]]))
    return folder


def _sequence_file(folder):
    folder.mkdir(parents=True)
    content = {"train": {0: [1], 1: [2]}, "val": {0: [2], 1: [3]}, "test": {0: [3], 1: [1]}}
    (folder / "dataset.pkl").write_bytes(pickle.dumps(content))
    return folder / "dataset.pkl"


def _ratings_file(path):
    rows = [(u, i, 5, 100 * u + k) for u in (1, 2) for k, i in enumerate(range(1, 11) if u == 1 else range(10, 0, -1))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    return path


def test_dispatch_by_folder_content_and_suffix(tmp_path):
    _diffrec_folder(tmp_path / "my_diffrec")
    assert load_dataset("my_diffrec", data_dir=tmp_path).train.nnz == 4
    pkl = _sequence_file(tmp_path / "my_seq")
    assert load_dataset("my_seq", data_dir=tmp_path).n_items == 3
    assert load_dataset(pkl).name == "my_seq"
    ratings = _ratings_file(tmp_path / "ml-tiny" / "ratings.dat")
    assert load_dataset("ml-tiny", data_dir=tmp_path).n_users == 2
    assert load_dataset(str(ratings)).n_items == 10


def test_names_resolve_through_env_var(tmp_path, monkeypatch):
    _diffrec_folder(tmp_path / "from_env")
    monkeypatch.setenv("REFIT_GYM_DATA", str(tmp_path))
    assert load_dataset("from_env").name == "from_env"


def test_unrecognised_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: not a recognised dataset folder"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(DataError, match="weights.bin: unrecognised dataset file type"):
        load_dataset(tmp_path / "weights.bin")
    with pytest.raises(DataError, match="not found"):
        load_dataset("no_such_dataset", data_dir=tmp_path)


def test_synthetic_specs():
    assert parse_synthetic_spec("synthetic") == {}
    assert parse_synthetic_spec("synthetic:n_users=80, density=0.2,seed=3") == {"n_users": 80, "density": 0.2, "seed": 3}
    data = load_dataset("synthetic:n_users=80,n_items=50,density=0.2,seed=3")
    assert data.name == "synthetic" and data.n_users <= 80 and "seed=3" in data.source
    for bad in ("synthetic:colour=3", "synthetic:n_users", "synthetic:n_users=many"):
        with pytest.raises(ConfigError):
            load_dataset(bad)
