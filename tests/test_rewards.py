"""The reward library against direct formulas and brute-force references, on tiny inline data."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from refit_gym.data import make_synthetic
from refit_gym.data.interactions import InteractionData, UserSequences, pairs_to_csr
from refit_gym.errors import ConfigError, EpisodeStateError
from refit_gym.rewards import (
    NextItemCollaborativeReward,
    REWARD_TERMS,
    CollaborativeReward,
    EpisodeBatch,
    HeldOutLikelihood,
    HeldOutLogLikelihood,
    HeldOutNDCG,
    HeldOutPotential,
    HeldOutRecall,
    RewardTerm,
    TrainingInteractions,
    WeightedReward,
    build_reward,
    build_shaping,
    clear_memory_cache,
    collaborative_targets,
    find_neighbours,
    register_reward_term,
    reward_spec,
    top_k_similar_users,
)
from refit_gym.rewards import neighbours as neighbours_module
from refit_gym.rewards.neighbours import neighbours_of_rows, similarity_factors
from refit_gym.rewards.functional import masked_log_softmax
from refit_gym.slates import sample_slates

N_USERS, N_ITEMS = 40, 30


# ----------------------------------------------------------------------------- fixtures


def random_split(seed: int, train: sp.csr_matrix, density: float = 0.1) -> sp.csr_matrix:
    """Random interactions outside ``train`` (stand-in valid / test splits)."""
    rng = np.random.default_rng(seed)
    dense = (rng.random(train.shape) < density) & (train.toarray() == 0)
    dense[0, np.flatnonzero(train.toarray()[0] == 0)[0]] = True  # never empty
    users, items = np.nonzero(dense)
    return pairs_to_csr(users, items, *train.shape)


def make_data(seed: int = 0, split_seed: int = 100, n_users: int = N_USERS, n_items: int = N_ITEMS) -> InteractionData:
    """A random binary train matrix (2..12 items per user) with shuffled chronological order."""
    rng = np.random.default_rng(seed)
    sequences = [rng.permutation(n_items)[: rng.integers(2, 13)].tolist() for _ in range(n_users)]
    users = np.repeat(np.arange(n_users), [len(s) for s in sequences])
    items = np.concatenate(sequences)
    train = pairs_to_csr(users, items, n_users, n_items)
    return InteractionData(
        name="tiny",
        train=train,
        valid=random_split(split_seed, train),
        test=random_split(split_seed + 1, train),
        train_sequences=UserSequences.from_lists(sequences),
    )


def make_episode(data: InteractionData, users=None, fraction: float = 0.3) -> EpisodeBatch:
    """Hide each user's most recent ``fraction`` of training items (user 0: none hidden)."""
    users = torch.arange(data.n_users) if users is None else torch.as_tensor(users)
    visible = torch.zeros(len(users), data.n_items)
    held_out = torch.zeros(len(users), data.n_items, dtype=torch.bool)
    for row, user in enumerate(users.tolist()):
        sequence = data.train_sequences[user]
        n_hidden = 0 if user == 0 else max(1, int(round(fraction * len(sequence))))
        visible[row, sequence[: len(sequence) - n_hidden]] = 1.0
        held_out[row, sequence[len(sequence) - n_hidden :]] = True
    return EpisodeBatch(users=users, visible=visible, held_out=held_out)


@pytest.fixture(scope="module")
def data() -> InteractionData:
    return make_data()


@pytest.fixture(scope="module")
def interactions(data) -> TrainingInteractions:
    return TrainingInteractions.from_data(data)


@pytest.fixture(scope="module")
def episode(data) -> EpisodeBatch:
    episode = make_episode(data)
    # the slates an env with slate_size=3 would draw (what the `slate` term scores)
    episode.slates = sample_slates(torch.zeros(episode.visible.shape), episode.visible, 3, 1.0,
                                   torch.Generator().manual_seed(0))
    return episode


@pytest.fixture()
def scores() -> torch.Tensor:
    return torch.randn(N_USERS, N_ITEMS, generator=torch.Generator().manual_seed(1))


def direct_log_probs(score_row: torch.Tensor, visible_row: torch.Tensor, tau: float) -> dict[int, float]:
    """``{item: log p(item)}`` over the unmasked items, by ``torch.log_softmax`` on those items only."""
    kept = torch.nonzero(visible_row == 0).ravel()
    log_p = torch.log_softmax(score_row[kept].double() / tau, dim=0)
    return dict(zip(kept.tolist(), log_p.tolist()))


# ----------------------------------------------------------------------------- likelihood


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_loglik_matches_direct_formula(interactions, episode, scores, normalize, tau):
    term = HeldOutLogLikelihood(temperature=tau, normalize=normalize).bind(interactions)
    value = term(scores, episode)
    for b in range(episode.batch_size):
        log_p = direct_log_probs(scores[b], episode.visible[b], tau)
        held = torch.nonzero(episode.held_out[b]).ravel().tolist()
        expected = sum(log_p[i] for i in held)
        if normalize and held:
            expected /= len(held)
        assert value[b].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert value[0].item() == 0.0  # user 0 has no held-out item


def test_visible_items_never_get_probability(interactions, episode, scores):
    probs = masked_log_softmax(scores, episode.visible, 0.1).exp()
    assert torch.all(probs[episode.visible > 0] == 0)
    assert torch.allclose(probs.sum(1), torch.ones(N_USERS))
    # Raising the scores of input items changes nothing: they are outside the softmax.
    boosted = scores.masked_fill(episode.visible > 0, 1e6)
    for term in (HeldOutLogLikelihood(), HeldOutLikelihood()):
        assert torch.allclose(term(scores, episode), term(boosted, episode))


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_loglik_without_the_mask_is_the_softmax_over_all_items(interactions, episode, scores, tau):
    """``mask_visible=False``: the input items compete in the softmax (the sequential protocol's
    default evaluation ranks them too); the held-out items scored are the same."""
    term = HeldOutLogLikelihood(temperature=tau, normalize=True, mask_visible=False).bind(interactions)
    value = term(scores, episode)
    for b in range(episode.batch_size):
        log_p = torch.log_softmax(scores[b].double() / tau, dim=0)
        held = torch.nonzero(episode.held_out[b]).ravel()
        expected = float(log_p[held].mean()) if len(held) else 0.0
        assert value[b].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # raising the input items' scores now lowers the held-out items' probability (masked: no change)
    boosted = scores.masked_fill(episode.visible > 0, 10.0)
    has_input = (episode.visible > 0).any(1) & (episode.held_out > 0).any(1)
    for unmasked in (HeldOutLogLikelihood(mask_visible=False), HeldOutLikelihood(mask_visible=False)):
        assert torch.all(unmasked(boosted, episode)[has_input] < unmasked(scores, episode)[has_input])
    assert term.config()["mask_visible"] is False and HeldOutLogLikelihood().config()["mask_visible"] is True


@pytest.mark.parametrize("bad", [0, 1, "false", None])
def test_loglik_mask_visible_must_be_a_bool(bad):
    with pytest.raises(ConfigError, match="mask_visible must be true or false"):
        HeldOutLogLikelihood(mask_visible=bad)


def test_likelihood_is_held_out_mass_and_relates_to_log(interactions, data, scores):
    single = make_episode(data, fraction=0.0)  # users > 0 hide exactly one item
    assert torch.all(single.held_out[1:].sum(1) == 1)
    mass = HeldOutLikelihood(temperature=0.5)(scores, single)
    loglik = HeldOutLogLikelihood(temperature=0.5)(scores, single)
    assert torch.allclose(mass[1:], loglik[1:].exp(), rtol=1e-5)
    assert mass[0] == 0

    several = make_episode(data, fraction=0.5)
    mass = HeldOutLikelihood(temperature=0.5)(scores, several)
    mean_log = HeldOutLogLikelihood(temperature=0.5, normalize=True)(scores, several)
    n_held = several.held_out.sum(1)
    probs = masked_log_softmax(scores, several.visible, 0.5).exp()
    assert torch.allclose(mass, (probs * several.held_out).sum(1), atol=1e-6)
    assert torch.all((mass >= 0) & (mass <= 1))
    # AM-GM: the mean log-probability never exceeds the log of the mean probability.
    has = n_held > 0
    assert torch.all(mean_log[has] <= torch.log(mass[has] / n_held[has]) + 1e-5)


# ----------------------------------------------------------------------------- neighbours


def brute_force_similarity(train: sp.csr_matrix, measure: str) -> np.ndarray:
    dense = train.toarray().astype(np.float64)
    if measure == "pearson":
        dense = dense - dense.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(dense, axis=1, keepdims=True)
    unit = np.divide(dense, norms, out=np.zeros_like(dense), where=norms > 0)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return sims


@pytest.mark.parametrize("measure", ["cosine", "pearson"])
def test_neighbours_match_brute_force(data, measure):
    k = 6
    result = top_k_similar_users(data.train, k, measure)
    sims = brute_force_similarity(data.train, measure)
    if measure == "pearson":
        dense = data.train.toarray()
        reference = np.corrcoef(dense)
        np.fill_diagonal(reference, -np.inf)
        np.testing.assert_allclose(sims, reference, atol=1e-12)
    assert result.ids.shape == (N_USERS, k) and result.similarity.shape == (N_USERS, k)
    for user in range(N_USERS):
        assert user not in result.ids[user]
        assert len(set(result.ids[user])) == k
        # the similarities returned are the true ones, and they are the k largest (ties aside)
        np.testing.assert_allclose(result.similarity[user], sims[user, result.ids[user]], atol=1e-6)
        np.testing.assert_allclose(result.similarity[user], np.sort(sims[user])[::-1][:k], atol=1e-6)
        assert np.all(np.diff(result.similarity[user]) <= 0)


@pytest.mark.parametrize("measure", ["cosine", "pearson"])
def test_neighbours_do_not_depend_on_block_size(data, measure):
    reference = top_k_similar_users(data.train, 7, measure, block_size=N_USERS)
    for block_size in (1, 3, 16, 1024):
        result = top_k_similar_users(data.train, 7, measure, block_size=block_size)
        np.testing.assert_array_equal(result.ids, reference.ids)
        np.testing.assert_array_equal(result.similarity, reference.similarity)
    # ties go to the smaller user id, so a smaller k is a prefix of a larger one
    np.testing.assert_array_equal(top_k_similar_users(data.train, 3, measure).ids, reference.ids[:, :3])


def weighted_train_with_ties(seed: int = 5, n_users: int = 61, n_items: int = 37) -> sp.csr_matrix:
    """Weighted rows, a few repeated rows (exact ties), an empty row and a full row."""
    rng = np.random.default_rng(seed)
    dense = (rng.random((n_users, n_items)) < 0.2) * rng.integers(1, 4, size=(n_users, n_items))
    dense[10:14] = dense[3]  # users 3, 10..13 identical: tied similarities to everyone
    dense[20], dense[21] = 0, 1
    return sp.csr_matrix(dense.astype(np.float32))


@pytest.mark.parametrize("measure", ["cosine", "pearson"])
@pytest.mark.parametrize("block_size", [1, 4, 9, 16, 61])
def test_the_symmetric_search_is_the_direct_search_bit_for_bit(data, measure, block_size):
    for train, k in ((data.train, 7), (weighted_train_with_ties(), 9), (weighted_train_with_ties(6), 60)):
        direct = top_k_similar_users(train, k, measure, block_size=block_size, method="direct")
        symmetric = top_k_similar_users(train, k, measure, block_size=block_size, method="symmetric")
        np.testing.assert_array_equal(symmetric.ids, direct.ids)
        np.testing.assert_array_equal(symmetric.similarity.view(np.int32), direct.similarity.view(np.int32))


def test_ties_break_toward_smaller_user_id():
    # users 1..4 are identical, so user 0 is equally similar to all of them
    rows = [[0, 1], [0, 1], [0, 1], [0, 1], [0, 1], [2]]
    users = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    train = pairs_to_csr(users, np.concatenate(rows), len(rows), 3)
    result = top_k_similar_users(train, 2, "cosine", block_size=1)
    assert result.ids[0].tolist() == [1, 2]
    assert result.ids[4].tolist() == [0, 1]


@pytest.mark.parametrize("measure", ["cosine", "pearson"])
def test_neighbours_of_full_rows_are_the_search_bit_for_bit(data, measure):
    owners = np.array([5, 0, 3, 3, 12, 21, 20, 39])
    for train, k in ((data.train, 7), (weighted_train_with_ties(), 9)):
        train = sp.csr_matrix(train, dtype=np.float32)
        reference = top_k_similar_users(train, k, measure)
        factors = similarity_factors(train, measure)
        for block_size in (1, 3, None):
            ids, sims = neighbours_of_rows(factors, train[owners], owners, k, block_size)
            np.testing.assert_array_equal(ids, reference.ids[owners])
            np.testing.assert_array_equal(sims.view(np.int32), reference.similarity[owners].view(np.int32))


@pytest.mark.parametrize("measure", ["cosine", "pearson"])
def test_neighbours_of_partial_rows_match_brute_force(data, measure):
    k, owners = 6, np.arange(0, N_USERS, 3)
    keep = np.random.default_rng(3).random((len(owners), N_ITEMS)) < 0.6
    queries = data.train[owners].multiply(sp.csr_matrix(keep)).tocsr()
    ids, sims = neighbours_of_rows(similarity_factors(data.train, measure), queries, owners, k)
    dense = data.train.toarray().astype(np.float64)
    for row, owner in enumerate(owners):
        both = np.vstack([queries[row].toarray(), dense])
        if measure == "pearson":
            both = both - both.mean(axis=1, keepdims=True)
        norms = np.linalg.norm(both, axis=1, keepdims=True)
        unit = np.divide(both, norms, out=np.zeros_like(both), where=norms > 1e-12)
        reference = unit[1:] @ unit[0]
        reference[owner] = -np.inf
        assert owner not in ids[row] and len(set(ids[row])) == k
        np.testing.assert_allclose(sims[row], reference[ids[row]], atol=1e-6)
        np.testing.assert_allclose(sims[row], np.sort(reference)[::-1][:k], atol=1e-6)
    with pytest.raises(ConfigError, match="query rows"):
        neighbours_of_rows(similarity_factors(data.train, measure), queries[:2], owners, k)


@pytest.mark.parametrize("term_class", [CollaborativeReward, NextItemCollaborativeReward])
def test_neighbours_from_visible_items_equal_training_rows_when_nothing_is_hidden(data, interactions, scores,
                                                                                   term_class):
    full = EpisodeBatch(users=torch.tensor([3, 0, 7, 3, 39]), visible=torch.from_numpy(
        data.train[[3, 0, 7, 3, 39]].toarray()).float(), held_out=torch.zeros(5, N_ITEMS, dtype=torch.bool))
    by_rows = term_class(k=5, temperature=0.3).bind(interactions)
    by_visible = term_class(k=5, temperature=0.3, neighbours_from="visible_items").bind(interactions)
    assert torch.equal(by_visible(scores[:5], full), by_rows(scores[:5], full))
    hidden = make_episode(data)  # with items hidden the two differ for some users
    assert not torch.equal(by_visible(scores, hidden), by_rows(scores, hidden))
    assert by_visible.neighbours is None  # no search at bind
    with pytest.raises(EpisodeStateError, match="visible items"):
        by_visible.target_rows(np.arange(3))
    with pytest.raises(ConfigError, match="neighbours_from"):
        term_class(neighbours_from="validation_rows")
    spec = reward_spec(WeightedReward({"c": (1.0, by_visible)}))
    assert spec["c"]["neighbours_from"] == "visible_items"


@pytest.mark.parametrize("measure", ["cosine", "pearson"])
@pytest.mark.parametrize("term_class", [CollaborativeReward, NextItemCollaborativeReward])
def test_visible_item_neighbours_are_searched_per_row_in_a_batch(data, scores, term_class, measure):
    # user 3 twice with different visible items, once more repeated, and two other users
    users = [3, 3, 5, 3, 0]
    episode = make_episode(data, users, fraction=0.3)
    visible = episode.visible.clone()
    visible[1] = torch.from_numpy(data.train[3].toarray()[0]).float()  # the second row of user 3 sees it all
    episode = dataclasses.replace(episode, visible=visible)
    assert not torch.equal(visible[0], visible[1]) and torch.equal(visible[0], visible[3])
    term = term_class(k=4, similarity=measure, temperature=0.3, neighbours_from="visible_items").bind(
        TrainingInteractions.from_data(data))
    batch = term(scores[: len(users)], episode)
    ids, sims = term.episode_neighbours(np.array(users), visible.numpy() > 0)
    factors = similarity_factors(data.train, measure)
    for row, user in enumerate(users):
        single = EpisodeBatch(users=episode.users[row : row + 1], visible=visible[row : row + 1],
                              held_out=episode.held_out[row : row + 1])
        assert torch.equal(term(scores[row : row + 1], single), batch[row : row + 1]), row
        query = data.train[[user]].multiply(sp.csr_matrix(visible[row : row + 1].numpy() > 0)).tocsr()
        expected_ids, expected_sims = neighbours_of_rows(factors, query, np.array([user]), 4)
        np.testing.assert_array_equal(ids[row], expected_ids[0])
        np.testing.assert_array_equal(sims[row], expected_sims[0])
    assert not np.array_equal(sims[0], sims[1])  # the two rows of user 3 have their own neighbours


@pytest.mark.parametrize("term_class", [CollaborativeReward, NextItemCollaborativeReward])
def test_a_hidden_item_chooses_the_neighbours_only_from_training_rows(term_class):
    # user 0 sees item 0 and hides its last item (1 in the first world, 2 in the second);
    # user 1 went 0 -> 1 and user 2 went 0 -> 2, user 3 has item 3 only
    n_items = 4
    episode = EpisodeBatch(users=torch.tensor([0]), visible=torch.tensor([[1.0, 0, 0, 0]]),
                           held_out=torch.zeros(1, n_items, dtype=torch.bool))
    targets = {}
    for mode in ("training_rows", "visible_items"):
        for hidden in (1, 2):
            sequences = UserSequences.from_lists([[0, hidden], [0, 1], [0, 2], [3]])
            users = np.repeat(np.arange(4), [2, 2, 2, 1])
            train = pairs_to_csr(users, np.concatenate([sequences[u] for u in range(4)]), 4, n_items)
            term = term_class(k=1, neighbours_from=mode).bind(TrainingInteractions(train, sequences))
            ids, _ = term.episode_neighbours(np.array([0]), np.array([[True, False, False, False]]))
            targets[mode, hidden] = ids[0, 0]
            value = term(torch.zeros(1, n_items), episode)
            assert torch.isfinite(value).all()
    # from whole training rows the hidden item picks the neighbour who shares it
    assert (targets["training_rows", 1], targets["training_rows", 2]) == (1, 2)
    # from the visible items the two neighbours tie and the smaller id wins, whatever is hidden
    assert (targets["visible_items", 1], targets["visible_items", 2]) == (1, 1)


@pytest.mark.parametrize("measure", ["cosine", "pearson"])
def test_collaborative_targets_match_brute_force(data, measure):
    k = 5
    neighbours = top_k_similar_users(data.train, k, measure)
    targets = collaborative_targets(data.train, neighbours)
    dense_train = data.train.toarray()
    sims = brute_force_similarity(data.train, measure)
    expected = np.zeros_like(dense_train, dtype=np.float64)
    for user in range(N_USERS):
        for neighbour in neighbours.ids[user]:
            expected[user] += max(sims[user, neighbour], 0.0) * dense_train[neighbour]
        expected[user][dense_train[user] > 0] = 0.0
        if expected[user].sum() > 0:
            expected[user] /= expected[user].sum()
    np.testing.assert_allclose(targets.toarray(), expected, atol=1e-6)
    # own training items are excluded and each non-empty row is a distribution
    assert targets.multiply(data.train).nnz == 0
    row_sums = np.asarray(targets.sum(axis=1)).ravel()
    assert np.all(np.isclose(row_sums, 1.0, atol=1e-5) | (row_sums == 0))
    assert np.all(targets.data > 0)


def test_collaborative_reward_matches_direct_formula(interactions, episode, scores):
    for objective in ("loglik", "mass"):
        term = CollaborativeReward(k=5, temperature=0.3, objective=objective).bind(interactions)
        value = term(scores, episode)
        targets = term.targets.toarray()
        for b in range(episode.batch_size):
            log_p = direct_log_probs(scores[b], episode.visible[b], 0.3)
            items = np.flatnonzero(targets[b])
            if objective == "loglik":
                expected = sum(targets[b, i] * log_p[i] for i in items)
            else:
                expected = sum(targets[b, i] * math.exp(log_p[i]) for i in items)
            assert value[b].item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_collaborative_reward_gathers_rows_of_the_batch_users(data, interactions, scores):
    term = CollaborativeReward(k=4).bind(interactions)
    full = term(scores, make_episode(data))
    subset = [7, 3, 3, 21]
    part = term(scores[subset], make_episode(data, users=subset))
    assert torch.allclose(part, full[subset])


def test_collaborative_target_rows_are_the_rows_of_the_full_matrix(data):
    neighbours = top_k_similar_users(data.train, 5, "cosine")
    full = collaborative_targets(data.train, neighbours)
    users = np.array([7, 3, 3, 0, 39])
    rows = collaborative_targets(data.train, neighbours, users)
    # the same floats, not merely close: a row does not depend on which other rows are built
    assert (rows != full[users]).nnz == 0 and rows.dtype == full.dtype and rows.shape == (5, N_ITEMS)


def _held_bytes(term: CollaborativeReward, train: sp.csr_matrix) -> int:
    """Bytes of the arrays a bound term holds, the (shared) training matrix not counted."""
    total = 0
    for value in vars(term).values():
        if isinstance(value, sp.spmatrix):
            if np.shares_memory(value.data, train.data):
                continue
            value = sp.csr_matrix(value)
            total += value.data.nbytes + value.indices.nbytes + value.indptr.nbytes
        elif isinstance(value, np.ndarray):
            total += value.nbytes
        elif isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif hasattr(value, "__dict__"):  # UserNeighbours, SparseRows, ...
            for inner in vars(value).values():
                if isinstance(inner, np.ndarray):
                    total += inner.nbytes
                elif isinstance(inner, torch.Tensor):
                    total += inner.numel() * inner.element_size()
    return total


def test_a_bound_collaborative_term_holds_no_users_x_items_targets():
    # every user's target row holds up to k x (items per user) entries: the users x items target
    # matrix is nearly dense at scale, so the term keeps O(users x k) and builds a batch's rows per call
    data = make_synthetic(n_users=300, n_items=200, density=0.2, seed=0)
    interactions = TrainingInteractions.from_data(data)
    k = 20
    term = CollaborativeReward(k=k).bind(interactions)
    allowed = 24 * data.n_users * k  # neighbour ids and similarities, the sparse weight matrix
    full_targets = collaborative_targets(data.train, term.neighbours)
    assert full_targets.nnz * 8 > 1.5 * allowed  # holding the full matrix (its CSR alone) would cost more
    assert _held_bytes(term, interactions.train) <= allowed


def test_collaborative_needs_bind(episode, scores):
    with pytest.raises(EpisodeStateError):
        CollaborativeReward(k=3)(scores, episode)


def test_neighbour_disk_cache(tmp_path, data, monkeypatch):
    clear_memory_cache()
    computed = find_neighbours(data.train, 6, "pearson", cache_dir=tmp_path)
    files = list(tmp_path.glob("neighbours-*-pearson-k6.npz"))
    assert len(files) == 1
    clear_memory_cache()

    def no_compute(*args, **kwargs):
        raise AssertionError("neighbours were recomputed instead of read from the cache")

    monkeypatch.setattr(neighbours_module, "top_k_similar_users", no_compute)
    loaded = find_neighbours(data.train, 4, "pearson", cache_dir=tmp_path)  # a smaller k reuses k=6
    np.testing.assert_array_equal(loaded.ids, computed.ids[:, :4])
    np.testing.assert_array_equal(loaded.similarity, computed.similarity[:, :4])
    # another train matrix never hits the cache
    other = make_data(seed=5)
    with pytest.raises(AssertionError, match="recomputed"):
        find_neighbours(other.train, 4, "pearson", cache_dir=tmp_path)
    clear_memory_cache()


# ----------------------------------------------------------------------------- ranking


def reference_ranking(score_row, visible_row, held_row, k):
    """Plain-Python Recall@k / NDCG@k of the held-out items (DiffRec's definitions)."""
    candidates = [i for i in range(len(score_row)) if visible_row[i] == 0]
    ranked = sorted(candidates, key=lambda i: -float(score_row[i]))[:k]
    truth = {i for i in range(len(held_row)) if held_row[i]}
    if not truth:
        return 0.0, 0.0
    hits = [1.0 if item in truth else 0.0 for item in ranked]
    dcg = sum(h / math.log2(j + 2) for j, h in enumerate(hits))
    idcg = sum(1.0 / math.log2(j + 2) for j in range(min(len(truth), k)))
    return sum(hits) / len(truth), dcg / idcg


@pytest.mark.parametrize("k", [1, 3, 10, N_ITEMS])
def test_ranking_rewards_match_reference(interactions, data, scores, k):
    episode = make_episode(data, fraction=0.5)
    recall = HeldOutRecall(k).bind(interactions)(scores, episode)
    ndcg = HeldOutNDCG(k).bind(interactions)(scores, episode)
    for b in range(episode.batch_size):
        expected_recall, expected_ndcg = reference_ranking(scores[b], episode.visible[b], episode.held_out[b], k)
        assert recall[b].item() == pytest.approx(expected_recall, abs=1e-6)
        assert ndcg[b].item() == pytest.approx(expected_ndcg, abs=1e-6)
    assert HeldOutRecall(k).name == f"recall@{k}"


def test_ranking_rewards_agree_with_evaluation_metrics(interactions, data, scores):
    metrics = pytest.importorskip("refit_gym.evaluation.metrics")
    episode = make_episode(data, fraction=0.5)
    masked = scores.masked_fill(episode.visible > 0, float("-inf"))
    top = torch.topk(masked, 10, dim=1).indices
    truth = sp.csr_matrix(episode.held_out.numpy().astype(np.float32))
    expected = metrics.ranking_metrics(top, truth, ks=(10,))
    assert torch.allclose(HeldOutRecall(10)(scores, episode).double(), expected["recall@10"])
    assert torch.allclose(HeldOutNDCG(10)(scores, episode).double(), expected["ndcg@10"])


# ----------------------------------------------------------------------------- combination


def test_weighted_reward_combines_and_reports_components(interactions, episode, scores):
    terms = {
        "loglik": (1.0, HeldOutLogLikelihood()),
        "collab": (0.5, CollaborativeReward(k=5)),
        "ndcg": (2.0, HeldOutNDCG(5)),
        "off": (0.0, HeldOutLikelihood()),
    }
    reward = WeightedReward(terms).bind(interactions)
    components = reward.components(scores, episode)
    assert list(components) == ["loglik", "collab", "ndcg", "off"]
    expected = components["loglik"] + 0.5 * components["collab"] + 2.0 * components["ndcg"]
    assert torch.allclose(reward(scores, episode), expected)
    assert torch.allclose(reward.total(components), expected)
    assert not reward.differentiable
    differentiable, rest = reward.split_differentiable()
    assert list(differentiable) == ["loglik", "off"] and list(rest) == ["collab", "ndcg"]
    assert differentiable.differentiable
    # the list form names terms by their name attribute
    listed = WeightedReward([(1.0, HeldOutLogLikelihood()), (1.0, HeldOutRecall(3))])
    assert list(listed) == ["loglik", "recall@3"]


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -1.0, "1", True, None])
def test_bad_weights_raise(weight):
    with pytest.raises(ConfigError, match="weight"):
        WeightedReward({"loglik": (weight, HeldOutLogLikelihood())})


def test_negative_weight_needs_allow_negative(interactions, episode, scores):
    reward = WeightedReward({"loglik": (-1.0, HeldOutLogLikelihood())}, allow_negative=True)
    assert torch.allclose(reward(scores, episode), -HeldOutLogLikelihood()(scores, episode))
    with pytest.raises(ConfigError):
        WeightedReward([(1.0, HeldOutLogLikelihood()), (1.0, HeldOutLogLikelihood())])  # duplicate name
    with pytest.raises(ConfigError):
        WeightedReward({"x": (1.0, object())})


@pytest.mark.parametrize(
    "make",
    [
        lambda: HeldOutLogLikelihood(temperature=0.0),
        lambda: HeldOutLogLikelihood(temperature=-1.0),
        lambda: HeldOutLikelihood(temperature=float("nan")),
        lambda: CollaborativeReward(temperature=0),
        lambda: CollaborativeReward(k=0),
        lambda: CollaborativeReward(similarity="jaccard"),
        lambda: CollaborativeReward(objective="hits"),
        lambda: HeldOutRecall(0),
        lambda: HeldOutNDCG(2.5),
        lambda: HeldOutPotential(temperature=0),
    ],
)
def test_bad_parameters_raise_config_error(make):
    with pytest.raises(ConfigError):
        make()


def test_k_above_range_raises_at_bind(interactions):
    with pytest.raises(ConfigError, match="k"):
        HeldOutRecall(N_ITEMS + 1).bind(interactions)
    with pytest.raises(ConfigError, match="k"):
        HeldOutNDCG(N_ITEMS + 1).bind(interactions)
    with pytest.raises(ConfigError, match="neighbours"):
        CollaborativeReward(k=N_USERS).bind(interactions)
    HeldOutRecall(N_ITEMS).bind(interactions)
    CollaborativeReward(k=N_USERS - 1).bind(interactions)


# ----------------------------------------------------------------------------- registry


def test_build_reward_from_mapping_and_strings(interactions, episode, scores):
    spec = {
        "loglik": {"weight": 1.0, "temperature": 0.1},
        "collaborative": {"weight": 0.5, "k": 5, "similarity": "pearson"},
        "ndcg20": {"type": "ndcg", "weight": 0.25, "k": 20},
    }
    reward = build_reward(spec, interactions)
    assert isinstance(reward, WeightedReward) and list(reward) == ["loglik", "collaborative", "ndcg20"]
    assert reward.weights == {"loglik": 1.0, "collaborative": 0.5, "ndcg20": 0.25}
    assert reward.terms["collaborative"].similarity == "pearson"
    rebuilt = build_reward(reward_spec(reward), interactions)
    assert torch.allclose(rebuilt(scores, episode), reward(scores, episode))

    short = build_reward("loglik+0.5*collaborative", interactions)
    assert short.weights == {"loglik": 1.0, "collaborative": 0.5}
    as_json = build_reward('{"recall": {"k": 5}}', interactions)
    assert as_json.terms["recall"].k == 5
    assert list(build_reward(HeldOutLogLikelihood(), interactions)) == ["loglik"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"bogus": {"weight": 1.0}}, "bogus"),
        ({"loglik": {"weight": 1.0, "temprature": 0.1}}, "temprature"),
        ({"x": {"type": "nope"}}, "nope"),
        ({"loglik": {"weight": float("nan")}}, "weight"),
        ({"loglik": {"weight": -0.5}}, "weight"),
        ({"recall": {"k": N_ITEMS + 1}}, "recall"),
        ({"loglik": {"temperature": 0.0}}, "temperature"),
        ({}, "empty"),
        ("loglik+", "empty term"),
        ("abc*loglik", "weight"),
        (42, "mapping"),
    ],
)
def test_build_reward_rejects_bad_specs(interactions, spec, message):
    with pytest.raises(ConfigError, match=message):
        build_reward(spec, interactions)


class ItemBonus(RewardTerm):
    """A registrable test term: ``bonus`` times the softmax mass on item 0, input items masked."""

    name = "item_bonus"
    differentiable = True

    def __init__(self, bonus: float = 1.0) -> None:
        self.bonus = bonus
        self.bound_to: tuple[int, int] | None = None

    def bind(self, interactions, device="cpu"):
        self.bound_to = (interactions.n_users, interactions.n_items)
        return self

    def __call__(self, scores, episode):
        return self.bonus * masked_log_softmax(scores, episode.visible, 1.0)[:, 0].exp()

    def config(self):
        return {"term": type(self).__name__, "bonus": self.bonus}


@pytest.fixture()
def registered_item_bonus():
    """``ItemBonus`` registered for one test (the registry is left as it was)."""
    before = dict(REWARD_TERMS)
    yield register_reward_term(ItemBonus)
    REWARD_TERMS.clear()
    REWARD_TERMS.update(before)


def test_a_registered_term_is_built_by_name_bound_and_written_back(registered_item_bonus, interactions, episode,
                                                                     scores):
    with pytest.raises(ConfigError, match="'bogus' for reward term 'item_bonus'"):  # keywords checked as for built-ins
        build_reward({"item_bonus": {"bonus": 2.0, "bogus": 1}}, interactions)
    reward = build_reward({"loglik": 1.0, "bonus": {"type": "item_bonus", "weight": 0.5, "bonus": 2.0}}, interactions)
    term = reward.terms["bonus"]
    assert isinstance(term, ItemBonus) and term.bonus == 2.0 and term.bound_to == (N_USERS, N_ITEMS)
    expected = reward.terms["loglik"](scores, episode) + 0.5 * term(scores, episode)
    assert torch.allclose(reward(scores, episode), expected)
    assert reward_spec(reward)["bonus"] == {"type": "item_bonus", "weight": 0.5, "bonus": 2.0}
    assert list(build_reward("loglik+0.25*item_bonus", interactions).terms) == ["loglik", "item_bonus"]


def test_register_reward_term_refuses_what_it_cannot_register(registered_item_bonus):
    class Unnamed(RewardTerm):
        pass

    class Other(ItemBonus):
        pass

    with pytest.raises(ConfigError, match="RewardTerm subclass"):
        register_reward_term(dict)
    with pytest.raises(ConfigError, match="no name of its own"):
        register_reward_term(Unnamed)
    with pytest.raises(ConfigError, match="plain identifier"):
        register_reward_term(ItemBonus, name="a+b")
    with pytest.raises(ConfigError, match="taken by"):
        register_reward_term(Other, name="item_bonus")
    with pytest.raises(ConfigError, match="taken by"):
        register_reward_term(Other, name="loglik")
    assert register_reward_term(ItemBonus) is ItemBonus  # the same class again: idempotent
    assert REWARD_TERMS["item_bonus"] is ItemBonus and REWARD_TERMS["loglik"] is HeldOutLogLikelihood


def test_an_unregistered_term_is_built_by_its_import_path_and_written_back(interactions, episode, scores):
    path = f"{ItemBonus.__module__}:ItemBonus"
    assert "item_bonus" not in REWARD_TERMS
    reward = build_reward({"bonus": {"type": path, "weight": 0.5, "bonus": 2.0}}, interactions)
    assert isinstance(reward.terms["bonus"], ItemBonus) and reward.terms["bonus"].bonus == 2.0
    spec = reward_spec(reward)
    assert spec["bonus"] == {"type": path, "weight": 0.5, "bonus": 2.0}
    assert torch.equal(build_reward(spec, interactions)(scores, episode), reward(scores, episode))


@pytest.mark.parametrize("kind, message", [
    ("no_such_term", "unknown type 'no_such_term'.*package.module:Class"),
    ("refit_gym.no_such_module:Term", "cannot import the reward term"),
    ("refit_gym.rewards:NoSuchTerm", "cannot import the reward term"),
    ("refit_gym.rewards:build_reward", ".* is not a refit_gym.rewards.RewardTerm subclass"),
])
def test_a_bad_term_type_is_refused_naming_the_term(interactions, kind, message):
    with pytest.raises(ConfigError, match=f"reward term 'mine': {message}"):
        build_reward({"mine": {"type": kind}}, interactions)


def test_a_term_defined_in_a_function_cannot_be_written_back(interactions):
    class Local(ItemBonus):
        pass

    reward = build_reward(Local(), interactions)
    with pytest.raises(ConfigError, match="neither registered nor importable"):
        reward_spec(reward)


def test_build_shaping(interactions):
    assert build_shaping(None, interactions) is None
    shaping = build_shaping({"type": "held_out", "temperature": 0.5, "potential": "mass"}, interactions)
    assert isinstance(shaping, HeldOutPotential) and shaping.temperature == 0.5
    with pytest.raises(ConfigError, match="scale_"):
        build_shaping({"scale_": 2.0}, interactions)


# ----------------------------------------------------------------------------- gradients and shaping


def all_terms(interactions) -> dict[str, RewardTerm]:
    """One instance of every registered term, bound."""
    params = {"collaborative": {"k": 5}, "recall": {"k": 5}, "ndcg": {"k": 5}}
    return {name: cls(**params.get(name, {})).bind(interactions) for name, cls in REWARD_TERMS.items()}


def test_differentiability_flags(interactions, episode, scores):
    terms = all_terms(interactions)
    terms["collaborative_diff"] = CollaborativeReward(k=5, differentiable=True).bind(interactions)
    terms["next_collaborative_diff"] = NextItemCollaborativeReward(k=5, differentiable=True).bind(interactions)
    expected = {"loglik": True, "likelihood": True, "collaborative": False, "next_collaborative": False,
                "recall": False, "ndcg": False, "slate": False, "collaborative_diff": True,
                "next_collaborative_diff": True}
    for name, term in terms.items():
        assert term.differentiable is expected[name], name
        x = scores.clone().requires_grad_(True)
        value = term(x, episode)
        assert value.shape == (N_USERS,)
        if term.differentiable:
            value.sum().backward()
            assert x.grad is not None and torch.all(torch.isfinite(x.grad)), name
            assert x.grad.abs().sum() > 0, name
            assert torch.all(x.grad[episode.visible > 0] == 0), name  # masked items get no gradient
        else:
            assert not value.requires_grad, name


def test_loglik_gradient_is_exact(interactions, episode, scores):
    """d/ds of the log-likelihood equals (onehot(H) - |H| p) / tau per row (normalize=False)."""
    tau = 0.2
    x = scores.clone().requires_grad_(True)
    HeldOutLogLikelihood(temperature=tau, normalize=False)(x, episode).sum().backward()
    probs = masked_log_softmax(scores, episode.visible, tau).exp()
    held = episode.held_out.float()
    expected = (held - held.sum(1, keepdim=True) * probs) / tau
    assert torch.allclose(x.grad, expected, atol=1e-5)


def test_shaping_telescopes_over_an_episode(interactions, episode):
    generator = torch.Generator().manual_seed(3)
    states = [torch.randn(N_USERS, N_ITEMS, generator=generator) for _ in range(6)]
    steps = [torch.full((N_USERS, 1), 5 - i) for i in range(6)]
    for potential in ("loglik", "mass"):
        shaping = HeldOutPotential(temperature=0.5, potential=potential, scale=2.0).bind(interactions)
        total = sum(
            shaping(states[i], steps[i], states[i + 1], steps[i + 1], episode) for i in range(len(states) - 1)
        )
        expected = shaping.potential(states[-1], steps[-1], episode) - shaping.potential(states[0], steps[0], episode)
        assert torch.allclose(total, expected, atol=1e-5)
        assert torch.all(total[0] == 0)  # user 0 has no held-out item: zero potential


# ----------------------------------------------------------------------------- training data only


def test_training_interactions_holds_no_validation_or_test():
    fields = {field.name for field in dataclasses.fields(TrainingInteractions)}
    assert fields == {"train", "train_sequences", "name"}
    view = TrainingInteractions.from_data(make_data())
    for forbidden in ("valid", "test", "split", "seen_before"):
        assert not hasattr(view, forbidden)


def test_no_reward_reads_validation_or_test(episode, scores):
    first, second = make_data(split_seed=100), make_data(split_seed=200)
    assert (first.train != second.train).nnz == 0
    assert (first.valid != second.valid).nnz > 0 and (first.test != second.test).nnz > 0
    values = []
    for data in (first, second):
        clear_memory_cache()  # no sharing through the neighbour cache either
        terms = all_terms(TrainingInteractions.from_data(data))
        values.append({name: term(scores, episode) for name, term in terms.items()})
        reward = build_reward({name: {} for name in ("loglik", "likelihood")} | {"collaborative": {"k": 5}}, data)
        values[-1]["built"] = reward(scores, episode)
    assert values[0].keys() == values[1].keys()
    for name in values[0]:
        assert torch.equal(values[0][name], values[1][name]), name


@pytest.mark.parametrize("measure", ["cosine", "pearson"])
def test_degenerate_rows_have_zero_similarity(measure):
    # user 0 has every item (constant row), user 1 none; the others are random
    rng = np.random.default_rng(7)
    dense = (rng.random((8, 6)) < 0.4).astype(np.float32)
    dense[0], dense[1] = 1.0, 0.0
    dense[2:, 0] = 1.0  # no other row is empty
    train = sp.csr_matrix(dense)
    result = top_k_similar_users(train, 3, measure)
    assert np.all(np.isfinite(result.similarity))
    assert np.all(result.similarity[1] == 0)
    if measure == "pearson":
        assert np.all(result.similarity[0] == 0)
    targets = collaborative_targets(train, result)
    assert targets[1].nnz == 0  # no positively similar neighbour
    assert targets[0].nnz == 0  # nothing left once the user's own items are removed
    sequences = UserSequences.from_lists([np.flatnonzero(row).tolist() for row in dense])
    term = CollaborativeReward(k=3, similarity=measure).bind(TrainingInteractions(train, sequences))
    visible = torch.from_numpy(dense)
    episode = EpisodeBatch(users=torch.arange(8), visible=visible, held_out=torch.zeros(8, 6, dtype=torch.bool))
    value = term(torch.randn(8, 6), episode)
    assert torch.all(torch.isfinite(value)) and value[0] == 0 and value[1] == 0


# ------------------------------------------------------------------ next-item collaborative term
def test_next_item_targets_match_a_plain_python_reference():
    from refit_gym.rewards import NextItemCollaborativeReward, UserNeighbours, next_item_targets

    sequences = UserSequences.from_lists([[0, 1, 2, 3], [1, 4, 0, 5, 1, 6], [2, 3, 4], [3, 1, 7]])
    neighbours = UserNeighbours(np.array([[1, 3], [0, 2], [0, 1], [1, 0]]),
                                np.array([[0.5, 0.25], [0.5, 0.1], [0.3, -0.2], [0.2, 0.0]], dtype=np.float32),
                                "cosine")
    n_items, users = 8, np.array([0, 0, 2])
    visible = np.zeros((3, n_items), dtype=bool)
    visible[0, [0, 1]] = True  # user 0 sees 0, 1 (2, 3 held out): last visible item 1
    visible[1, [0, 1, 2]] = True  # another row of user 0: last visible item 2
    visible[2, [2, 3]] = True  # user 2 sees 2, 3: last visible item 3
    for context in (1, 2):
        targets = next_item_targets(sequences, neighbours, users, visible, n_items, context).toarray()
        for row, user in enumerate(users):
            own = [i for i in sequences[user].tolist() if visible[row, i]]
            start = set(own[-context:])
            expected = np.zeros(n_items)
            for v, s in zip(neighbours.ids[user], neighbours.similarity[user]):
                if s <= 0:
                    continue
                seq = sequences[v].tolist()
                for a, b in zip(seq[:-1], seq[1:]):
                    if a in start and not visible[row, b]:
                        expected[b] += s
            if expected.sum():
                expected /= expected.sum()
            np.testing.assert_allclose(targets[row], expected, rtol=1e-6, atol=1e-7, err_msg=f"row {row}")
    # row 0 (user 0, after item 1): user 1 moved on to 4 and 6 (weight 0.5 each), user 3 to 7 (0.25)
    np.testing.assert_allclose(next_item_targets(sequences, neighbours, users[:1], visible[:1], n_items).toarray()[0],
                               np.array([0, 0, 0, 0, 0.4, 0, 0.4, 0.2]), rtol=1e-6)
    # per-row neighbour arrays give the same targets as the user-indexed lists
    per_row = (neighbours.ids[users], neighbours.similarity[users])
    np.testing.assert_array_equal(next_item_targets(sequences, per_row, users, visible, n_items).toarray(),
                                  next_item_targets(sequences, neighbours, users, visible, n_items).toarray())
    with pytest.raises(ConfigError, match="per-row neighbour ids and similarities of shape"):
        next_item_targets(sequences, (per_row[0][:2], per_row[1][:2]), users, visible, n_items)
    # the last shown positions (the env's EpisodeBatch.recent_items; -1 pads) give the same without repeats
    recent = np.array([[-1, 0, 1], [0, 1, 2], [-1, 2, 3]])
    for context in (1, 2, 3):
        np.testing.assert_array_equal(
            next_item_targets(sequences, neighbours, users, visible, n_items, context, recent).toarray(),
            next_item_targets(sequences, neighbours, users, visible, n_items, context).toarray())
    with pytest.raises(ConfigError, match="recent_items of shape \\(3, C >= context=2\\)"):
        next_item_targets(sequences, neighbours, users, visible, n_items, 2, recent[:, -1:])
    with pytest.raises(ConfigError, match="context"):
        NextItemCollaborativeReward(context=0)


def test_next_item_term_scores_its_target_and_is_zero_without_one(synthetic_data):
    from refit_gym.rewards import NextItemCollaborativeReward

    interactions = TrainingInteractions.from_data(synthetic_data)
    term = NextItemCollaborativeReward(k=5, temperature=1.0).bind(interactions)
    users = torch.arange(6)
    visible = torch.from_numpy(synthetic_data.train[:6].toarray()).float()
    episode = EpisodeBatch(users=users, visible=visible, held_out=torch.zeros_like(visible, dtype=torch.bool))
    scores = torch.randn(6, synthetic_data.n_items, generator=torch.Generator().manual_seed(0))
    value = term(scores, episode)
    targets = torch.from_numpy(term.episode_targets(episode).toarray())
    log_p = masked_log_softmax(scores, visible, 1.0)
    expected = (targets * torch.where(targets > 0, log_p, torch.zeros_like(log_p))).sum(1)
    torch.testing.assert_close(value, expected.float(), rtol=1e-5, atol=1e-5)
    assert (value[targets.sum(1) == 0] == 0).all()
