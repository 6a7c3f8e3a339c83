"""Loader of DiffRec's released splits (``train_list.npy`` / ``valid_list.npy`` / ``test_list.npy``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from refit_gym.data.interactions import InteractionData, UserSequences, pairs_to_csr
from refit_gym.errors import DataError

DIFFREC_SPLIT_FILES = ("train_list.npy", "valid_list.npy", "test_list.npy")


def load_diffrec_split(folder: Union[str, os.PathLike], name: Optional[str] = None) -> InteractionData:
    """Load a DiffRec split folder.

    Each ``*_list.npy`` holds ``[user, item]`` int pairs of implicit feedback. The numbering
    is the files' own: ``n_users = max train user + 1``, ``n_items = max train item + 1``.
    ``train_sequences`` keep the row order of ``train_list.npy`` within each user (DiffRec
    writes each user's items chronologically). An ``item_emb.npy`` (L-DiffRec) is ignored.

    Args:
        folder: the folder holding the three ``*_list.npy`` files.
        name: the dataset name; defaults to the folder's name.

    Returns:
        The :class:`InteractionData`.

    Raises:
        DataError: a file is missing, holds objects (pickled data), is not an ``(n, 2)``
            integer array, holds negative ids, is empty, or a valid / test id is outside the
            train range. The message names the file and the problem.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (expected a DiffRec split folder)")
    train_pairs, valid_pairs, test_pairs = (
        _load_pairs(folder / file_name) for file_name in DIFFREC_SPLIT_FILES
    )
    n_users = int(train_pairs[:, 0].max()) + 1
    n_items = int(train_pairs[:, 1].max()) + 1
    for file_name, pairs in zip(DIFFREC_SPLIT_FILES[1:], (valid_pairs, test_pairs)):
        _check_in_train_range(folder / file_name, pairs, n_users, n_items)

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
    try:
        pairs = np.load(path, allow_pickle=False)
    except ValueError as error:
        if "allow_pickle" in str(error) or "Object arrays" in str(error):
            raise DataError(
                f"{path}: holds a pickled object array; refit-gym loads only plain numeric "
                f".npy arrays (allow_pickle=False)"
            ) from error
        raise DataError(f"{path}: not a valid .npy array ({error})") from error
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read it as a .npy array ({error})") from error
    if not isinstance(pairs, np.ndarray):
        raise DataError(f"{path}: expected a single .npy array, got {type(pairs).__name__}")
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise DataError(f"{path}: expected shape (n, 2) of [user, item] pairs, got shape {pairs.shape}")
    if not np.issubdtype(pairs.dtype, np.integer):
        raise DataError(f"{path}: expected integer ids, got dtype {pairs.dtype}")
    if len(pairs) == 0:
        raise DataError(f"{path}: the split is empty (0 pairs)")
    if pairs.min() < 0:
        row = int(np.argwhere(pairs < 0)[0, 0])
        raise DataError(f"{path}: negative id in row {row}: {pairs[row].tolist()}")
    return pairs.astype(np.int64, copy=False)


def _check_in_train_range(path: Path, pairs: np.ndarray, n_users: int, n_items: int) -> None:
    """Raise when a held-out pair refers to a user or item beyond train's range."""
    outside = (pairs[:, 0] >= n_users) | (pairs[:, 1] >= n_items)
    if outside.any():
        row = int(np.flatnonzero(outside)[0])
        raise DataError(
            f"{path}: row {row} {pairs[row].tolist()} is outside the train range "
            f"(users 0..{n_users - 1}, items 0..{n_items - 1}); {int(outside.sum())} such rows"
        )
