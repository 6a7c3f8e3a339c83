"""Plackett-Luce slates (refit_gym/slates.py) against brute-force references."""

import itertools
import math

import pytest
import torch

from refit_gym.errors import ConfigError
from refit_gym.rewards.base import EpisodeBatch
from refit_gym.slates import sample_slates, slate_log_prob, slate_reward


def brute_force_log_prob(logits: list[float], slate: tuple[int, ...]) -> float:
    """The Plackett-Luce product written out: pick each item from the ones still left."""
    left, total = list(range(len(logits))), 0.0
    for item in slate:
        total += logits[item] - math.log(sum(math.exp(logits[i]) for i in left))
        left.remove(item)
    return total


def test_log_prob_matches_the_written_out_product_and_sums_to_one():
    torch.manual_seed(0)
    scores = torch.randn(1, 5, dtype=torch.float64)
    visible = torch.zeros(1, 5)
    slates = list(itertools.permutations(range(5), 3))
    values = slate_log_prob(scores.expand(len(slates), 5), visible.expand(len(slates), 5),
                            torch.tensor(slates), temperature=0.5)
    reference = [brute_force_log_prob((scores[0] / 0.5).tolist(), s) for s in slates]
    assert torch.allclose(values, torch.tensor(reference, dtype=torch.float64), atol=1e-12)
    assert values.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_input_items_are_never_drawn_and_have_no_probability():
    scores = torch.tensor([[5.0, 0.0, 0.0, 0.0, 0.0]])
    visible = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0]])
    slates = sample_slates(scores.expand(200, 5), visible.expand(200, 5), 3, 1.0, torch.Generator().manual_seed(0))
    assert not bool(((slates == 0) | (slates == 3)).any())
    total = slate_log_prob(scores.expand(6, 5), visible.expand(6, 5),
                           torch.tensor(list(itertools.permutations([1, 2, 4], 3))), 1.0).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-6)


def test_gumbel_top_k_draws_follow_the_plackett_luce_probabilities():
    """Frequencies of 40,000 draws of ordered pairs out of 4 items against the exact probabilities."""
    scores = torch.tensor([[1.0, 0.5, -0.3, 0.0]])
    n = 40_000
    slates = sample_slates(scores.expand(n, 4), torch.zeros(n, 4), 2, 0.7, torch.Generator().manual_seed(1))
    pairs = list(itertools.permutations(range(4), 2))
    exact = slate_log_prob(scores.expand(len(pairs), 4), torch.zeros(len(pairs), 4), torch.tensor(pairs), 0.7).exp()
    for pair, p in zip(pairs, exact.tolist()):
        frequency = ((slates[:, 0] == pair[0]) & (slates[:, 1] == pair[1])).float().mean().item()
        assert frequency == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))


def test_sampling_is_reproducible_from_the_generator():
    scores = torch.randn(8, 30)
    draw = lambda seed: sample_slates(scores, torch.zeros(8, 30), 5, 0.1, torch.Generator().manual_seed(seed))
    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_log_prob_gradient_matches_finite_differences():
    torch.manual_seed(2)
    scores = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    visible = torch.tensor([[0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    slates = torch.tensor([[2, 0, 5], [1, 4, 3]])
    assert torch.autograd.gradcheck(lambda s: slate_log_prob(s, visible, slates, 0.3), (scores,))


def episode(held_out_rows: list[list[int]], n_items: int = 6, visible_rows=None) -> EpisodeBatch:
    held = torch.zeros(len(held_out_rows), n_items, dtype=torch.bool)
    for row, items in enumerate(held_out_rows):
        held[row, items] = True
    visible = torch.zeros(len(held_out_rows), n_items)
    for row, items in enumerate(visible_rows or []):
        visible[row, items] = 1.0
    return EpisodeBatch(users=torch.arange(len(held_out_rows)), visible=visible, held_out=held)


def test_ranking_rewards_of_a_slate_match_their_definitions():
    batch = episode([[1, 4], [], [0, 2, 3, 5]])
    slates = torch.tensor([[4, 0, 1], [1, 2, 3], [1, 2, 4]])
    d = [1 / math.log2(j + 2) for j in range(3)]
    assert slate_reward(slates, batch, "hits").tolist() == [2.0, 0.0, 1.0]
    assert slate_reward(slates, batch, "recall").tolist() == pytest.approx([1.0, 0.0, 0.25])
    ndcg = [(d[0] + d[2]) / (d[0] + d[1]), 0.0, d[1] / sum(d)]
    assert slate_reward(slates, batch, "ndcg").tolist() == pytest.approx(ndcg)


def test_the_ranking_rewards_agree_with_the_score_based_reward_terms():
    """A slate's recall/ndcg equal those of HeldOutRecall/HeldOutNDCG on scores that rank the slate first."""
    from refit_gym.rewards.ranking import HeldOutNDCG, HeldOutRecall

    torch.manual_seed(3)
    batch = episode([[0, 3, 7], [2], [5, 6, 8, 9]], n_items=10, visible_rows=[[1], [0, 4], []])
    scores = torch.randn(3, 10)
    slates = sample_slates(scores, batch.visible, 4, 1.0, torch.Generator().manual_seed(0))
    ranked = torch.full((3, 10), -100.0).scatter(1, slates, torch.tensor([4.0, 3.0, 2.0, 1.0]).expand(3, 4))
    for kind, term in (("recall", HeldOutRecall(4)), ("ndcg", HeldOutNDCG(4))):
        term.n_items = 10
        assert torch.allclose(slate_reward(slates, batch, kind), term(ranked, batch))


def test_collaborative_slate_reward_is_the_target_share_covered():
    batch = episode([[0], [0]])
    targets = torch.tensor([[0.5, 0.25, 0.25, 0, 0, 0], [0, 0, 0, 0, 0, 1.0]])
    slates = torch.tensor([[0, 2], [3, 4]])
    assert slate_reward(slates, batch, "collaborative", targets).tolist() == [0.75, 0.0]


@pytest.mark.parametrize("call, message", [
    (lambda: sample_slates(torch.zeros(1, 4), torch.tensor([[1.0, 1, 0, 0]]), 3, 1.0), "exceeds the 2 items row 0"),
    (lambda: sample_slates(torch.zeros(1, 4), torch.zeros(1, 4), 0, 1.0), "positive int"),
    (lambda: slate_log_prob(torch.zeros(1, 4), torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0, 1]]), 1.0),
     "item of the user's input"),
    (lambda: slate_log_prob(torch.zeros(1, 4), torch.zeros(1, 4), torch.tensor([[2, 2]]), 1.0), "same item twice"),
    (lambda: slate_reward(torch.tensor([[0]]), episode([[0]]), "mrr"), "unknown slate reward 'mrr'"),
    (lambda: slate_reward(torch.tensor([[0]]), episode([[0]]), "collaborative"), "needs the users' collaborative"),
])
def test_bad_inputs_are_refused_by_name(call, message):
    with pytest.raises(ConfigError, match=message):
        call()
