"""The sequential diffusion recommenders (DiffuRec, DreamRec) against straightforward references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from refit_gym.config import DiffusionConfig
from refit_gym.data.history import SequenceTable
from refit_gym.data.interactions import InteractionData, UserSequences, pairs_to_csr
from refit_gym.diffusion.schedules import make_betas
from refit_gym.errors import ConfigError
from refit_gym.models import build_model, model_config
from refit_gym.models.sequence_encoder import CausalSequenceEncoder, trim_padding
from refit_gym.models.time_embedding import timestep_embedding

pytestmark = pytest.mark.usefixtures("single_torch_thread")

N_ITEMS = 12
SEQUENCES = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 0, 1], [2, 3, 4], [6, 7, 8, 9]]


def sequence_data() -> InteractionData:
    sequences = UserSequences.from_lists(SEQUENCES)
    users = np.repeat(np.arange(len(SEQUENCES)), sequences.lengths)
    n = len(SEQUENCES)
    valid = pairs_to_csr(np.arange(n), np.array([5, 0, 2, 11, 10]), n, N_ITEMS)
    test = pairs_to_csr(np.arange(n), np.array([6, 1, 3, 10, 11]), n, N_ITEMS)
    return InteractionData(name="toy-seq", train=pairs_to_csr(users, sequences.items, n, N_ITEMS), valid=valid,
                           test=test, train_sequences=sequences)


DIFFUSION = DiffusionConfig(steps=4, noise_schedule="trunc-lin", beta_fixed=False, reweight=False,
                            timestep_sampling="uniform")


def small(name: str, **overrides):
    values = {"name": name, "hidden": 8, "max_len": 4, **overrides}
    if name == "diffurec":
        values.update(n_blocks=1, n_heads=2)
    return build_model(model_config(values), DIFFUSION, sequence_data())


def test_trunc_lin_is_diffurecs_schedule():
    betas = make_betas("trunc-lin", 32, 0.0, 0.0, 0.0, beta_fixed=False)
    scale = 1000 / 32
    np.testing.assert_allclose(betas, np.linspace(scale * 1e-4 + 0.01, scale * 0.02 + 0.01, 32))
    short = make_betas("trunc-lin", 10, 0.0, 0.0, 0.0, beta_fixed=False)  # end > 1: DiffuRec's fallback
    np.testing.assert_allclose(short[-1], 100 * 1e-3 + 0.01)


def test_exp_is_dreamrecs_schedule():
    betas = make_betas("exp", 200, 0.0, 0.0, 0.0, beta_fixed=False)
    x = np.linspace(1, 401, 200)
    np.testing.assert_allclose(betas, 1 - np.exp(-0.1 / 200 - x * 0.5 * 9.9 / 200**2))
    assert 0 < betas[0] < betas[-1] < 1


@pytest.mark.parametrize("name", ["diffurec", "dreamrec"])
def test_every_prefix_examples_are_all_prefix_target_pairs(name):
    model = small(name, training="every_prefix", max_len=3)
    table = SequenceTable(UserSequences.from_lists(SEQUENCES), N_ITEMS)
    seen = []
    for batch in model.training_batches(table, 4, torch.Generator().manual_seed(0)):
        for user, window in zip(batch.users.tolist(), batch.items.tolist()):
            seen.append((user, tuple(window)))
    expected = []
    for user, sequence in enumerate(SEQUENCES):
        for end in range(2, len(sequence) + 1):
            window = sequence[max(0, end - 4) : end]
            expected.append((user, tuple([N_ITEMS] * (4 - len(window)) + window)))
    assert sorted(seen) == sorted(expected)


@pytest.mark.parametrize("window", ["recent", "random"])
def test_causal_pass_gives_one_window_per_user(window):
    model = small("diffurec", window=window, max_len=3)
    table = SequenceTable(UserSequences.from_lists(SEQUENCES), N_ITEMS)
    batches = list(model.training_batches(table, 2, torch.Generator().manual_seed(1)))
    users = sorted(u for b in batches for u in b.users.tolist())
    assert users == list(range(len(SEQUENCES)))
    for batch in batches:
        for user, row in zip(batch.users.tolist(), batch.items.tolist()):
            real = [item for item in row if item != N_ITEMS]
            sequence = SEQUENCES[user]
            assert any(sequence[i : i + len(real)] == real for i in range(len(sequence)))  # a contiguous window
            if window == "recent":
                assert real == sequence[-4:]


def test_trim_padding_drops_only_all_padding_columns():
    items = torch.tensor([[9, 9, 1, 2], [9, 9, 9, 3]])
    assert trim_padding(items, 9).tolist() == [[1, 2], [9, 3]]
    assert trim_padding(torch.tensor([[1, 9]]), 9).tolist() == [[1, 9]]


@pytest.mark.parametrize("causal", [True, False])
def test_encoder_last_position_ignores_left_padding(causal):
    torch.manual_seed(0)
    encoder = CausalSequenceEncoder(N_ITEMS, 8, 2, 2, 6, causal=causal).eval()
    short = torch.tensor([[N_ITEMS, 3, 4, 5]])
    long = torch.tensor([[N_ITEMS, N_ITEMS, N_ITEMS, 3, 4, 5]])
    torch.testing.assert_close(encoder(short)[:, -1], encoder(long)[:, -1], rtol=1e-5, atol=1e-6)
    if causal:  # an earlier position never reads a later item
        changed = torch.tensor([[N_ITEMS, 3, 4, 0]])
        torch.testing.assert_close(encoder(short)[:, :3], encoder(changed)[:, :3])


@pytest.mark.parametrize("name", ["diffurec", "dreamrec"])
def test_scores_do_not_depend_on_the_batch_or_its_chunking(name):
    model = small(name).eval()
    table = SequenceTable(UserSequences.from_lists(SEQUENCES), N_ITEMS)
    everyone = model.score(table.batch(torch.arange(5)), chunk=2)
    alone = torch.cat([model.score(table.batch(torch.tensor([u]))) for u in range(5)])
    torch.testing.assert_close(everyone, alone, rtol=1e-5, atol=1e-5)
    assert everyone.shape == (5, N_ITEMS)


def test_diffurec_every_prefix_loss_is_the_cross_entropy_of_the_last_target():
    model = small("diffurec", training="every_prefix").eval()  # eval: lambda is its mean, no dropout
    items = torch.tensor([[N_ITEMS, 1, 2, 3, 4], [N_ITEMS, N_ITEMS, N_ITEMS, 5, 6]])
    inputs, targets = items[:, :-1], items[:, 1:]
    targets = targets.masked_fill(inputs == N_ITEMS, N_ITEMS)
    targets = torch.cat([torch.full_like(targets[:, :-1], N_ITEMS), targets[:, -1:]], dim=1)
    losses = model.next_item_loss(inputs, targets, torch.Generator().manual_seed(3))
    # the reference: the same draws (t, then the noise), one example at a time
    generator = torch.Generator().manual_seed(3)
    t = torch.randint(0, DIFFUSION.steps, (2,), generator=generator)
    noise = torch.randn(2, 1, 8, generator=generator)
    for row in range(2):
        x0 = model.item_embedding.weight[items[row, -1]]
        x_t = model.diffusion.q_sample(x0.unsqueeze(0), t[row : row + 1], noise=noise[row])
        logits = model.item_scores(model.denoise(x_t, t[row : row + 1], inputs[row : row + 1]))
        expected = F.cross_entropy(logits, items[row, -1:])
        torch.testing.assert_close(losses[row, -1], expected, rtol=1e-5, atol=1e-5)
        assert (losses[row, :-1] == 0).all()


@pytest.mark.parametrize("denoiser", ["mlp1", "mlp2"])
@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_dreamrec_chain_step_equals_the_guided_denoiser(denoiser, guidance):
    model = small("dreamrec", denoiser=denoiser, guidance=guidance).eval()
    x_t, t, h = torch.randn(6, 8), torch.tensor([0, 3, 1, 3, 2, 0]), torch.randn(6, 8)
    torch.testing.assert_close(model.denoiser.chain(h)(x_t, t), model.denoiser(x_t, h, t), rtol=1e-5, atol=1e-5)
    step = torch.stack([model.denoiser.step_mlp(timestep_embedding(t[i : i + 1], 8))[0] for i in range(6)])
    torch.testing.assert_close(model.denoiser.step_embedding(t), step)  # once per distinct step, row by row


def test_dreamrec_guidance_combines_the_conditional_and_unconditional_predictions():
    model = small("dreamrec", guidance=2.0).eval()
    x_t, t, h = torch.randn(3, 8), torch.tensor([0, 1, 3]), torch.randn(3, 8)
    conditional = model.denoiser.conditional(x_t, h, t)
    unconditional = model.denoiser.conditional(x_t, model.denoiser.none_embedding.expand_as(h), t)
    torch.testing.assert_close(model.denoiser(x_t, h, t), 3.0 * conditional - 2.0 * unconditional)


@pytest.mark.parametrize("name", ["diffurec", "dreamrec"])
@pytest.mark.parametrize("training", ["every_prefix", "causal_pass"])
def test_pretraining_steps_lower_the_loss(name, training):
    torch.manual_seed(0)
    model = small(name, training=training)
    table = SequenceTable(UserSequences.from_lists(SEQUENCES), N_ITEMS)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def epoch_loss(step: bool) -> float:
        total = []
        generator = torch.Generator().manual_seed(5)
        for batch in model.training_batches(table, 16, generator):
            loss = model.training_loss(batch, None, generator=generator)
            if step:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            total.append(float(loss.detach()))
        return float(np.mean(total))

    model.eval()
    before = epoch_loss(False)
    model.train()
    for _ in range(60):
        epoch_loss(True)
    model.eval()
    assert epoch_loss(False) < 0.7 * before


@pytest.mark.parametrize("values, message", [
    ({"training": "all"}, "model.training"),
    ({"window": "oldest"}, "model.window"),
    ({"max_len": 0}, "model.max_len"),
])
def test_bad_sequential_settings_are_refused_by_name(values, message):
    with pytest.raises(ConfigError, match=message):
        small("diffurec", **values)


def test_dreamrec_bad_denoiser_is_refused():
    with pytest.raises(ConfigError, match="model.denoiser"):
        small("dreamrec", denoiser="unet")


@pytest.mark.parametrize("target_gradient", [True, False])
def test_dreamrec_target_gradient_decides_whether_the_mse_trains_the_target_rows(target_gradient):
    """DreamRec's code trains the item embedding through the diffused target ``E[next]`` too;
    ``target_gradient: false`` detaches it (the loss is the same number, only its gradient
    differs): then a row that is only ever a target gets no gradient at all."""
    losses = {}
    for flag in (True, target_gradient):
        torch.manual_seed(0)
        model = small("dreamrec", target_gradient=flag, p_uncond=0.0).eval()
        inputs = torch.tensor([[N_ITEMS, 1, 2, 3]])
        targets = torch.tensor([[N_ITEMS, 2, 3, 9]])  # item 9 is a target and never an input
        loss = model.next_item_loss(inputs, targets, torch.Generator().manual_seed(3))[0, 1:].mean()
        loss.backward()
        losses[flag] = loss.detach()
    torch.testing.assert_close(losses[target_gradient], losses[True])
    target_only = model.item_embedding.weight.grad[9]
    assert bool((target_only != 0).any()) == target_gradient
    assert bool((model.item_embedding.weight.grad[1] != 0).any())  # the history path trains the embedding always


def test_dreamrec_target_gradient_must_be_a_bool():
    with pytest.raises(ConfigError, match="target_gradient"):
        small("dreamrec", target_gradient="no")


@pytest.mark.parametrize("name", ["diffurec", "dreamrec"])
def test_the_chain_denoiser_is_denoise_at_every_step_and_the_sample_its_chain(name):
    model = small(name, guidance=2.0) if name == "dreamrec" else small(name)
    model.eval()
    table = SequenceTable(UserSequences.from_lists(SEQUENCES), N_ITEMS)
    history = table.batch(torch.arange(5))
    inputs = model.encode(history)
    chain = model.chain_denoiser(**inputs.condition)
    x = model.start_state(inputs, model.evaluation_noise(history.users))
    start = x.clone()
    for t in reversed(range(DIFFUSION.steps)):
        step = torch.full((5,), t)
        torch.testing.assert_close(chain(x, step), model.denoise(x, step, **inputs.condition))
        x = model.reverse_mean(x, t, **inputs.condition)  # the reference chain: the condition re-encoded each step
    sample = model.sample(inputs, start)
    torch.testing.assert_close(sample, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["diffurec", "dreamrec"])
def test_the_env_runs_its_hidden_prefix_as_the_reference_chain(name, monkeypatch):
    """The env's prefix steps with the condition encoded once equal the chain that re-encodes it at every step."""
    from refit_gym.data.interactions import TrainingInteractions
    from refit_gym.envs.core import DenoisingMDP
    from refit_gym.rewards import build_reward

    data = sequence_data()
    model = small(name).eval().requires_grad_(False)
    encodings = []
    if name == "dreamrec":
        encode = model.history_encoding
        monkeypatch.setattr(model, "history_encoding", lambda items: encodings.append(1) or encode(items))

    def reset() -> torch.Tensor:
        core = DenoisingMDP(model, build_reward("loglik", data), TrainingInteractions.from_data(data), batch_size=5,
                            exposed_steps=1, holdout_count=1)
        core.reset(np.random.default_rng(0), users=[0, 1, 2, 3, 4])
        return core.x_t.clone()

    fast = reset()
    if name == "dreamrec":
        assert len(encodings) == 1  # once per chain, not once per step (3 hidden steps here)
    every_step = lambda self, **condition: lambda x_t, t: self.denoise(x_t, t, **condition)  # noqa: E731
    monkeypatch.setattr(type(model), "chain_denoiser", every_step)  # the reference: encoded at every step
    torch.testing.assert_close(fast, reset())
    if name == "dreamrec":
        assert len(encodings) == 1 + DIFFUSION.steps - 1


def test_next_item_term_starts_from_the_last_shown_position_when_an_item_repeats():
    """User 0's hidden last position repeats an item shown earlier: by items the context would be the
    hidden repeat (item 1, after which its neighbour 4 moved on to 4); by positions it is the last
    shown item (3, after which neighbour 3 moved on to 5). The env passes the positions, and keeps
    them per row across a partial reset."""
    from refit_gym.data.interactions import TrainingInteractions
    from refit_gym.envs.core import DenoisingMDP
    from refit_gym.rewards import NextItemCollaborativeReward, build_reward, next_item_targets

    sequences = [[0, 1, 2, 3, 1], [5, 6, 4], [2, 3, 4, 5], [0, 1, 3, 5, 6], [1, 4, 2, 3]]
    data = sequence_data()
    seqs = UserSequences.from_lists(sequences)
    users = np.repeat(np.arange(len(sequences)), seqs.lengths)
    data = InteractionData(name="toy-repeat", train=pairs_to_csr(users, seqs.items, 5, N_ITEMS), valid=data.valid,
                           test=data.test, train_sequences=seqs)
    model = small("dreamrec").eval().requires_grad_(False)
    reward = build_reward({"next_collaborative": {"weight": 1.0, "k": 2, "context": 1}}, data)
    assert reward.recent_items_needed == 1
    core = DenoisingMDP(model, reward, TrainingInteractions.from_data(data), batch_size=5, exposed_steps=1,
                        holdout_count=1)
    core.reset(np.random.default_rng(0), users=[0, 1, 2, 3, 4])
    episode = core.episode()
    expected = [sequence[-2:-1] for sequence in sequences]  # the last shown position
    assert episode.recent_items.tolist() == expected
    assert episode.visible[0, 1] == 1 and not episode.held_out[0].any()  # the repeat stays visible, unscored

    term = reward.terms["next_collaborative"]
    assert isinstance(term, NextItemCollaborativeReward)
    by_position = term.episode_targets(episode).toarray()
    visible = episode.visible.numpy() > 0
    neighbours = term.episode_neighbours(np.arange(5), visible)
    by_item = next_item_targets(seqs, neighbours, np.arange(5), visible, N_ITEMS, 1).toarray()
    np.testing.assert_array_equal(by_position[1:], by_item[1:])  # no repeats: the same
    starts = {3: {3}, 1: {1}}  # row 0 by position / by item
    for which, targets in ((3, by_position[0]), (1, by_item[0])):
        reference = np.zeros(N_ITEMS)
        for v, s in zip(*(a[0] for a in neighbours)):
            seq = sequences[v]
            for a, b in zip(seq[:-1], seq[1:]):
                if s > 0 and a in starts[which] and not visible[0, b]:
                    reference[b] += s
        np.testing.assert_allclose(targets, reference / reference.sum(), rtol=1e-6)
    assert by_position[0, 5] == 1 and by_item[0, 4] == 1

    core.reset(np.random.default_rng(1), users=[2], mask=[False, False, False, True, False])
    assert core.episode().recent_items.tolist() == expected[:3] + [expected[2]] + expected[4:]
    assert core.episode(np.array([3])).recent_items.tolist() == [expected[2]]
    plain = DenoisingMDP(model, build_reward("loglik", data), TrainingInteractions.from_data(data), batch_size=5,
                         exposed_steps=1, holdout_count=1)
    plain.reset(np.random.default_rng(0))
    assert plain.episode().recent_items is None


@pytest.mark.parametrize("name", ["diffurec", "dreamrec"])
def test_the_policy_encodes_a_rollouts_history_once(name, monkeypatch):
    """``loc_function`` equals ``loc`` to the last bit and its gradient up to rounding; with DreamRec a
    rollout and an update's step log-probs each encode the policy's history once, not once per step."""
    from agents.config import finetune_config
    from agents.trainer import build_learner
    from refit_gym.models.dreamrec import DreamRec

    data = sequence_data()
    settings = finetune_config({"agent": "refit", "users_per_batch": 5, "rollouts_per_user": 2, "exposed_steps": 3,
                                "trained_steps": 3, "holdout_count": 1, "reward": {"loglik": {"weight": 1.0}},
                                "action_mode": "x0", "log_std_init": -2.0})
    agent = build_learner(settings, small(name), data)
    policy = agent.policy
    observation = agent.core.reset(np.random.default_rng(0), users=np.repeat(np.arange(5), 2))
    context = policy.context(observation)
    x = torch.randn(10, policy.model.state_dim, generator=torch.Generator().manual_seed(0))
    steps = [torch.full((10, 1), t, dtype=torch.int64) for t in (1, 2, 3)]
    loc_at = policy.loc_function(**context)
    shared = [loc_at(x, t) for t in steps]
    separate = [policy.loc(x, t, **context) for t in steps]
    for a, b in zip(shared, separate):
        assert torch.equal(a, b)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    grads_shared = torch.autograd.grad(sum(loc.square().sum() for loc in shared), params, allow_unused=True)
    grads_separate = torch.autograd.grad(sum(loc.square().sum() for loc in separate), params, allow_unused=True)
    for a, b in zip(grads_shared, grads_separate):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # the same sum in another order

    if name != "dreamrec":
        return
    calls = []
    encode = DreamRec.history_encoding
    monkeypatch.setattr(DreamRec, "history_encoding",
                        lambda model, items: calls.append(model is policy.model) or encode(model, items))
    rollout = agent.collect(np.arange(5), np.random.default_rng(1), torch.Generator().manual_seed(1))
    assert calls.count(True) == 1  # three exposed steps, one encoding
    calls.clear()
    agent.step_log_probs(rollout, [0, 1, 2])
    assert calls == [True]


def test_bench_update_times_the_per_step_reference_against_one_encoding(monkeypatch):
    """benchmarks/bench_update.py on a toy DreamRec: its reference encodes the history at every step (three
    exposed + three trained per update), the library once per rollout and once per update; the losses agree
    up to rounding, and the policy is left as it was."""
    import importlib.util
    from pathlib import Path

    from agents.config import finetune_config
    from agents.trainer import build_learner
    from refit_gym.models.dreamrec import DreamRec

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_update.py"
    spec = importlib.util.spec_from_file_location("bench_update", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = sequence_data()
    settings = finetune_config({"agent": "refit", "users_per_batch": 5, "rollouts_per_user": 2, "exposed_steps": 3,
                                "trained_steps": 3, "holdout_count": 1, "action_mode": "x0", "log_std_init": -2.0,
                                "reward": {"next_collaborative": {"weight": 1.0, "k": 2}}})
    agent = build_learner(settings, small("dreamrec"), data)
    before = {k: v.clone() for k, v in agent.policy.state_dict().items()}
    calls = []
    encode = DreamRec.history_encoding
    monkeypatch.setattr(DreamRec, "history_encoding",
                        lambda model, items: calls.append(model is agent.policy.model) or encode(model, items))
    per_update = {}
    for name, loc_function in (("once", agent.policy.loc_function), ("per step", bench.per_step_loc_function(agent.policy))):
        agent.policy.loc_function = loc_function
        calls.clear()
        bench.timed_updates(agent, (before, agent.optimizer.state_dict()), data, settings, 1, 0)
        per_update[name] = calls.count(True)
    del agent.policy.loc_function
    assert per_update["per step"] - per_update["once"] == (3 - 1) + (3 - 1)
    start = {k: v.clone() for k, v in agent.policy.state_dict().items()}
    report = bench.compare(agent, data, settings, n_updates=2, repeats=2)
    assert set(report["seconds_per_update"]) == {"once", "per step"} and report["largest_loss_difference"] < 1e-4
    assert "loc_function" not in vars(agent.policy)
    for key, value in agent.policy.state_dict().items():
        assert torch.equal(value, start[key])
