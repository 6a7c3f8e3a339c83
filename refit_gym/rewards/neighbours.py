"""Each user's top-k most similar users on the training matrix, computed in blocks of users.

Similarities (rows ``x_u`` of the training matrix, ``n`` items):

* ``"cosine"``: ``x_u . x_v / (|x_u| |x_v|)``;
* ``"pearson"``: the cosine of the **full-row** mean-centred rows, ``x_u - mean(x_u)`` over all
  ``n`` items, zeros included. That is the standard Pearson correlation of two binary
  interaction vectors. Centring only the stored entries (the rating-data convention) is
  degenerate on implicit feedback: every stored value is 1, so every centred row would be 0.
  Full-row centring never densifies the matrix here, because
  ``(x_u - m_u) . (x_v - m_v) = x_u . x_v - n m_u m_v``: a rank-one correction of the sparse
  product.

A user whose row is empty (or constant, for Pearson) has similarity 0 to everyone. A user is
never its own neighbour. Ties are broken toward the smaller user id, so the result is exact
and deterministic: it does not depend on the block size, and the top ``k' < k`` is the prefix
of the top ``k``.

Cost: one sparse x dense product per block of ``block_size`` users (``O(nnz * block_size)``,
so ``O(nnz * n_users)`` in all: a one-time, cached cost that grows quadratically with the
number of users) and a top-k per row; memory ``O(block_size * n_users)``. The users x users
matrix is never held. It runs on the CPU (scipy + torch); only the resulting targets move to
the reward's device. On ML-1M (5,949 x 2,810, k = 20) it takes 1-3 s on a shared 2-core machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.sparse as sp
import torch

from refit_gym.rewards._checks import check_choice, check_int_in_range
from refit_gym.rewards.cache import MemoryCache, PathLike, load_arrays, matrix_fingerprint, resolve_cache_dir, save_arrays

SIMILARITIES = ("cosine", "pearson")
BLOCK_ENTRIES = 1 << 24
"""Default block: as many users as keep ``block_size * n_users`` near 16.8 M (at most 1024)."""

_MEMORY_CACHE = MemoryCache(maxsize=8)


@dataclass(frozen=True)
class UserNeighbours:
    """Each user's ``k`` most similar other users, most similar first.

    Attributes:
        ids: ``int64 (n_users, k)`` neighbour user ids.
        similarity: ``float32 (n_users, k)`` their similarities (can be ``<= 0`` when a user
            has fewer than ``k`` positively similar users).
        measure: ``"cosine"`` or ``"pearson"``.
    """

    ids: np.ndarray
    similarity: np.ndarray
    measure: str

    @property
    def n_users(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def truncate(self, k: int) -> "UserNeighbours":
        """The top ``k`` (a prefix, since rows are sorted with deterministic tie-breaking)."""
        if k == self.k:
            return self
        return UserNeighbours(self.ids[:, :k].copy(), self.similarity[:, :k].copy(), self.measure)

    def weight_matrix(self) -> sp.csr_matrix:
        """Sparse ``(n_users, n_users)`` float32: row ``u`` holds ``u``'s positive neighbour similarities."""
        weights = np.clip(self.similarity, 0.0, None).astype(np.float32)
        rows = np.repeat(np.arange(self.n_users, dtype=np.int64), self.k)
        matrix = sp.csr_matrix(
            (weights.ravel(), (rows, self.ids.ravel())), shape=(self.n_users, self.n_users), dtype=np.float32
        )
        matrix.eliminate_zeros()
        return matrix


def similarity_factors(train: sp.spmatrix, measure: str) -> tuple[sp.csr_matrix, Optional[np.ndarray]]:
    """Factors ``(Z, a)`` with ``sim(u, v) = z_u . z_v - a_u a_v`` (``a = None`` for cosine).

    Args:
        train: the ``(n_users, n_items)`` training matrix.
        measure: ``"cosine"`` or ``"pearson"`` (full-row centring, see the module docstring).

    Returns:
        ``Z`` float32 CSR (rows scaled to unit norm of the, possibly centred, row) and ``a``
        float64 ``(n_users,)`` (``sqrt(n) * mean / centred norm``), or ``None``.
    """
    check_choice(measure, SIMILARITIES, "similarity")
    csr = sp.csr_matrix(train, dtype=np.float64, copy=True)
    csr.sum_duplicates()
    n_items = csr.shape[1]
    squares = np.asarray(csr.multiply(csr).sum(axis=1)).ravel()
    if measure == "cosine":
        norm_sq, a = squares, None
    else:
        means = np.asarray(csr.sum(axis=1)).ravel() / n_items
        norm_sq = np.clip(squares - n_items * means**2, 0.0, None)
    norm = np.sqrt(norm_sq)
    # Rows with (numerically) zero norm -- empty, or constant for Pearson -- get similarity 0.
    scale = np.divide(1.0, norm, out=np.zeros_like(norm), where=(squares > 0) & (norm_sq > 1e-10 * squares))
    if measure == "pearson":
        a = np.sqrt(n_items) * means * scale
    factors = sp.diags(scale).dot(csr).tocsr().astype(np.float32)
    factors.sort_indices()
    return factors, a


def similarity_block(factors: sp.csr_matrix, a: Optional[np.ndarray], start: int, stop: int) -> np.ndarray:
    """Similarities of users ``start..stop-1`` to all users, ``float32 (n_users, stop - start)``.

    Column ``j`` is user ``start + j``; its own entry is ``-inf`` (a user is not its own neighbour).
    """
    block_t = factors[start:stop].T.toarray()  # (n_items, b), dense
    sims = np.asarray(factors @ block_t, dtype=np.float32)  # (n_users, b)
    if a is not None:
        a32 = a.astype(np.float32)
        sims -= np.outer(a32, a32[start:stop])
    columns = np.arange(stop - start)
    sims[start + columns, columns] = -np.inf
    return sims


def _order_keys(values: torch.Tensor, ids: torch.Tensor, n_ids: int) -> torch.Tensor:
    """int64 keys that sort like ``(value, -id)``: larger value first, then the smaller id."""
    bits = (values + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into 0.0
    monotone = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # ordered like the float values
    return monotone * (1 << 32) + (n_ids - 1 - ids)


def _top_k_rows(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``sims`` (block x users), the ``k`` largest columns, ties to the smaller column id.

    A float top-k picks the candidates; only rows whose k-th value is shared with a column left
    out are redone on exact ``(value, -id)`` keys, then each row's k are put in canonical order.
    """
    n_ids = sims.shape[1]
    values, ids = torch.topk(sims, k, dim=1, largest=True, sorted=False)
    kth = values.min(dim=1, keepdim=True).values
    tied = (sims >= kth).sum(dim=1) > k
    if bool(tied.any()):
        rows = sims[tied]
        all_ids = torch.arange(n_ids, dtype=torch.int64).expand_as(rows)
        top_keys = torch.topk(_order_keys(rows, all_ids, n_ids), k, dim=1).values
        ids[tied] = (n_ids - 1) - (top_keys & 0xFFFFFFFF)
        values[tied] = torch.gather(rows, 1, ids[tied])
    order = torch.argsort(_order_keys(values, ids, n_ids), dim=1, descending=True)
    return torch.gather(ids, 1, order), torch.gather(values, 1, order)


def default_block_size(n_users: int) -> int:
    """``min(1024, BLOCK_ENTRIES // n_users)``, at least 1."""
    return max(1, min(1024, BLOCK_ENTRIES // max(n_users, 1)))


def top_k_similar_users(
    train: sp.spmatrix,
    k: int,
    measure: str = "cosine",
    block_size: Optional[int] = None,
    progress: bool = False,
) -> UserNeighbours:
    """Compute every user's ``k`` most similar other users, ``block_size`` users at a time.

    Args:
        train: the ``(n_users, n_items)`` training matrix (binary or weighted).
        k: neighbours per user, ``1 <= k <= n_users - 1``.
        measure: ``"cosine"`` or ``"pearson"``.
        block_size: users per block (``None``: :func:`default_block_size`); the result does not
            depend on it, only time and memory do.
        progress: show a progress bar over the blocks.

    Returns:
        The :class:`UserNeighbours`.

    Raises:
        ConfigError: ``k`` or ``block_size`` out of range, or an unknown ``measure``.
    """
    n_users = int(train.shape[0])
    k = check_int_in_range(k, "the number of neighbours k", 1, n_users - 1)
    block_size = default_block_size(n_users) if block_size is None else check_int_in_range(block_size, "block_size", 1)
    factors, a = similarity_factors(train, measure)
    ids = np.empty((n_users, k), dtype=np.int64)
    sims = np.empty((n_users, k), dtype=np.float32)
    starts = range(0, n_users, block_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"{measure} neighbours", unit="block")
    for start in starts:
        stop = min(start + block_size, n_users)
        block = torch.from_numpy(similarity_block(factors, a, start, stop).T.copy())  # (b, n_users)
        block_ids, block_sims = _top_k_rows(block, k)
        ids[start:stop], sims[start:stop] = block_ids.numpy(), block_sims.numpy()
    return UserNeighbours(ids=ids, similarity=sims, measure=measure)


def _disk_path(cache_dir, fingerprint: str, measure: str, k: int):
    return cache_dir / f"neighbours-{fingerprint[:32]}-{measure}-k{k}.npz"


def _load_from_disk(cache_dir, fingerprint: str, measure: str, k: int, n_users: int) -> Optional[UserNeighbours]:
    """The cached neighbours with the fewest ``k' >= k`` on disk, truncated to ``k``; ``None`` if absent."""
    candidates = []
    for path in cache_dir.glob(f"neighbours-{fingerprint[:32]}-{measure}-k*.npz"):
        try:
            cached_k = int(path.name.rsplit("-k", 1)[1][: -len(".npz")])
        except ValueError:
            continue
        if cached_k >= k:
            candidates.append((cached_k, path))
    for cached_k, path in sorted(candidates):
        arrays = load_arrays(path)
        if (
            arrays is not None
            and set(arrays) == {"ids", "similarity"}
            and arrays["ids"].shape == (n_users, cached_k)
            and arrays["similarity"].shape == (n_users, cached_k)
        ):
            neighbours = UserNeighbours(arrays["ids"].astype(np.int64), arrays["similarity"].astype(np.float32), measure)
            return neighbours.truncate(k)
    return None


def find_neighbours(
    train: sp.spmatrix,
    k: int,
    measure: str = "cosine",
    block_size: Optional[int] = None,
    cache_dir: Optional[PathLike] = None,
    fingerprint: Optional[str] = None,
    progress: bool = False,
) -> UserNeighbours:
    """:func:`top_k_similar_users` behind an in-memory cache and an optional disk cache.

    A cached result for the same training matrix and measure with at least ``k`` neighbours is
    reused (truncated). New results are stored in memory and, with ``cache_dir``, on disk.

    Args:
        train, k, measure, block_size, progress: as in :func:`top_k_similar_users`.
        cache_dir: ``None`` (memory only), ``"auto"`` (the per-user cache folder,
            :func:`~refit_gym.rewards.cache.default_reward_cache_dir`) or a folder. Keep it out
            of the repository (e.g. the git-ignored ``.cache/``).
        fingerprint: :func:`~refit_gym.rewards.cache.matrix_fingerprint` of ``train`` if known.

    Returns:
        The :class:`UserNeighbours`.
    """
    n_users = int(train.shape[0])
    k = check_int_in_range(k, "the number of neighbours k", 1, n_users - 1)
    check_choice(measure, SIMILARITIES, "similarity")
    fingerprint = fingerprint or matrix_fingerprint(train)
    memory_key = (fingerprint, measure)
    cached = _MEMORY_CACHE.get(memory_key)
    if cached is not None and cached.k >= k:
        return cached.truncate(k)
    folder = resolve_cache_dir(cache_dir)
    neighbours = _load_from_disk(folder, fingerprint, measure, k, n_users) if folder is not None else None
    if neighbours is None:
        neighbours = top_k_similar_users(train, k, measure, block_size, progress)
        if folder is not None:
            save_arrays(
                _disk_path(folder, fingerprint, measure, k),
                {"ids": neighbours.ids, "similarity": neighbours.similarity},
            )
    _MEMORY_CACHE.put(memory_key, neighbours)
    return neighbours


def clear_memory_cache() -> None:
    """Forget the neighbour lists cached in this process."""
    _MEMORY_CACHE.clear()
