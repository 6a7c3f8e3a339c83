"""Loading DiffuRec dataset.pkl sequences through the builtin-only unpickler."""

from __future__ import annotations

import collections
import pickle

import pytest

from refit_gym.data import load_sequences
from refit_gym.errors import DataError


def _content():
    # raw MovieIDs 50, 7, 31, 12 -> item ids 1..4 (0 is padding); no held-out item is in its
    # user's history
    return {
        "train": {0: [3, 1], 1: [0, 0, 4, 1, 4], 2: [1, 2]},
        "val": {0: [4], 1: [3], 2: [4]},
        "test": {0: [2], 1: [2], 2: [3]},
        "umap": {101: 0, 102: 1, 103: 2},
        "smap": {50: 1, 7: 2, 31: 3, 12: 4},
    }


def _write(folder, content=None, protocol=4):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dataset.pkl"
    path.write_bytes(pickle.dumps(_content() if content is None else content, protocol=protocol))
    return path


def _write_movies(folder, ids=(50, 7, 31, 12)):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "movies.dat").write_bytes("".join(f"{i}::Film {i}::Drama\n" for i in ids).encode("latin-1"))


def test_loads_shifted_ids_sequences_and_one_item_holdouts(tmp_path):
    data = load_sequences(_write(tmp_path / "toy_seq"))
    assert (data.name, data.n_users, data.n_items) == ("toy_seq", 3, 4)
    assert data.train_sequences[0].tolist() == [2, 0]  # ids shifted by -1, order kept
    assert data.train_sequences[1].tolist() == [3, 0, 3]  # padding removed, repeats kept
    assert data.train[1].indices.tolist() == [0, 3]  # the matrix is binary
    assert data.train.nnz == 6 and data.valid.nnz == 3 and data.test.nnz == 3
    assert data.valid[0].indices.tolist() == [3] and data.test[2].indices.tolist() == [2]
    assert data.extras["raw_item_ids"].tolist() == [50, 7, 31, 12]
    assert data.item_titles is None


def test_folder_path_and_titles_from_sibling_raw_movielens_folder(tmp_path):
    _write(tmp_path / "diffurec_ml-1m")
    _write_movies(tmp_path / "movielens-1m_raw_partial")
    data = load_sequences(tmp_path / "diffurec_ml-1m")
    assert data.item_titles == ("Film 50", "Film 7", "Film 31", "Film 12")


def test_sibling_movielens_titles_are_not_attached_to_other_datasets(tmp_path):
    _write(tmp_path / "diffurec_amazon_beauty")
    _write_movies(tmp_path / "movielens-1m_raw_partial")
    assert load_sequences(tmp_path / "diffurec_amazon_beauty").item_titles is None
    _write(tmp_path / "partial_ml-1m")
    _write_movies(tmp_path / "movielens-1m_raw_partial", ids=(50, 7))  # incomplete: ignored
    assert load_sequences(tmp_path / "partial_ml-1m").item_titles is None


def test_movies_file_next_to_the_pickle(tmp_path):
    path = _write(tmp_path / "anything")
    _write_movies(tmp_path / "anything", ids=(50, 7, 31))
    assert load_sequences(path).item_titles == ("Film 50", "Film 7", "Film 31", "item 12")


def _broken(change):
    content = _content()
    change(content)
    return content


@pytest.mark.parametrize(
    "content, problem",
    [
        ([1, 2, 3], "expected a dict"),
        (_broken(lambda c: c.pop("test")), "missing key"),
        (_broken(lambda c: c.update(train={str(u): s for u, s in c["train"].items()})), "user key '0' of type str"),
        (_broken(lambda c: c["val"].pop(2)), "'val' users must be exactly 0..2"),
        (_broken(lambda c: c["train"].update({0: [3, 9]})), "item id 9, outside 1..4"),
        (_broken(lambda c: c["val"].update({1: [-2]})), "item id -2"),
        (_broken(lambda c: c["test"].update({1: 5})), "must be a list"),
        (_broken(lambda c: c["train"].update({0: [1, "x"]})), "non-integer item id 'x'"),
        (_broken(lambda c: c["val"].update({0: [1.5]})), "non-integer item id 1.5"),
        (_broken(lambda c: c.update(test={0: [], 1: [], 2: [0]})), "'test' split is empty"),
        (_broken(lambda c: c["val"].update({1: [0]})), "'val'[1] holds 0 item(s) (padding removed); leave-one-out"),
        (_broken(lambda c: c["test"].update({2: [3, 1]})), "'test'[2] holds 2 item(s)"),
    ],
)
def test_malformed_content_raises_data_error(tmp_path, content, problem):
    path = _write(tmp_path / "bad", content)
    with pytest.raises(DataError) as error:
        load_sequences(path)
    assert "dataset.pkl" in str(error.value) and problem in str(error.value)


def test_pickle_with_a_class_is_refused(tmp_path):
    content = _content()
    content["train"] = collections.OrderedDict(content["train"])
    with pytest.raises(DataError, match=r"dataset.pkl.*collections.OrderedDict"):
        load_sequences(_write(tmp_path / "classy", content))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: not found \(expected a DiffuRec dataset.pkl"):
        load_sequences(tmp_path / "nowhere")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(DataError, match=r"empty_folder/dataset.pkl: file not found"):
        load_sequences(tmp_path / "empty_folder")
