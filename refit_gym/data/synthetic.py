"""A seeded synthetic implicit-feedback dataset with planted collaborative structure and drift.

The offline default of the tests and the quick-start: small, fast, deterministic for a seed,
and learnable (popularity, neighbourhood and factor models all beat random on it).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from refit_gym.data.assemble import interaction_data_from_split
from refit_gym.data.interactions import InteractionData
from refit_gym.data.splitting import DEFAULT_SPLIT_RATIOS, chronological_split
from refit_gym.errors import ConfigError

SECONDS_PER_DAY = 86_400
_START_TIME = 978_300_000  # an arbitrary epoch second, so timestamps look like real ones
_USERS_PER_CHUNK = 512  # rows of the user x item probability table held at once


def make_synthetic(
    n_users: int = 500,
    n_items: int = 300,
    n_factors: int = 8,
    density: float = 0.05,
    seed: int = 0,
    n_clusters: int = 8,
    min_interactions: int = 10,
    popularity_skew: float = 0.8,
    affinity_scale: float = 2.0,
    drift: float = 0.5,
    ratios: Sequence[float] = DEFAULT_SPLIT_RATIOS,
) -> InteractionData:
    """Generate a dataset whose users have clustered tastes that drift over time.

    The generative story:

    - each of ``n_clusters`` taste clusters has a centre in ``R^n_factors``; a user belongs
      to one cluster and has a *current* taste (centre + noise) and an *old* taste, moved
      ``drift`` of the way towards another cluster's centre;
    - items have Gaussian factors and a Zipf-like popularity bias
      (``-popularity_skew * log(rank)``, ranks in random order);
    - a user's items are a set of distinct items, each included with the probability that it
      occurs among ``size`` draws from ``softmax(affinity_scale * taste · item + popularity)``
      (Poisson sampling, the taste halfway between old and current); ``size`` is log-normal
      with mean ``density * n_items``, at least ``min_interactions`` and at most
      ``n_items // 4``, and the set's size is about ``size``;
    - the user's items are put in time order by how much better they suit the current taste
      than the old one (plus Gumbel noise), so recent items — and the held-out valid / test
      items — are better predicted from the current taste than old ones, as in real data;
      consecutive timestamps are 0.5-2 days apart.

    The interactions are then split with the same
    :func:`~refit_gym.data.splitting.chronological_split` as raw data, so the result can have
    slightly fewer users / items than asked (an item nobody has in train, a user whose only
    held-out item is unseen in train). ``extras["user_cluster"]`` is each user's cluster.

    Args:
        n_users: number of users generated.
        n_items: number of items generated.
        n_factors: dimension of the latent tastes.
        density: target fraction of the user x item matrix that is observed (all splits).
        seed: the seed; the same seed gives the same data.
        n_clusters: number of taste clusters.
        min_interactions: fewest interactions per user (>= 6 so the 7:2:1 split keeps them).
        popularity_skew: strength of the popularity bias (0 = none).
        affinity_scale: strength of the taste signal (inverse softmax temperature).
        drift: how far a user's old taste lies from the current one (0 = no drift).
        ratios: ``(train, valid, test)`` fractions of the chronological split.

    Returns:
        The :class:`InteractionData`, named ``"synthetic"``.

    Raises:
        ConfigError: a size or fraction out of range.
    """
    _check_arguments(n_users, n_items, n_factors, density, n_clusters, min_interactions, drift)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, n_factors), dtype=np.float32)
    user_cluster = rng.integers(n_clusters, size=n_users)
    other_cluster = (user_cluster + rng.integers(1, max(n_clusters, 2), size=n_users)) % n_clusters
    current_taste = centres[user_cluster] + 0.5 * rng.standard_normal((n_users, n_factors), dtype=np.float32)
    old_taste = (1.0 - drift) * current_taste + drift * (
        centres[other_cluster] + 0.5 * rng.standard_normal((n_users, n_factors), dtype=np.float32)
    )
    item_factors = rng.standard_normal((n_items, n_factors), dtype=np.float32) / np.float32(np.sqrt(n_factors))
    popularity = (-popularity_skew * np.log(rng.permutation(n_items) + 1.0)).astype(np.float32)
    n_per_user = _interaction_counts(rng, n_users, n_items, density, min_interactions)

    sampling_taste = (0.5 * (old_taste + current_taste)).astype(np.float32)
    item_factors_by_column = np.ascontiguousarray(item_factors.T)
    user_chunks, item_chunks = [], []
    for first_user in range(0, n_users, _USERS_PER_CHUNK):
        chunk = slice(first_user, min(first_user + _USERS_PER_CHUNK, n_users))
        # einsum, not BLAS: for so thin a product it avoids multi-threaded BLAS overhead
        logits = np.einsum("uf,fi->ui", sampling_taste[chunk], item_factors_by_column)
        logits *= np.float32(affinity_scale)
        logits += popularity
        chunk_users, chunk_items = _sample_distinct(rng, logits, n_per_user[chunk], min_interactions)
        user_chunks.append(chunk_users + first_user)
        item_chunks.append(chunk_items)
    users, items = np.concatenate(user_chunks), np.concatenate(item_chunks)

    # time order: items suiting the current taste more than the old one come later
    drift_direction = current_taste - old_taste
    recency = np.float32(affinity_scale) * np.einsum(
        "nf,nf->n", drift_direction[users], item_factors[items]
    )
    uniform = rng.random(len(users), dtype=np.float32)
    recency -= np.log(-np.log(np.maximum(uniform, np.float32(1e-7))))  # + Gumbel noise
    # users are grouped already; order each user's items by recency with one float sort key
    by_time = np.argsort(users + 0.999 / (1.0 + np.exp(-recency.astype(np.float64))))
    users, items = users[by_time], items[by_time]
    gaps = rng.integers(SECONDS_PER_DAY // 2, 2 * SECONDS_PER_DAY, size=len(users))
    user_start = _START_TIME + rng.integers(0, 365 * SECONDS_PER_DAY, size=n_users)
    times = user_start[users] + _cumsum_within_groups(gaps, users)

    split = chronological_split(users, items, times, ratios)
    source = (
        f"synthetic(n_users={n_users}, n_items={n_items}, n_factors={n_factors}, "
        f"density={density:g}, seed={seed}, n_clusters={n_clusters}, "
        f"min_interactions={min_interactions}, popularity_skew={popularity_skew:g}, "
        f"affinity_scale={affinity_scale:g}, drift={drift:g})"
    )
    data = interaction_data_from_split("synthetic", users, items, split, source=source)
    data.extras["user_cluster"] = user_cluster[data.extras["input_user_ids"]]
    return data


def _sample_distinct(
    rng: np.random.Generator,
    logits: np.ndarray,
    counts: np.ndarray,
    min_count: int,
    max_rounds: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, a random set of about ``counts[row]`` distinct columns favouring high logits.

    Poisson sampling: column ``i`` of row ``r`` is included independently with probability
    ``1 - exp(-rate_r * p_ri)``, ``p_r = softmax(logits[r])`` — the chance that ``i`` occurs
    among ``rate_r`` draws from ``p_r`` (Poisson approximation). ``rate_r`` is raised from
    ``counts[r]`` (two fixed-point steps) so that the expected set size is close to
    ``counts[r]`` even for concentrated rows. Rows with fewer than ``min_count`` columns
    are redrawn with a doubled rate (at most ``max_rounds`` times). ``logits`` is overwritten.

    Args:
        rng: the generator.
        logits: ``(rows, columns)`` float32 unnormalised log-probabilities.
        counts: wanted set size per row.
        min_count: smallest acceptable set size.
        max_rounds: redraws of rows below ``min_count`` at most.

    Returns:
        ``(rows, columns)`` int64 arrays, grouped by row, columns ascending within a row.
    """
    n_rows, n_columns = logits.shape
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits, out=logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    wanted = np.minimum(counts, n_columns - 1).astype(np.float32)
    rate = wanted.copy()
    for _ in range(1):
        expected_size = -np.expm1(-rate[:, None] * probabilities).sum(axis=1)
        rate *= wanted / np.maximum(expected_size, 1e-6)
    included = rng.random(probabilities.shape, dtype=np.float32) < -np.expm1(-rate[:, None] * probabilities)
    for _ in range(max_rounds):
        short = np.flatnonzero(included.sum(axis=1) < min(min_count, n_columns))
        if len(short) == 0:
            break
        rate[short] *= 2.0
        redraw = -np.expm1(-rate[short, None] * probabilities[short])
        included[short] = rng.random(redraw.shape, dtype=np.float32) < redraw
    keys = np.flatnonzero(included)
    rows = keys // n_columns
    return rows, keys - rows * n_columns


def _interaction_counts(
    rng: np.random.Generator, n_users: int, n_items: int, density: float, min_interactions: int
) -> np.ndarray:
    """Log-normal per-user counts with mean about ``density * n_items``, clipped to a range."""
    target_mean = max(density * n_items, float(min_interactions))
    spread = 0.5
    counts = rng.lognormal(np.log(target_mean) - spread**2 / 2, spread, size=n_users)
    upper = max(min_interactions, n_items // 4)
    return np.clip(np.rint(counts), min_interactions, upper).astype(np.int64)


def _cumsum_within_groups(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Running sums of ``values`` restarting at each new group (``groups`` must be sorted)."""
    if len(values) == 0:
        return values.copy()
    totals = np.cumsum(values)
    is_start = np.ones(len(groups), dtype=bool)
    is_start[1:] = groups[1:] != groups[:-1]
    starts = np.flatnonzero(is_start)
    offsets = np.repeat(totals[starts] - values[starts], np.diff(np.r_[starts, len(values)]))
    return totals - offsets


def _check_arguments(
    n_users: int, n_items: int, n_factors: int, density: float, n_clusters: int,
    min_interactions: int, drift: float,
) -> None:
    """Raise ConfigError for sizes or fractions that cannot produce a dataset."""
    if n_users < 1 or n_items < 2 or n_factors < 1 or n_clusters < 1:
        raise ConfigError(
            f"make_synthetic needs n_users >= 1, n_items >= 2, n_factors >= 1, n_clusters >= 1; "
            f"got {n_users}, {n_items}, {n_factors}, {n_clusters}"
        )
    if not 0.0 < density <= 0.5:
        raise ConfigError(f"make_synthetic: density must be in (0, 0.5], got {density}")
    if not 6 <= min_interactions <= n_items // 2:
        raise ConfigError(
            f"make_synthetic: min_interactions must be in 6..n_items // 2 ({n_items // 2}), "
            f"got {min_interactions}"
        )
    if not 0.0 <= drift <= 1.0:
        raise ConfigError(f"make_synthetic: drift must be in [0, 1], got {drift}")
