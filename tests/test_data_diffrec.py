"""Loading DiffRec split folders (train_list.npy / valid_list.npy / test_list.npy)."""

from __future__ import annotations

import numpy as np
import pytest

from refit_gym.data import load_diffrec_split
from refit_gym.errors import DataError

TRAIN = [[0, 3], [0, 1], [1, 0], [0, 2], [1, 4], [2, 1], [2, 3], [1, 2]]
VALID = [[0, 0], [1, 1], [2, 0]]
TEST = [[0, 4], [1, 3], [2, 2]]


def _write_split(folder, train=TRAIN, valid=VALID, test=TEST):
    folder.mkdir(parents=True, exist_ok=True)
    for name, pairs in (("train", train), ("valid", valid), ("test", test)):
        np.save(folder / f"{name}_list.npy", np.asarray(pairs, dtype=np.int64) if isinstance(pairs, list) else pairs)
    return folder


def test_loads_counts_and_keeps_train_row_order(tmp_path):
    folder = _write_split(tmp_path / "toy")
    np.save(folder / "item_emb.npy", np.zeros((5, 4), dtype=np.float32))  # ignored
    data = load_diffrec_split(folder)
    assert (data.name, data.n_users, data.n_items) == ("toy", 3, 5)
    assert (data.train.nnz, data.valid.nnz, data.test.nnz) == (8, 3, 3)
    assert data.train_sequences[0].tolist() == [3, 1, 2]
    assert data.train_sequences[1].tolist() == [0, 4, 2]
    assert data.train_sequences[2].tolist() == [1, 3]
    assert data.train[0].indices.tolist() == [1, 2, 3]  # CSR rows are sorted by item
    assert data.valid[2].indices.tolist() == [0] and data.test[1].indices.tolist() == [3]


@pytest.mark.parametrize(
    "file_name, content, problem",
    [
        ("valid_list.npy", np.array([[0, 1], [1, object()]], dtype=object), "pickled object array"),
        ("train_list.npy", np.arange(6, dtype=np.int64), "shape"),
        ("train_list.npy", np.zeros((4, 3), dtype=np.int64), "shape"),
        ("test_list.npy", np.array([[0.0, 1.0]]), "integer"),
        ("train_list.npy", np.array([[0, 1], [-1, 2]]), "negative"),
        ("valid_list.npy", np.array([[0, 1], [3, 0]]), "outside the train range"),
        ("test_list.npy", np.array([[0, 5]]), "outside the train range"),
        ("test_list.npy", np.zeros((0, 2), dtype=np.int64), "empty"),
    ],
)
def test_bad_files_raise_data_error_naming_file_and_problem(tmp_path, file_name, content, problem):
    folder = _write_split(tmp_path / "bad")
    np.save(folder / file_name, content, allow_pickle=True)
    with pytest.raises(DataError) as error:
        load_diffrec_split(folder)
    assert file_name in str(error.value) and problem in str(error.value)


def test_missing_file(tmp_path):
    folder = _write_split(tmp_path / "partial")
    (folder / "test_list.npy").unlink()
    with pytest.raises(DataError, match="test_list.npy.*not found"):
        load_diffrec_split(folder)


def test_not_a_npy_file(tmp_path):
    folder = _write_split(tmp_path / "garbage")
    (folder / "valid_list.npy").write_bytes(b"not numpy at all")
    with pytest.raises(DataError, match="valid_list.npy"):
        load_diffrec_split(folder)
