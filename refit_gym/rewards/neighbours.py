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

How (``method="symmetric"``, the default): the users are taken in blocks of ``block_size``; block
``[s, e)`` is multiplied (sparse x dense, scipy) with the users ``v >= s`` only, which gives the
block's own candidates among ``v >= s`` and, for every later user, its candidates in the block;
those are merged into a running top-k that holds each user's best among ``v < s`` when its own
block comes. So every pair of users is multiplied once, not twice as in ``method="direct"``
(every block against all users, the reference). Both return the same arrays bit for bit: a
pair's similarity is the float32 sum of the same products in the same (ascending item) order
whichever of the two users is in the block, and candidates are compared by exact
``(value, -id)`` keys. A user whose block values are all at most its running k-th value is
skipped by the merge (equal values lose: the running ids are smaller).

Cost: ``O(nnz * n_users / 2)`` multiply-adds in all, a one-time, cached cost: quadratic in the
number of users at a fixed number of items per user, cubic in a factor that scales users and
items together at a fixed density (``nnz`` grows with both); a top-k per row; memory
``O(block_size * n_users + k * n_users)``. The users x users matrix is never held. It runs on
the CPU (scipy + torch, one thread); only the resulting targets move to the reward's device.
The default block keeps the dense ``n_items x block_size`` operand in cache
(:data:`BLOCK_ITEM_ENTRIES`). Measured (``benchmarks/bench_memory.py``, synthetic data at ML-1M's
density, k = 20, one thread on a 2-core machine shared with another job), against the direct
search with its former blocks of ``min(1024, 2**24 // n_users)`` users:

=====================  ===========  ==========  =====
size                   before       now         ratio
=====================  ===========  ==========  =====
1x (5,949 x 2,810)     0.80 s       0.46 s      1.7
3x (17,847 x 8,430)    14.6 s       5.7 s       2.6
10x (59,490 x 28,100)  1115 s       190 s       5.9
=====================  ===========  ==========  =====

(Each row one process, the two searches one after the other, identical results. The machine's
load average rose from about 5 to 8 during the 10x "before" run, which inflates that ratio;
extrapolated from the direct product's cost per block, timed separately, it is about 4.) At 50x
ML-1M (297,450 x 140,500) the search is 125 times the 10x one: about 7 hours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.sparse as sp
import torch

from refit_gym.errors import ConfigError
from refit_gym.rewards._checks import check_choice, check_int_in_range
from refit_gym.rewards.cache import MemoryCache, PathLike, load_arrays, matrix_fingerprint, resolve_cache_dir, save_arrays

SIMILARITIES = ("cosine", "pearson")
METHODS = ("symmetric", "direct")
BLOCK_ENTRIES = 1 << 24
"""Default block: at most as many users as keep ``block_size * n_users`` near 16.8 M."""
BLOCK_ITEM_ENTRIES = 1 << 22
"""Default block: at most as many users as keep the dense ``n_items x block_size`` operand near
4.2 M entries (16 MB), rounded down to a power of two, at most 512 (measured fastest on 1x, 3x
and 10x ML-1M: 512, 256 and 128 users; a block whose operand overflows the cache is up to 2x slower)."""

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
        return neighbour_weight_rows(self.ids, self.similarity, self.n_users)


def neighbour_weight_rows(ids: np.ndarray, similarity: np.ndarray, n_users: int) -> sp.csr_matrix:
    """Sparse ``(B, n_users)`` float32: row ``b`` holds ``max(similarity[b], 0)`` at the columns ``ids[b]``."""
    weights = np.clip(similarity, 0.0, None).astype(np.float32)
    rows = np.repeat(np.arange(ids.shape[0], dtype=np.int64), ids.shape[1])
    matrix = sp.csr_matrix((weights.ravel(), (rows, ids.ravel())), shape=(ids.shape[0], n_users), dtype=np.float32)
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


def similarity_block(
    factors: sp.csr_matrix, a: Optional[np.ndarray], start: int, stop: int, first_row: int = 0
) -> np.ndarray:
    """Similarities of users ``start..stop-1`` to users ``first_row..``, ``float32 (n_users - first_row, stop - start)``.

    Row ``i`` is user ``first_row + i``, column ``j`` user ``start + j``; a user's own entry is
    ``-inf`` (a user is not its own neighbour). Entry ``(v, u)`` is the float32 sum of
    ``z_vi * z_ui`` over the items ``i`` of ``v`` in ascending order (scipy's CSR x dense
    product), the same float as entry ``(u, v)``: the products are the same and so is the order.
    """
    block_t = factors[start:stop].T.toarray()  # (n_items, b), dense
    sims = np.asarray(_rows_from(factors, first_row) @ block_t, dtype=np.float32)  # (n_users - first_row, b)
    if a is not None:
        a32 = a.astype(np.float32)
        sims -= np.outer(a32[first_row:], a32[start:stop])
    columns = np.arange(stop - start)
    own_rows = start + columns - first_row
    inside = own_rows >= 0
    sims[own_rows[inside], columns[inside]] = -np.inf
    return sims


def _rows_from(matrix: sp.csr_matrix, first_row: int) -> sp.csr_matrix:
    """Rows ``first_row..`` of a CSR matrix as a view of its arrays (scipy's slicing copies them)."""
    if first_row == 0:
        return matrix
    offset = matrix.indptr[first_row]
    return sp.csr_matrix(
        (matrix.data[offset:], matrix.indices[offset:], matrix.indptr[first_row:] - offset),
        shape=(matrix.shape[0] - first_row, matrix.shape[1]), copy=False,
    )


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


def default_block_size(n_users: int, n_items: Optional[int] = None) -> int:
    """``min(512, BLOCK_ENTRIES // n_users, 2 ** floor(log2(BLOCK_ITEM_ENTRIES // n_items)))``, at least 1."""
    size = min(512, BLOCK_ENTRIES // max(n_users, 1))
    if n_items is not None:
        size = min(size, 1 << max(0, (BLOCK_ITEM_ENTRIES // max(n_items, 1)).bit_length() - 1))
    return max(1, size)


def top_k_similar_users(
    train: sp.spmatrix,
    k: int,
    measure: str = "cosine",
    block_size: Optional[int] = None,
    progress: bool = False,
    method: str = "symmetric",
) -> UserNeighbours:
    """Compute every user's ``k`` most similar other users, ``block_size`` users at a time.

    Args:
        train: the ``(n_users, n_items)`` training matrix (binary or weighted).
        k: neighbours per user, ``1 <= k <= n_users - 1``.
        measure: ``"cosine"`` or ``"pearson"``.
        block_size: users per block (``None``: :func:`default_block_size`); the result does not
            depend on it, only time and memory do.
        progress: show a progress bar over the blocks.
        method: ``"symmetric"`` (each pair of users once, see the module docstring) or
            ``"direct"`` (each block against all users: twice the products; the reference).
            Both return the same arrays, bit for bit.

    Returns:
        The :class:`UserNeighbours`.

    Raises:
        ConfigError: ``k`` or ``block_size`` out of range, or an unknown ``measure`` or ``method``.
    """
    n_users = int(train.shape[0])
    k = check_int_in_range(k, "the number of neighbours k", 1, n_users - 1)
    if block_size is None:
        block_size = default_block_size(n_users, int(train.shape[1]))
    block_size = check_int_in_range(block_size, "block_size", 1)
    check_choice(method, METHODS, "neighbour search method")
    factors, a = similarity_factors(train, measure)
    starts = range(0, n_users, block_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"{measure} neighbours", unit="block")
    search = _symmetric_top_k if method == "symmetric" else _direct_top_k
    ids, sims = search(factors, a, k, block_size, starts)
    return UserNeighbours(ids=ids, similarity=sims, measure=measure)


def _direct_top_k(factors: sp.csr_matrix, a: Optional[np.ndarray], k: int, block_size: int,
                  starts) -> tuple[np.ndarray, np.ndarray]:
    """Each block of users against every user, its rows' top-k taken at once."""
    n_users = factors.shape[0]
    ids = np.empty((n_users, k), dtype=np.int64)
    sims = np.empty((n_users, k), dtype=np.float32)
    for start in starts:
        stop = min(start + block_size, n_users)
        block = torch.from_numpy(similarity_block(factors, a, start, stop).T.copy())  # (b, n_users)
        block_ids, block_sims = _top_k_rows(block, k)
        ids[start:stop], sims[start:stop] = block_ids.numpy(), block_sims.numpy()
    return ids, sims


def _symmetric_top_k(factors: sp.csr_matrix, a: Optional[np.ndarray], k: int, block_size: int,
                     starts) -> tuple[np.ndarray, np.ndarray]:
    """Each pair of users once: a block against itself and the users after it.

    The similarities of block ``[s, e)`` to users ``v >= s`` give (1) the block's candidates
    among ``v >= s`` and (2) every later user's candidates among the block; (2) is merged into
    a running top-k of each later user, which by the time its own block comes holds its best
    among all ``v < s``. Candidates are compared by exact ``(value, -id)`` keys, so the merge
    is exact, and a pair's similarity is the same float whichever user is the block's (a
    float32 sum of the same products over the same items in the same, ascending item order).
    """
    n_users = factors.shape[0]
    ids = np.empty((n_users, k), dtype=np.int64)
    sims = np.empty((n_users, k), dtype=np.float32)
    # the running best of each user among the blocks before its own; padding sorts below every candidate
    best_keys = torch.full((n_users, k), torch.iinfo(torch.int64).min, dtype=torch.int64)
    best_values = torch.full((n_users, k), float("-inf"), dtype=torch.float32)

    def merge(keys: torch.Tensor, values: torch.Tensor, new_ids: torch.Tensor, new_values: torch.Tensor):
        all_keys = torch.cat([keys, _order_keys(new_values, new_ids, n_users)], dim=1)
        top_keys, where = torch.topk(all_keys, k, dim=1, largest=True, sorted=True)
        return top_keys, torch.gather(torch.cat([values, new_values], dim=1), 1, where)

    for start in starts:
        stop = min(start + block_size, n_users)
        # (n_users - start, b): users v >= start x the block's users
        block = torch.from_numpy(similarity_block(factors, a, start, stop, first_row=start))
        columns = block.T.contiguous()  # the block's users x users v >= start
        found_ids, found_values = _top_k_rows(columns, min(k, n_users - start))
        keys, values = merge(best_keys[start:stop], best_values[start:stop], found_ids + start, found_values)
        ids[start:stop] = ((n_users - 1) - (keys & 0xFFFFFFFF)).numpy()
        sims[start:stop] = values.numpy()
        if stop < n_users:
            later = block[stop - start:]  # users v >= stop x the block's users
            # A user gains a neighbour here only from a value above its running k-th one: the
            # running ids are all smaller than the block's, so an equal value loses the tie.
            gaining = torch.nonzero((later > best_values[stop:, k - 1 :]).any(dim=1)).squeeze(1)
            if len(gaining):
                found_ids, found_values = _top_k_rows(later[gaining], min(k, stop - start))
                rows = gaining + stop
                best_keys[rows], best_values[rows] = merge(best_keys[rows], best_values[rows],
                                                           found_ids + start, found_values)
    return ids, sims


def neighbours_of_rows(
    factors: tuple[sp.csr_matrix, Optional[np.ndarray]],
    rows: sp.spmatrix,
    owners: np.ndarray,
    k: int,
    block_size: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` users most similar to each of some query rows, e.g. users' rows with their hidden items removed.

    Row ``i`` of ``rows`` belongs to user ``owners[i]``, who is never its own neighbour; every
    other user is represented by its full training row (``factors``). With the owners' full rows as
    queries the result is :func:`top_k_similar_users`'s rows of the owners, bit for bit (the same
    float32 sums in the same item order, the same tie rule), so the two can be compared exactly.

    Args:
        factors: :func:`similarity_factors` of the training matrix (it fixes the measure).
        rows: ``(B, n_items)`` the query rows (binary or weighted, like the training rows).
        owners: ``(B,)`` the user each query row belongs to.
        k: neighbours per row, ``1 <= k <= n_users - 1``.
        block_size: query rows per block (``None``: :func:`default_block_size`); memory only.

    Returns:
        ``ids`` int64 ``(B, k)`` and ``similarity`` float32 ``(B, k)``, most similar first.
    """
    train_factors, a = factors
    n_users, n_items = train_factors.shape
    k = check_int_in_range(k, "the number of neighbours k", 1, n_users - 1)
    owners = np.asarray(owners, dtype=np.int64)
    if rows.shape != (len(owners), n_items):
        raise ConfigError(f"expected {len(owners)} query rows of {n_items} items, got shape {rows.shape}")
    query_factors, query_a = similarity_factors(rows, "cosine" if a is None else "pearson")
    block_size = default_block_size(n_users, n_items) if block_size is None else check_int_in_range(
        block_size, "block_size", 1)
    ids = np.empty((len(owners), k), dtype=np.int64)
    sims = np.empty((len(owners), k), dtype=np.float32)
    for start in range(0, len(owners), block_size):
        stop = min(start + block_size, len(owners))
        block = np.asarray(train_factors @ query_factors[start:stop].T.toarray(), dtype=np.float32)  # (n_users, b)
        if a is not None:
            block -= np.outer(a.astype(np.float32), query_a[start:stop].astype(np.float32))
        block[owners[start:stop], np.arange(stop - start)] = -np.inf
        found_ids, found_sims = _top_k_rows(torch.from_numpy(block.T.copy()), k)
        ids[start:stop], sims[start:stop] = found_ids.numpy(), found_sims.numpy()
    return ids, sims


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
