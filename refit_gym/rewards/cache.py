"""Caching of bind-time precomputations (user neighbour lists), in memory and optionally on disk.

Entries are keyed by a fingerprint of the training matrix (a SHA-256 of its CSR arrays), so a
cache can never serve neighbours computed from other data. The disk cache is off unless a
folder is given; :func:`default_reward_cache_dir` is the per-user cache folder
(``$XDG_CACHE_HOME/refit_gym/rewards``), outside any repository. Files hold only derived
integer / float arrays, are written atomically and read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Union

import numpy as np
import scipy.sparse as sp

PathLike = Union[str, os.PathLike]


def default_reward_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/refit_gym/rewards`` (``~/.cache/refit_gym/rewards`` without it); not created."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return root / "refit_gym" / "rewards"


def resolve_cache_dir(cache_dir: Optional[PathLike]) -> Optional[Path]:
    """``None`` (memory only), ``"auto"`` (:func:`default_reward_cache_dir`) or the given folder."""
    if cache_dir is None:
        return None
    if str(cache_dir) == "auto":
        return default_reward_cache_dir()
    return Path(cache_dir).expanduser()


def matrix_fingerprint(matrix: sp.spmatrix) -> str:
    """A hex SHA-256 of a sparse matrix's shape and canonical CSR arrays (sorted, duplicates summed)."""
    csr = sp.csr_matrix(matrix, copy=True)
    csr.sum_duplicates()
    csr.sort_indices()
    digest = hashlib.sha256()
    digest.update(np.asarray(csr.shape, dtype=np.int64).tobytes())
    digest.update(csr.indptr.astype(np.int64).tobytes())
    digest.update(csr.indices.astype(np.int64).tobytes())
    digest.update(csr.data.astype(np.float64).tobytes())
    return digest.hexdigest()


class MemoryCache:
    """A small least-recently-used mapping (``maxsize`` entries) shared by all terms of a process."""

    def __init__(self, maxsize: int = 8) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict = OrderedDict()

    def get(self, key):
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key, value) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` (``.npz``) atomically, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.npz")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        raise


def load_arrays(path: Path) -> Optional[dict[str, np.ndarray]]:
    """The arrays of an ``.npz`` written by :func:`save_arrays`, or ``None`` if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None
