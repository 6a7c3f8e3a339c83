"""The one interaction-data type every loader returns and every model, env and metric reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import scipy.sparse as sp

from refit_gym.errors import DataError


@dataclass(frozen=True)
class UserSequences:
    """Each user's training items in chronological order, stored flat (CSR-style).

    ``items[indptr[u]:indptr[u + 1]]`` are user ``u``'s training items, oldest first. Unlike the
    rows of a CSR matrix (sorted by item id), this keeps the order in which the user interacted,
    which decides what "most recent" means for held-out rewards.
    """

    indptr: np.ndarray  # int64, (n_users + 1,)
    items: np.ndarray  # int64, (n_interactions,)

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def __getitem__(self, user: int) -> np.ndarray:
        return self.items[self.indptr[user] : self.indptr[user + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    @classmethod
    def from_lists(cls, sequences: Sequence[Sequence[int]]) -> "UserSequences":
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        indptr = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        items = (
            np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
            if len(sequences) and indptr[-1] > 0
            else np.zeros(0, dtype=np.int64)
        )
        return cls(indptr=indptr, items=items)

    def extended(self, extra: sp.csr_matrix) -> "UserSequences":
        """Each user's sequence followed by the stored items of the user's row of ``extra``
        (in the row's item order): e.g. training followed by validation items, the input of a
        sequential test."""
        extra = sp.csr_matrix(extra)
        if extra.shape[0] != len(self):
            raise DataError(f"cannot extend {len(self)} sequences with a matrix of {extra.shape[0]} rows")
        lengths = self.lengths + np.diff(extra.indptr)
        indptr = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        own = np.arange(len(self.items), dtype=np.int64) + np.repeat(indptr[:-1] - self.indptr[:-1], self.lengths)
        added = np.arange(extra.nnz, dtype=np.int64) + np.repeat(indptr[:-1] + self.lengths - extra.indptr[:-1],
                                                                 np.diff(extra.indptr))
        items = np.empty(indptr[-1], dtype=np.int64)
        items[own] = self.items
        items[added] = extra.indices
        return UserSequences(indptr=indptr, items=items)

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray, n_users: int) -> "UserSequences":
        """Group ``(user, item)`` pairs by user, keeping the pairs' order within each user."""
        order = np.argsort(users, kind="stable")
        counts = np.bincount(users, minlength=n_users)
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(indptr=indptr, items=np.asarray(items, dtype=np.int64)[order])


def pairs_to_csr(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """A binary float32 users x items CSR matrix from ``(user, item)`` pairs (duplicates count once)."""
    matrix = sp.csr_matrix(
        (np.ones(len(users), dtype=np.float32), (np.asarray(users), np.asarray(items))),
        shape=(n_users, n_items),
        dtype=np.float32,
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    matrix.sort_indices()
    return matrix


@dataclass(frozen=True)
class InteractionData:
    """Implicit-feedback interactions split into train / valid / test.

    Attributes:
        name: a short name used in logs and results (e.g. ``"diffrec_ml-1m_clean"``).
        train, valid, test: binary float32 CSR matrices of shape ``(n_users, n_items)``.
            Users and items are numbered ``0..n-1`` in the dataset's own numbering.
        train_sequences: each user's training items in chronological order (see
            :class:`UserSequences`); for data without timestamps, the file's row order.
        item_titles: optional human-readable item names, indexed by item id.
        source: where the data came from (a path or ``"synthetic(...)"``), for the run record.

    Only ``train`` (and ``train_sequences``) may ever feed a model input or a reward; ``valid``
    and ``test`` are ground truth for evaluation.
    """

    name: str
    train: sp.csr_matrix
    valid: sp.csr_matrix
    test: sp.csr_matrix
    train_sequences: UserSequences
    item_titles: Optional[tuple[str, ...]] = None
    source: str = ""
    extras: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        shape = self.train.shape
        for split_name in ("valid", "test"):
            split = getattr(self, split_name)
            if split.shape != shape:
                raise DataError(
                    f"{self.name}: the {split_name} matrix has shape {split.shape} but train has "
                    f"{shape}; all splits must share one user and item numbering"
                )
        for split_name in ("train", "valid", "test"):
            if getattr(self, split_name).nnz == 0:
                raise DataError(f"{self.name}: the {split_name} split is empty")
        if len(self.train_sequences) != shape[0]:
            raise DataError(
                f"{self.name}: train_sequences has {len(self.train_sequences)} users but the "
                f"train matrix has {shape[0]}"
            )
        if self.item_titles is not None and len(self.item_titles) != shape[1]:
            raise DataError(
                f"{self.name}: {len(self.item_titles)} item titles for {shape[1]} items"
            )

    @property
    def n_users(self) -> int:
        return int(self.train.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.train.shape[1])

    def split(self, name: str) -> sp.csr_matrix:
        """The ground-truth matrix of split ``name`` (``"valid"`` or ``"test"``)."""
        if name not in ("train", "valid", "test"):
            raise DataError(f"unknown split {name!r}; expected 'train', 'valid' or 'test'")
        return getattr(self, name)

    def seen_before(self, split: str) -> sp.csr_matrix:
        """Items to exclude when ranking for ``split``: train for valid, train + valid for test."""
        if split == "valid":
            return self.train
        if split == "test":
            seen = (self.train + self.valid).tocsr()
            seen.data[:] = 1.0
            return seen
        raise DataError(f"unknown evaluation split {split!r}; expected 'valid' or 'test'")

    def summary(self) -> dict:
        """Counts for logs and the run record."""
        return {
            "name": self.name,
            "source": self.source,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_train": int(self.train.nnz),
            "n_valid": int(self.valid.nnz),
            "n_test": int(self.test.nnz),
            "density": float(self.train.nnz) / (self.n_users * self.n_items),
        }


@dataclass(frozen=True)
class TrainingInteractions:
    """The only view of a dataset that models and rewards receive: training interactions, nothing else."""

    train: sp.csr_matrix
    train_sequences: UserSequences
    name: str = ""

    @classmethod
    def from_data(cls, data: InteractionData) -> "TrainingInteractions":
        return cls(train=data.train, train_sequences=data.train_sequences, name=data.name)

    @property
    def n_users(self) -> int:
        return int(self.train.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.train.shape[1])
