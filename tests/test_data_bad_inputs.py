"""The bad-input catalogue of the data layer (docs/bad_inputs.md): every case raises a DataError
naming the file, the problem and, where there is one, the line, row or user.

Each case starts from a small clean file that loads (the ``test_clean_*`` controls), breaks one
thing, and checks the message.
"""

from __future__ import annotations

import copyreg
import io
import logging
import os
import pickle

import numpy as np
import pytest

from refit_gym.data import load_diffrec_split, load_ratings, load_sequences
from refit_gym.data.safe_pickle import load_builtin_pickle
from refit_gym.errors import DataError, RefitGymError

# users 0..2 and items 0..2 all have training rows; no pair is in two splits
TRAIN = [[0, 0], [0, 1], [1, 1], [1, 2], [2, 0], [2, 2]]
VALID = [[0, 2], [1, 0]]
TEST = [[2, 1]]

# item ids 1..4 (0 is padding); no held-out item is in its user's history
SEQUENCES = {
    "train": {0: [1, 2], 1: [0, 2, 3]},
    "val": {0: [3], 1: [1]},
    "test": {0: [4], 1: [4]},
    "umap": {501: 0, 502: 1},
    "smap": {10: 1, 20: 2, 30: 3, 40: 4},
}

# two users rate items 1..10 with 5; user 2 in the opposite time order, so that every valid /
# test item is also someone's training item
RATING_ROWS = [(1, item, 5, 100 + item) for item in range(1, 11)] + [
    (2, item, 5, 300 - item) for item in range(1, 11)
]


class _TouchesMarkerWhenUnpickled:
    """Unpickling this calls os.system; a safe loader refuses before the call."""

    def __init__(self, marker_path: str) -> None:
        self.marker_path = marker_path

    def __reduce__(self):
        return (os.system, (f"touch {self.marker_path}",))


def _diffrec_folder(tmp_path, **files) -> "os.PathLike":
    """A DiffRec split folder from TRAIN / VALID / TEST; ``train=...`` etc. replace a file's array."""
    folder = tmp_path / "split"
    folder.mkdir(exist_ok=True)
    for split, default in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        pairs = files.get(split, np.asarray(default, dtype=np.int64))
        np.save(folder / f"{split}_list.npy", pairs, allow_pickle=True)
    return folder


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _sequence_file(tmp_path, content) -> "os.PathLike":
    path = tmp_path / "dataset.pkl"
    path.write_bytes(pickle.dumps(content, protocol=4))
    return path


def _sequences_with(**changes) -> dict:
    content = {key: dict(value) for key, value in SEQUENCES.items()}
    for key, value in changes.items():
        content[key].update(value)
    return content


def _rating_lines(separator: str) -> str:
    return "".join(separator.join(map(str, row)) + "\n" for row in RATING_ROWS)


# --- controls: the clean files load, so each case below fails for the one thing it breaks ---


def test_clean_diffrec_split_loads(tmp_path):
    data = load_diffrec_split(_diffrec_folder(tmp_path))
    assert (data.n_users, data.n_items, data.train.nnz, data.valid.nnz, data.test.nnz) == (3, 3, 6, 2, 1)


def test_clean_sequences_load(tmp_path):
    data = load_sequences(_sequence_file(tmp_path, SEQUENCES))
    assert (data.n_users, data.n_items, data.train.nnz) == (2, 4, 4)


@pytest.mark.parametrize("file_name, separator", [("ratings.dat", "::"), ("u.data", "\t")])
def test_clean_ratings_load(tmp_path, file_name, separator):
    path = tmp_path / file_name
    path.write_text(_rating_lines(separator))
    assert load_ratings(path).n_users == 2


# --- 1. malformed or truncated .npy ---


def test_truncated_npy_names_declared_and_actual_sizes(tmp_path):
    folder = _diffrec_folder(tmp_path)
    content = _npy_bytes(np.asarray(TRAIN * 50, dtype=np.int64))
    (folder / "train_list.npy").write_bytes(content[: len(content) // 2])
    problem = r"train_list\.npy: truncated \.npy file: its header declares shape \(300, 2\)"
    with pytest.raises(DataError, match=problem):
        load_diffrec_split(folder)


@pytest.mark.parametrize(
    "content, problem",
    [
        (np.random.default_rng(0).bytes(64), r"not a \.npy file \(it does not start with the \.npy magic"),
        (b"user,item\n0,1\n", r"not a \.npy file"),
        (b"", r"the file is empty \(0 bytes\)"),
        (_npy_bytes(np.asarray(VALID))[:30], r"truncated or corrupt \.npy header"),
    ],
    ids=["random bytes", "text", "empty", "header cut"],
)
def test_malformed_npy(tmp_path, content, problem):
    folder = _diffrec_folder(tmp_path)
    (folder / "valid_list.npy").write_bytes(content)
    with pytest.raises(DataError, match=r"valid_list\.npy: " + problem):
        load_diffrec_split(folder)


def test_npz_archive_under_a_npy_name(tmp_path):
    folder = _diffrec_folder(tmp_path)
    with (folder / "test_list.npy").open("wb") as file:
        np.savez(file, pairs=np.asarray(TEST))
    with pytest.raises(DataError, match=r"test_list\.npy: is a \.npz \(zip\) archive"):
        load_diffrec_split(folder)


# --- 2. object arrays, float ids, wrong shapes ---


def test_object_array_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    payload = np.empty((1, 2), dtype=object)
    payload[0, 0], payload[0, 1] = _TouchesMarkerWhenUnpickled(str(marker)), 1
    folder = _diffrec_folder(tmp_path, train=payload)
    with pytest.raises(DataError, match=r"train_list\.npy: holds a pickled object array .*\(allow_pickle=False\)"):
        load_diffrec_split(folder)
    assert not marker.exists()


@pytest.mark.parametrize(
    "pairs, problem",
    [
        (np.array([[0.0, 2.0], [1.0, 0.5]]), r"non-integer id in row 1: \[1\.0, 0\.5\] \(dtype float64\)"),
        (np.array([[0.0, np.nan]]), r"non-integer id in row 0: \[0\.0, nan\]"),
        (np.array([[0.0, 2.0], [1.0, 0.0]]), r"expected integer ids, got dtype float64 \(whole numbers stored as"),
        (np.array([[True, False]]), r"expected integer ids, got dtype bool"),
        (np.array([["0", "2"]]), r"expected integer ids, got dtype <U1"),
    ],
    ids=["fraction", "nan", "whole floats", "bool", "strings"],
)
def test_non_integer_ids(tmp_path, pairs, problem):
    folder = _diffrec_folder(tmp_path, valid=pairs)
    with pytest.raises(DataError, match=r"valid_list\.npy: " + problem):
        load_diffrec_split(folder)


@pytest.mark.parametrize(
    "pairs, shape",
    [
        (np.zeros((4, 3), dtype=np.int64), r"\(4, 3\)"),
        (np.arange(6, dtype=np.int64), r"\(6,\)"),
        (np.zeros((3, 2, 1), dtype=np.int64), r"\(3, 2, 1\)"),
    ],
)
def test_wrong_shape(tmp_path, pairs, shape):
    folder = _diffrec_folder(tmp_path, train=pairs)
    problem = r"train_list\.npy: expected shape \(n, 2\) of \[user, item\] pairs, got shape " + shape
    with pytest.raises(DataError, match=problem):
        load_diffrec_split(folder)


# --- 3. negative, out-of-range and non-integer ids ---


@pytest.mark.parametrize(
    "split, pairs, problem",
    [
        ("train", np.array(TRAIN + [[-1, 0]]), r"negative id in row 6: \[-1, 0\]"),
        ("test", np.array([[0, 2**64 - 1]], dtype=np.uint64), r"id beyond the int64 range in row 0: \[0, 1844674"),
        ("valid", np.array([[0, 2], [3, 0]]), r"row 1 \[3, 0\] is outside the train range \(users 0\.\.2, items 0"),
        ("test", np.array([[2, 1], [0, 7]]), r"row 1 \[0, 7\] is outside the train range"),
    ],
    ids=["negative", "beyond int64", "valid user outside train", "test item outside train"],
)
def test_out_of_range_ids(tmp_path, split, pairs, problem):
    folder = _diffrec_folder(tmp_path, **{split: pairs})
    with pytest.raises(DataError, match=rf"{split}_list\.npy: " + problem):
        load_diffrec_split(folder)


def test_stray_huge_item_id_is_refused_before_anything_is_sized_by_it(tmp_path):
    folder = _diffrec_folder(tmp_path, train=np.array(TRAIN + [[1, 4_294_967_295]]))
    with pytest.raises(
        DataError,
        match=r"train_list\.npy: 4294967292 item id\(s\) between 0 and the largest, 4294967295 \(row 6\), "
        r"have no training row \(first: \[3, 4, 5, 6, 7\]\)",
    ):
        load_diffrec_split(folder)


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"train": {1: [2, 9]}}, r"'train' holds item id 9, outside 1\.\.4"),
        ({"val": {0: [-3]}}, r"'val' holds item id -3, outside 1\.\.4"),
        ({"test": {1: [2.0]}}, r"'test' holds a non-integer item id 2\.0 \(float\)"),
        ({"train": {"1": [2]}}, r"'train' has a user key '1' of type str"),
    ],
    ids=["item beyond smap", "negative item", "float item", "string user"],
)
def test_bad_ids_in_sequences(tmp_path, changes, problem):
    path = _sequence_file(tmp_path, _sequences_with(**changes))
    with pytest.raises(DataError, match=r"dataset\.pkl: " + problem):
        load_sequences(path)


# --- 4. duplicate interactions ---


def test_pair_repeated_within_a_split_is_dropped_with_a_warning(tmp_path, caplog):
    folder = _diffrec_folder(tmp_path, train=np.array(TRAIN + [[0, 1], [2, 2], [0, 1]]))
    with caplog.at_level(logging.WARNING, logger="refit_gym.data.diffrec"):
        data = load_diffrec_split(folder)
    assert data.train.nnz == 6 and data.train_sequences[0].tolist() == [0, 1]
    assert data.train_sequences[2].tolist() == [0, 2]
    (warning,) = caplog.records
    assert "train_list.npy: 3 repeated [user, item] row(s) dropped" in warning.getMessage()
    assert "row 6 [0, 1]" in warning.getMessage()


@pytest.mark.parametrize(
    "files, problem",
    [
        (
            {"valid": np.array([[0, 2], [1, 1]])},
            r"valid_list\.npy: row 1 \[1, 1\] is also in train_list\.npy \(row 2\): "
            r"a held-out pair that is also a training input leaks the answer",
        ),
        ({"test": np.array([[2, 1], [2, 0]])}, r"test_list\.npy: row 1 \[2, 0\] is also in train_list\.npy \(row 4"),
        (
            {"test": np.array([[2, 1], [1, 0]])},
            r"test_list\.npy: row 1 \[1, 0\] is also in valid_list\.npy \(row 1\): "
            r"a test pair that is also a valid pair can never count",
        ),
    ],
    ids=["train and valid", "train and test", "valid and test"],
)
def test_pair_in_two_splits_is_an_error(tmp_path, files, problem):
    with pytest.raises(DataError, match=problem):
        load_diffrec_split(_diffrec_folder(tmp_path, **files))


@pytest.mark.parametrize(
    "changes, problem",
    [
        (
            {"val": {1: [3]}},
            r"user 1's 'val' item 3 is also in 'train'\[1\]: a held-out item that is also a training input leaks",
        ),
        ({"test": {0: [2]}}, r"user 0's 'test' item 2 is also in 'train'\[0\]"),
        ({"test": {0: [3]}}, r"user 0's 'test' item 3 is also in 'val'\[0\]"),
    ],
    ids=["train and val", "train and test", "val and test"],
)
def test_sequence_item_in_history_and_held_out_is_an_error(tmp_path, changes, problem):
    with pytest.raises(DataError, match=r"dataset\.pkl: " + problem):
        load_sequences(_sequence_file(tmp_path, _sequences_with(**changes)))


def test_repeated_rating_rows_are_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "ratings.dat"
    path.write_text(_rating_lines("::") + "1::3::5::500\n1::3::4::501\n")
    with caplog.at_level(logging.WARNING, logger="refit_gym.data.ratings"):
        data = load_ratings(path)
    assert data.extras["split_drops"]["duplicates"] == 2
    assert data.train.multiply(data.valid).nnz == 0 and data.train.multiply(data.test).nnz == 0
    (warning,) = caplog.records
    assert "ratings.dat: 2 repeated (user, item) row(s) dropped" in warning.getMessage()


# --- 5. empty splits, users without training items ---


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_empty_split(tmp_path, split):
    folder = _diffrec_folder(tmp_path, **{split: np.zeros((0, 2), dtype=np.int64)})
    with pytest.raises(DataError, match=rf"{split}_list\.npy: the split is empty \(0 pairs\)"):
        load_diffrec_split(folder)


def test_user_without_training_rows(tmp_path):
    train = np.array([pair for pair in TRAIN if pair[0] != 1])
    folder = _diffrec_folder(tmp_path, train=train, valid=np.array([[0, 2]]))
    with pytest.raises(
        DataError,
        match=r"train_list\.npy: 1 user id\(s\) between 0 and the largest, 2 \(row 2\), have no training row "
        r"\(first: \[1\]\)",
    ):
        load_diffrec_split(folder)


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"train": {1: [0, 0]}}, r"1 user\(s\) have no training item \(only padding or an empty list\), e\.g\."),
        ({"test": {0: [], 1: [0]}}, r"the 'test' split is empty"),
        ({"val": {0: [3], 1: [0]}}, r"'val'\[1\] holds 0 item\(s\) \(padding removed\); leave-one-out needs exactly "
                                   r"one per user \(1 user\(s\) differ: \[1\]\)"),
        ({"test": {0: [4, 3], 1: [4]}}, r"'test'\[0\] holds 2 item\(s\)"),
    ],
    ids=["history of padding", "empty test", "a user without a val item", "two test items"],
)
def test_empty_sequences(tmp_path, changes, problem):
    with pytest.raises(DataError, match=r"dataset\.pkl: " + problem):
        load_sequences(_sequence_file(tmp_path, _sequences_with(**changes)))


def test_ratings_leaving_no_user_with_three_splits(tmp_path):
    path = tmp_path / "ratings.dat"
    path.write_text("1::1::5::1\n1::2::5::2\n")
    with pytest.raises(DataError, match=r"ratings\.dat: no user has enough positive interactions"):
        load_ratings(path)


# --- 6. ratings files with bad lines: file, line number and the line itself ---


@pytest.mark.parametrize(
    "file_name, bad_line, problem",
    [
        ("ratings.dat", "2::11::5", r"expected 4 fields 'user::item::rating::timestamp', got 3"),
        ("ratings.dat", "2::eleven::5::400", r"expected integer ids, a numeric rating and an integer time"),
        ("ratings.dat", "2::1.5::5::400", r"expected integer ids"),
        ("ratings.dat", "-1::11::5::400", r"negative user or item id"),
        ("ratings.dat", "2::99999999999999999999::5::400", r"user id, item id or timestamp beyond the int64"),
        ("ratings.dat", "2::11::nan::400", r"the rating is not a finite number"),
        ("ratings.dat", "2\t11\t5\t400", r"a tab in a '::'-separated line"),
        ("u.data", "2\t11\t5", r"expected 4 fields 'user<tab>item<tab>rating<tab>timestamp', got 3"),
        ("u.data", "2\t11\tfive\t400", r"expected integer ids, a numeric rating"),
    ],
)
def test_bad_line_in_a_headerless_ratings_file(tmp_path, file_name, bad_line, problem):
    separator = "::" if file_name == "ratings.dat" else "\t"
    lines = _rating_lines(separator).splitlines()
    lines.insert(5, bad_line)
    path = tmp_path / file_name
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{file_name.replace('.', '[.]')}: line 6: {problem}") as error:
        load_ratings(path)
    assert repr(bad_line) in str(error.value)


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ("2,11", r"expected 3 fields \('user,item,rating'\), got 2: '2,11'"),
        ("2,,5", r"empty user or item id: '2,,5'"),
        ("-1,11,5", r"negative user or item id: '-1,11,5'"),
        ("2,11,great", r"the rating is not a number: '2,11,great'"),
        ("2,11,inf", r"the rating is not a finite number: '2,11,inf'"),
    ],
)
def test_bad_line_in_a_csv(tmp_path, bad_line, problem):
    rows = [",".join(map(str, row[:3])) for row in RATING_ROWS]
    rows.insert(3, bad_line)
    path = tmp_path / "log.csv"
    path.write_text("user,item,rating\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"log\.csv: line 5: " + problem):
        load_ratings(path)


# --- 7. pickles: class or function references refused, never executed; corrupt files ---


def test_pickled_os_system_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "executed"
    content = _sequences_with(train={0: _TouchesMarkerWhenUnpickled(str(marker))})
    path = tmp_path / "dataset.pkl"
    path.write_bytes(pickle.dumps(content, protocol=4))
    refusal = r"dataset\.pkl: refusing to load the class or function (posix|nt|os)\.system"
    with pytest.raises(DataError, match=refusal):
        load_sequences(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, reference",
    [
        (b"cbuiltins\neval\n(S'1+1'\ntR.", r"builtins\.eval"),  # protocol 0 GLOBAL
        (pickle.dumps(np.int64(3)), r"numpy"),  # any class, even a harmless one
    ],
    ids=["protocol 0 eval", "numpy scalar"],
)
def test_any_class_reference_is_refused(tmp_path, content, reference):
    path = tmp_path / "data.pkl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"data\.pkl: refusing to load the class or function " + reference):
        load_builtin_pickle(path)


def test_copyreg_extension_code_is_refused(tmp_path):
    path = tmp_path / "extension.pkl"
    path.write_bytes(b"\x80\x02\x82\xf0X\x04\x00\x00\x00echo\x85R.")  # EXT1 240, then call it
    copyreg.add_extension("os", "system", 240)
    try:
        with pytest.raises(DataError, match=r"extension\.pkl: refusing to load the class or function os\.sys"):
            load_builtin_pickle(path)
    finally:
        copyreg.remove_extension("os", "system", 240)


@pytest.mark.parametrize(
    "content, problem",
    [
        (pickle.dumps(SEQUENCES, protocol=4)[:-40], r"not a valid pickle, or a truncated one"),
        (pickle.dumps(SEQUENCES, protocol=2)[:-1], r"not a valid pickle, or a truncated one \(pickle exhausted"),
        (np.random.default_rng(1).bytes(100), r"not a valid pickle"),
        (b"", r"the file is empty \(0 bytes\)"),
        # a memo index beyond the opcodes before it; at 4e9 CPython's unpickler would allocate
        # and zero a 64 GB memo table (1e6 here, so that a regression fails instead of swapping)
        (b"\x80\x02Nr\x40\x42\x0f\x00.", r"not a valid pickle \(memo index 1000000 of the LONG_BINPUT at"),
    ],
    ids=["truncated", "missing STOP", "random bytes", "empty", "huge memo index"],
)
def test_corrupt_pickles(tmp_path, content, problem):
    path = tmp_path / "dataset.pkl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"dataset\.pkl: " + problem):
        load_sequences(path)


def test_every_case_is_a_refit_gym_error():
    assert issubclass(DataError, RefitGymError) and issubclass(DataError, ValueError)
