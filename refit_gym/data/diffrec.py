"""Loader of DiffRec's released splits (``train_list.npy`` / ``valid_list.npy`` / ``test_list.npy``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np

from refit_gym.data.checks import missing_ids, repeated_rows, rows_shared_with
from refit_gym.data.interactions import InteractionData, UserSequences, pairs_to_csr
from refit_gym.errors import DataError

DIFFREC_SPLIT_FILES = ("train_list.npy", "valid_list.npy", "test_list.npy")

_NPY_MAGIC = np.lib.format.MAGIC_PREFIX
_NPZ_MAGIC = b"PK\x03\x04"
_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
_INT64_MAX = np.iinfo(np.int64).max

logger = logging.getLogger(__name__)


def load_diffrec_split(folder: Union[str, os.PathLike], name: Optional[str] = None) -> InteractionData:
    """Load a DiffRec split folder.

    Each ``*_list.npy`` holds ``[user, item]`` int pairs of implicit feedback. The numbering
    is the files' own: ``n_users = max train user + 1``, ``n_items = max train item + 1``, so
    train defines it: every user id and every item id from 0 to its maximum must occur in
    ``train_list.npy`` (DiffRec conditions on each user's training row; a hole in the
    numbering is usually a file that was not renumbered, or a corrupt id). ``train_sequences``
    keep the row order of ``train_list.npy`` within each user, which is chronological up to
    ties on ML-1M (Kendall tau with time about 0.96, measured by aligning it with the
    time-ordered DiffuRec ML-1M sequences): "most recent" training items are the last rows, so
    any model or reward that reads this order is recency-aware. The released ML-1M split's
    periods are ordered train -> **test** -> **valid** (not train -> valid -> test): validation,
    which selects models, is later in time than test. An ``item_emb.npy`` (L-DiffRec) is ignored.

    A pair repeated within one file is dropped (the first row is kept) with a logged warning.
    A pair in two files (train and valid, train and test, or valid and test) is an error:
    a held-out item that is also a training input leaks the answer, and one in both valid and
    test could never count in test (ranking for test masks valid items).

    Args:
        folder: the folder holding the three ``*_list.npy`` files.
        name: the dataset name; defaults to the folder's name.

    Returns:
        The :class:`InteractionData`.

    Raises:
        DataError: a file is missing, empty, truncated or not a ``.npy`` array, holds objects
            (refused without unpickling), is not an ``(n, 2)`` integer array, holds negative ids,
            is an empty split; a user or item id has no training row; a valid / test id is
            outside the train range; a pair occurs in two splits. The message names the file
            and the problem (and the row where there is one).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (expected a DiffRec split folder)")
    paths = [folder / file_name for file_name in DIFFREC_SPLIT_FILES]
    train_pairs, valid_pairs, test_pairs = (_load_pairs(path) for path in paths)
    _check_every_id_has_a_train_row(paths[0], train_pairs)
    n_users = int(train_pairs[:, 0].max()) + 1
    n_items = int(train_pairs[:, 1].max()) + 1
    for path, pairs in zip(paths[1:], (valid_pairs, test_pairs)):
        _check_in_train_range(path, pairs, n_users, n_items)
    train_pairs, valid_pairs, test_pairs = (
        _drop_repeated_pairs(path, pairs)
        for path, pairs in zip(paths, (train_pairs, valid_pairs, test_pairs))
    )
    _check_disjoint(paths, (train_pairs, valid_pairs, test_pairs))

    def to_csr(pairs: np.ndarray):
        return pairs_to_csr(pairs[:, 0], pairs[:, 1], n_users, n_items)

    return InteractionData(
        name=name or folder.name,
        train=to_csr(train_pairs),
        valid=to_csr(valid_pairs),
        test=to_csr(test_pairs),
        train_sequences=UserSequences.from_pairs(train_pairs[:, 0], train_pairs[:, 1], n_users),
        source=str(folder),
    )


def _load_pairs(path: Path) -> np.ndarray:
    """Load and validate one ``[user, item]`` pair file as an int64 ``(n, 2)`` array."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (a DiffRec split needs {', '.join(DIFFREC_SPLIT_FILES)})")
    pairs = _read_npy(path)
    if len(pairs) == 0:
        raise DataError(f"{path}: the split is empty (0 pairs)")
    _check_integer_ids(path, pairs)
    if pairs.min() < 0:
        row = int(np.argwhere(pairs < 0)[0, 0])
        raise DataError(f"{path}: negative id in row {row}: {pairs[row].tolist()}")
    if pairs.dtype.kind == "u" and pairs.max() > _INT64_MAX:
        row = int(np.argwhere(pairs > _INT64_MAX)[0, 0])
        raise DataError(f"{path}: id beyond the int64 range in row {row}: {pairs[row].tolist()}")
    return pairs.astype(np.int64, copy=False)


def _read_npy(path: Path) -> np.ndarray:
    """The array of a ``.npy`` file, whose header is checked before any data is read."""
    try:
        with path.open("rb") as file:
            _check_npy_header(path, file)
            file.seek(0)
            return np.lib.format.read_array(file, allow_pickle=False)
    except DataError:
        raise
    except (ValueError, EOFError, OSError, MemoryError) as error:
        raise DataError(
            f"{path}: cannot read it as a .npy array ({type(error).__name__}: {error})"
        ) from error


def _check_npy_header(path: Path, file: BinaryIO) -> None:
    """Refuse a file that is not a ``.npy`` array of ``(n, 2)`` plain values, or that is shorter
    than its header says (a truncated copy)."""
    prefix = file.read(len(_NPY_MAGIC))
    if not prefix:
        raise DataError(f"{path}: the file is empty (0 bytes)")
    if prefix.startswith(_NPZ_MAGIC):
        raise DataError(f"{path}: is a .npz (zip) archive; expected a single .npy array")
    if prefix != _NPY_MAGIC:
        raise DataError(
            f"{path}: not a .npy file (it does not start with the .npy magic bytes "
            f"{_NPY_MAGIC!r}; it starts with {prefix!r})"
        )
    file.seek(0)
    try:
        version = np.lib.format.read_magic(file)
        if version not in _NPY_HEADER_READERS:
            raise DataError(f"{path}: unsupported .npy format version {version}; expected 1.0 or 2.0")
        shape, _, dtype = _NPY_HEADER_READERS[version](file)
    except DataError:
        raise
    except (ValueError, EOFError) as error:
        raise DataError(f"{path}: truncated or corrupt .npy header ({error})") from error
    if dtype.hasobject:
        raise DataError(
            f"{path}: holds a pickled object array (dtype {dtype}); refit-gym loads only plain "
            f"numeric .npy arrays and never unpickles them (allow_pickle=False)"
        )
    if len(shape) != 2 or shape[1] != 2:
        raise DataError(f"{path}: expected shape (n, 2) of [user, item] pairs, got shape {shape}")
    data_bytes = shape[0] * shape[1] * dtype.itemsize
    available = os.fstat(file.fileno()).st_size - file.tell()
    if available < data_bytes:
        raise DataError(
            f"{path}: truncated .npy file: its header declares shape {shape} of {dtype} "
            f"({data_bytes} bytes of data) but only {available} bytes follow the header"
        )


def _check_integer_ids(path: Path, pairs: np.ndarray) -> None:
    """Refuse any dtype but integers, naming the first non-integer value of a float array."""
    if np.issubdtype(pairs.dtype, np.integer):
        return
    if np.issubdtype(pairs.dtype, np.floating):
        not_whole = ~np.isfinite(pairs) | (pairs != np.round(pairs))
        if not_whole.any():
            row = int(np.argwhere(not_whole)[0, 0])
            raise DataError(
                f"{path}: non-integer id in row {row}: {pairs[row].tolist()} (dtype {pairs.dtype})"
            )
        raise DataError(
            f"{path}: expected integer ids, got dtype {pairs.dtype} (whole numbers stored as "
            f"floats); save the pairs as integers, e.g. np.save(path, pairs.astype(np.int64))"
        )
    raise DataError(f"{path}: expected integer ids, got dtype {pairs.dtype}")


def _check_every_id_has_a_train_row(path: Path, pairs: np.ndarray) -> None:
    """Raise when a user or item id between 0 and the largest one never occurs in train."""
    for column, kind in ((0, "user"), (1, "item")):
        missing = missing_ids(pairs[:, column])
        if missing.count:
            largest_row = int(np.argmax(pairs[:, column]))
            raise DataError(
                f"{path}: {missing.count} {kind} id(s) between 0 and the largest, "
                f"{int(pairs[largest_row, column])} (row {largest_row}), have no training row "
                f"(first: {missing.first}); DiffRec numbers {kind}s 0..n-1 by train and every "
                f"{kind} needs a training row: renumber the {kind}s compactly"
            )


def _check_in_train_range(path: Path, pairs: np.ndarray, n_users: int, n_items: int) -> None:
    """Raise when a held-out pair refers to a user or item beyond train's range."""
    outside = (pairs[:, 0] >= n_users) | (pairs[:, 1] >= n_items)
    if outside.any():
        row = int(np.flatnonzero(outside)[0])
        raise DataError(
            f"{path}: row {row} {pairs[row].tolist()} is outside the train range "
            f"(users 0..{n_users - 1}, items 0..{n_items - 1}); {int(outside.sum())} such row(s)"
        )


def _drop_repeated_pairs(path: Path, pairs: np.ndarray) -> np.ndarray:
    """The pairs without rows that repeat an earlier row of the same file (logged as a warning)."""
    repeated = repeated_rows(pairs)
    if not repeated.any():
        return pairs
    rows = np.flatnonzero(repeated)
    logger.warning(
        "%s: %d repeated [user, item] row(s) dropped, the first row of each pair kept (e.g. row %d %s)",
        path,
        len(rows),
        rows[0],
        pairs[rows[0]].tolist(),
    )
    return pairs[~repeated]


def _check_disjoint(paths: list[Path], splits: tuple[np.ndarray, ...]) -> None:
    """Raise when a pair occurs in two split files (a leak, or a target that cannot count)."""
    for first, second in ((0, 1), (0, 2), (1, 2)):
        shared = rows_shared_with(splits[second], splits[first])
        if not len(shared):
            continue
        row = int(shared[0])
        first_row = int(rows_shared_with(splits[first], splits[second][row : row + 1])[0])
        why = (
            "a held-out pair that is also a training input leaks the answer"
            if first == 0
            else "a test pair that is also a valid pair can never count (ranking for test masks valid items)"
        )
        raise DataError(
            f"{paths[second]}: row {row} {splits[second][row].tolist()} is also in "
            f"{paths[first].name} (row {first_row}): {why}; {len(shared)} such row(s), the "
            f"splits must be disjoint"
        )
