"""Loader of DiffuRec's sequential datasets (``dataset.pkl``, leave-one-out)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from refit_gym.data.checks import SHOWN_EXAMPLES, rows_shared_with
from refit_gym.data.interactions import InteractionData, UserSequences, pairs_to_csr
from refit_gym.data.safe_pickle import load_builtin_pickle
from refit_gym.data.titles import find_movies_file, read_movielens_titles, titles_in_order
from refit_gym.errors import DataError

SEQUENCE_FILE_NAME = "dataset.pkl"
PADDING_ITEM = 0
_SEQUENCE_KEYS = ("train", "val", "test")
_MOVIELENS_1M_NAME = re.compile(r"(ml|movielens)[-_]?1m", re.IGNORECASE)


def load_sequences(path: Union[str, os.PathLike], name: Optional[str] = None) -> InteractionData:
    """Load a DiffuRec ``dataset.pkl`` (through the builtin-only unpickler).

    The pickle is a dict with ``train`` / ``val`` / ``test`` (each a dict ``{user id: list of
    item ids}``, users ``0..n-1`` as ints), ``umap`` (raw user id -> user id) and ``smap``
    (raw item id -> item id). ``train[u]`` is user ``u``'s chronological history, ``val[u]``
    the next item and ``test[u]`` the one after it.

    **Item ids are shifted by -1**: the file numbers items ``1..n_items`` and keeps 0 for
    padding; the result numbers them ``0..n_items-1`` (``n_items = len(smap)``, or the
    largest id when ``smap`` is absent). Padding zeros inside lists are removed.
    ``train_sequences`` keeps each history's order (repeats included: a history may revisit an
    item); the ``train`` matrix is binary. Every user needs a training item, and a user's
    ``val`` / ``test`` items may not occur in their ``train`` history (that would leak the
    answer into the model's input) nor in each other.

    Titles: for ML-1M (file or folder name containing ``ml-1m``), a ``movies.dat`` next to the
    file or in a sibling ``movielens-1m_raw_partial/`` folder is used when every raw id in
    ``smap`` has a title; a ``movies.dat`` next to any other dataset is used too (ids without
    a title get ``"item <raw id>"``). ``extras["raw_item_ids"]`` holds the raw id of each item
    when ``smap`` is present.

    Args:
        path: the ``dataset.pkl`` file, or the folder holding it.
        name: the dataset name; defaults to the folder's name.

    Returns:
        The :class:`InteractionData`.

    Raises:
        DataError: missing file, a pickle referencing a class, missing keys, wrong key /
            value types, users not numbered ``0..n-1``, item ids out of range, empty split, a
            user without training items, a user without exactly one ``val`` and one ``test``
            item, an item both in a user's history and held out (or
            in both ``val`` and ``test``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / SEQUENCE_FILE_NAME
    elif not path.exists():
        raise DataError(f"{path}: not found (expected a DiffuRec {SEQUENCE_FILE_NAME} or a folder holding one)")
    content = load_builtin_pickle(path)
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a dict with keys train/val/test/umap/smap, got {type(content).__name__}")
    missing = [key for key in _SEQUENCE_KEYS if key not in content]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; expected train, val, test (and umap, smap)")
    train_lists = _user_lists(path, content["train"], "train")
    n_users = len(train_lists)
    valid_lists = _user_lists(path, content["val"], "val", n_users)
    test_lists = _user_lists(path, content["test"], "test", n_users)
    item_map = content.get("smap")
    if item_map is not None and not isinstance(item_map, dict):
        raise DataError(f"{path}: 'smap' must be a dict of raw item id -> item id, got {type(item_map).__name__}")

    splits = {}
    largest_item = 0
    for key, lists in (("train", train_lists), ("val", valid_lists), ("test", test_lists)):
        users, items = _flatten(path, key, lists)
        splits[key] = (users, items)
        if len(items):
            largest_item = max(largest_item, int(items.max()))
    n_items = len(item_map) if item_map else largest_item
    for key, (users, items) in splits.items():
        if len(items) == 0:
            raise DataError(f"{path}: the '{key}' split is empty")
        if items.min() < 1 or items.max() > n_items:
            bad = int(items[(items < 1) | (items > n_items)][0])
            raise DataError(
                f"{path}: '{key}' holds item id {bad}, outside 1..{n_items} "
                f"(ids are 1-based, 0 is padding, n_items = len(smap))"
            )
    _check_every_user_has_training_items(path, splits["train"][0], n_users)
    for key in ("val", "test"):
        _check_one_item_per_user(path, key, splits[key][0], n_users)
    _check_disjoint(path, splits)
    shifted = {key: (users, items - 1) for key, (users, items) in splits.items()}

    raw_item_ids = None
    if item_map:
        raw_item_ids = np.zeros(n_items, dtype=object)
        for raw_id, item_id in item_map.items():
            if not isinstance(item_id, int) or not 1 <= item_id <= n_items:
                raise DataError(f"{path}: smap maps {raw_id!r} to {item_id!r}, outside 1..{n_items}")
            raw_item_ids[item_id - 1] = raw_id
        if all(isinstance(raw_id, int) for raw_id in item_map):
            raw_item_ids = raw_item_ids.astype(np.int64)

    def to_csr(key: str):
        users, items = shifted[key]
        return pairs_to_csr(users, items, n_users, n_items)

    train_users, train_items = shifted["train"]
    return InteractionData(
        name=name or path.parent.name or path.stem,
        train=to_csr("train"),
        valid=to_csr("val"),
        test=to_csr("test"),
        train_sequences=UserSequences.from_pairs(train_users, train_items, n_users),
        item_titles=_titles(path, raw_item_ids),
        source=str(path),
        extras={"raw_item_ids": raw_item_ids, "item_id_shift": -1},
    )


def _user_lists(path: Path, mapping: Any, key: str, n_users: Optional[int] = None) -> list[list]:
    """Validate ``{user id: list}`` with int keys ``0..n-1`` and return the lists by user."""
    if not isinstance(mapping, dict):
        raise DataError(f"{path}: '{key}' must be a dict of user id -> item list, got {type(mapping).__name__}")
    bad_key = next((user for user in mapping if type(user) is not int), None)
    if bad_key is not None:
        raise DataError(
            f"{path}: '{key}' has a user key {bad_key!r} of type {type(bad_key).__name__}; "
            f"expected int user ids 0..n-1"
        )
    expected_users = len(mapping) if n_users is None else n_users
    if set(mapping) != set(range(expected_users)):
        extra = sorted(set(mapping) - set(range(expected_users)))[:5]
        absent = sorted(set(range(expected_users)) - set(mapping))[:5]
        raise DataError(
            f"{path}: '{key}' users must be exactly 0..{expected_users - 1} (as in 'train'); "
            f"unexpected {extra}, missing {absent}"
        )
    lists = [mapping[user] for user in range(expected_users)]
    bad_user = next((user for user, items in enumerate(lists) if not isinstance(items, (list, tuple))), None)
    if bad_user is not None:
        raise DataError(
            f"{path}: '{key}'[{bad_user}] must be a list of item ids, got {type(lists[bad_user]).__name__}"
        )
    return lists


def _flatten(path: Path, key: str, lists: list[list]) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) pairs in list order, padding zeros removed."""
    lengths = np.fromiter((len(items) for items in lists), dtype=np.int64, count=len(lists))
    users = np.repeat(np.arange(len(lists), dtype=np.int64), lengths)
    flat = [item for item_list in lists for item in item_list]
    if set(map(type, flat)) - {int}:
        bad = next(item for item in flat if type(item) is not int)
        raise DataError(f"{path}: '{key}' holds a non-integer item id {bad!r} ({type(bad).__name__})")
    try:
        items = np.array(flat, dtype=np.int64)
    except OverflowError as error:
        raise DataError(f"{path}: '{key}' holds an item id too large for int64 ({error})") from error
    not_padding = items != PADDING_ITEM
    return users[not_padding], items[not_padding]


def _check_every_user_has_training_items(path: Path, train_users: np.ndarray, n_users: int) -> None:
    """Raise when a user's training history is empty (or only padding)."""
    without_items = np.flatnonzero(np.bincount(train_users, minlength=n_users) == 0)
    if len(without_items):
        raise DataError(
            f"{path}: {len(without_items)} user(s) have no training item (only padding or an "
            f"empty list), e.g. 'train'[{int(without_items[0])}] (users: "
            f"{without_items[:SHOWN_EXAMPLES].tolist()}); every user needs a training history"
        )


def _check_one_item_per_user(path: Path, key: str, users: np.ndarray, n_users: int) -> None:
    """Raise unless every user holds out exactly one item in split ``key`` (leave-one-out)."""
    counts = np.bincount(users, minlength=n_users)
    wrong = np.flatnonzero(counts != 1)
    if len(wrong):
        user = int(wrong[0])
        raise DataError(
            f"{path}: '{key}'[{user}] holds {int(counts[user])} item(s) (padding removed); leave-one-out "
            f"needs exactly one per user ({len(wrong)} user(s) differ: {wrong[:SHOWN_EXAMPLES].tolist()}), "
            f"or HR and NDCG would count such users as misses or fail to rank them"
        )


def _check_disjoint(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Raise when a user's 'val' / 'test' item is also in their 'train' history, or in both."""
    pairs = {key: np.stack(split, axis=1) for key, split in splits.items()}
    for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = rows_shared_with(pairs[second], pairs[first])
        if not len(shared):
            continue
        user, item = pairs[second][shared[0]].tolist()
        why = (
            "a held-out item that is also a training input leaks the answer"
            if first == "train"
            else "the test input ends with the validation item, so such a test item repeats its own "
            "input (repeats as held-out items are not supported)"
        )
        raise DataError(
            f"{path}: user {user}'s '{second}' item {item} is also in '{first}'[{user}]: {why}; "
            f"{len(shared)} such pair(s), the splits must be disjoint"
        )


def _titles(path: Path, raw_item_ids: Optional[np.ndarray]) -> Optional[tuple[str, ...]]:
    """Item titles from an associated ``movies.dat`` (see :func:`load_sequences`)."""
    if raw_item_ids is None or raw_item_ids.dtype.kind not in "iu":
        return None
    is_movielens_1m = bool(_MOVIELENS_1M_NAME.search(f"{path.parent.name}/{path.name}"))
    movies_file = find_movies_file(path, allow_raw_ml1m_sibling=is_movielens_1m)
    if movies_file is None:
        return None
    titles_by_raw_id = read_movielens_titles(movies_file)
    next_to_file = movies_file.parent == path.parent
    if not next_to_file and not all(int(raw) in titles_by_raw_id for raw in raw_item_ids):
        return None
    return titles_in_order(raw_item_ids, titles_by_raw_id)
