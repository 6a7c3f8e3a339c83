"""The diffusion maths against direct formulas and torch.distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from refit_gym.data.sparse_rows import SparseRows
from refit_gym.diffusion import GaussianDiffusion, TimestepSampler, gaussian_log_prob, make_betas
from refit_gym.errors import ConfigError
from refit_gym.models.diffrec import DiffRecMLP
from refit_gym.models.time_embedding import timestep_embedding

ML1M = dict(steps=40, noise_schedule="linear-var", noise_scale=0.005, noise_min=0.005, noise_max=0.01)


def test_linear_var_betas_match_the_variance_definition():
    betas = make_betas("linear-var", 40, 0.005, 0.005, 0.01, beta_fixed=False)
    variance = np.linspace(0.005 * 0.005, 0.005 * 0.01, 40)
    alpha_bar = np.cumprod(1 - betas)
    np.testing.assert_allclose(1 - alpha_bar, variance, rtol=1e-9)


def test_beta_fixed_overwrites_the_first_beta_only():
    fixed = make_betas("linear-var", 40, 0.005, 0.005, 0.01, beta_fixed=True)
    free = make_betas("linear-var", 40, 0.005, 0.005, 0.01, beta_fixed=False)
    assert fixed[0] == 1e-5
    np.testing.assert_array_equal(fixed[1:], free[1:])


@pytest.mark.parametrize("schedule", ["linear", "linear-var", "cosine", "binomial"])
def test_every_schedule_gives_valid_betas(schedule):
    betas = make_betas(schedule, 20, 0.1, 0.001, 0.02)
    assert betas.shape == (20,) and np.all((betas > 0) & (betas <= 1))


def test_ml1m_schedule_numbers_from_the_anchor_notes():
    """Posterior std ~7.8e-4..7.9e-4 and c1 0.060 (t=1) -> 0.018 (t=39) on DiffRec's ML-1M setting."""
    diffusion = GaussianDiffusion(**ML1M)
    std = torch.exp(0.5 * diffusion.posterior_log_variance_clipped)
    assert 7.7e-4 < float(std[1:].min()) and float(std[1:].max()) < 8.0e-4
    assert diffusion.posterior_mean_coef1[1].item() == pytest.approx(0.060, abs=0.002)
    assert diffusion.posterior_mean_coef1[39].item() == pytest.approx(0.018, abs=0.002)


@pytest.mark.parametrize("bad", [dict(steps=0), dict(noise_schedule="quadratic"), dict(mean_type="v"), dict(noise_scale=0.0)])
def test_bad_diffusion_settings_raise_config_error(bad):
    with pytest.raises(ConfigError):
        GaussianDiffusion(**{**ML1M, **bad})


def test_posterior_matches_the_direct_gaussian_product():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): mean and variance in closed form."""
    diffusion = GaussianDiffusion(steps=10, noise_schedule="linear", noise_scale=1.0, noise_min=0.01, noise_max=0.2)
    x0, xt = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    for t in range(1, 10):
        beta = diffusion.betas[t].item()
        a_prev = diffusion.alphas_cumprod_prev[t].item()
        # precision-weighted combination of the two Gaussians in x_{t-1}
        precision = (1 - beta) / beta + 1 / (1 - a_prev)
        mean = ((math.sqrt(1 - beta) / beta) * xt + (math.sqrt(a_prev) / (1 - a_prev)) * x0) / precision
        got_mean, got_var, _ = diffusion.q_posterior_mean_variance(x0, xt, t)
        torch.testing.assert_close(got_mean, mean)
        assert got_var.item() == pytest.approx(1 / precision, rel=1e-9)


def test_q_sample_has_the_forward_marginal():
    diffusion = GaussianDiffusion(steps=5, noise_schedule="linear", noise_scale=1.0, noise_min=0.1, noise_max=0.5)
    x0 = torch.full((200_000, 1), 2.0, dtype=torch.float64)
    xt = diffusion.q_sample(x0, torch.full((200_000,), 4), generator=torch.Generator().manual_seed(0))
    a = diffusion.alphas_cumprod[4].item()
    assert xt.mean().item() == pytest.approx(2.0 * math.sqrt(a), abs=5e-3)
    assert xt.var().item() == pytest.approx(1 - a, rel=2e-2)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gaussian_log_prob_matches_torch_distributions(reduction):
    x, mean = torch.randn(4, 9), torch.randn(4, 9)
    log_std = torch.tensor(-1.3)
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(x)
    expected = expected.sum(-1) if reduction == "sum" else expected.mean(-1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, log_std, reduction), expected)


def test_gaussian_log_prob_rejects_unknown_reductions():
    with pytest.raises(ConfigError, match="reduction"):
        gaussian_log_prob(torch.zeros(1, 2), torch.zeros(1, 2), 0.0, "max")


def test_loss_weights_are_snr_differences_and_one_at_zero():
    diffusion = GaussianDiffusion(**ML1M)
    t = torch.arange(40)
    weights = diffusion.loss_weights(t)
    snr = diffusion.alphas_cumprod / (1 - diffusion.alphas_cumprod)
    assert weights[0].item() == 1.0
    torch.testing.assert_close(weights[1:], snr[:-1] - snr[1:])


def _identity_x0(x_t, t):
    return x_t * 0.5


def test_deterministic_sample_is_the_posterior_mean_chain():
    diffusion = GaussianDiffusion(**ML1M)
    x = torch.rand(3, 6)
    expected = x.clone()
    for t in reversed(range(40)):
        expected = diffusion.q_posterior_mean_variance(_identity_x0(expected, t), expected, t)[0]
    torch.testing.assert_close(diffusion.sample(_identity_x0, x), expected)
    # the last step (t=0) returns the x0 estimate itself: coef1 = 1, coef2 = 0
    assert diffusion.posterior_mean_coef1[0].item() == pytest.approx(1.0)
    assert diffusion.posterior_mean_coef2[0].item() == pytest.approx(0.0)


def test_stochastic_trajectory_records_each_steps_log_prob():
    diffusion = GaussianDiffusion(steps=4, noise_schedule="linear", noise_scale=1.0, noise_min=0.01, noise_max=0.1)
    x = torch.randn(2, 5)
    trajectory = diffusion.sample_trajectory(_identity_x0, x, log_std=-2.0, generator=torch.Generator().manual_seed(1))
    assert len(trajectory.states) == 5 and trajectory.timesteps == [3, 2, 1, 0]
    for k, t in enumerate(trajectory.timesteps):
        mean = diffusion.p_mean_variance(_identity_x0, trajectory.states[k], t)["mean"]
        expected = torch.distributions.Normal(mean, math.exp(-2.0)).log_prob(trajectory.states[k + 1]).sum(-1)
        torch.testing.assert_close(trajectory.log_probs[k], expected)


def test_sample_trajectory_is_seeded():
    diffusion = GaussianDiffusion(steps=4, noise_schedule="linear", noise_scale=1.0, noise_min=0.01, noise_max=0.1)
    x = torch.randn(2, 5)
    runs = [diffusion.sample_trajectory(_identity_x0, x, generator=torch.Generator().manual_seed(s)).final for s in (3, 3, 4)]
    torch.testing.assert_close(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_importance_sampler_history_matches_diffrecs_sequential_update():
    sampler = TimestepSampler(steps=3, history=4)
    reference = {t: [] for t in range(3)}
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        t = torch.randint(0, 3, (5,), generator=generator)
        losses = torch.rand(5, generator=generator)
        sampler.update(t, losses)
        for step, loss in zip(t.tolist(), losses.tolist()):
            reference[step] = (reference[step] + [loss])[-4:]
    for step in range(3):
        n = int(sampler.loss_count[step])
        assert n == len(reference[step])
        np.testing.assert_allclose(sampler.loss_history[step, :n].numpy(), reference[step], rtol=1e-6)


def test_importance_sampler_is_uniform_until_warm_and_then_follows_losses():
    sampler = TimestepSampler(steps=4, history=2, uniform_prob=0.0)
    torch.testing.assert_close(sampler.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    t, divisor = sampler.sample(8)
    assert torch.all(divisor == 1)
    sampler.update(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 3.0]))
    assert sampler.warmed_up
    probs = sampler.probabilities()
    torch.testing.assert_close(probs, torch.tensor([1, 1, 1, 3], dtype=torch.float64) / 6)
    t, divisor = sampler.sample(100, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(divisor, (probs[t] * 4).float())


def test_importance_sampler_state_round_trips_through_state_dict():
    sampler = TimestepSampler(steps=3, history=2)
    sampler.update(torch.tensor([0, 1, 2, 0]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    restored = TimestepSampler(steps=3, history=2)
    restored.load_state_dict(sampler.state_dict())
    torch.testing.assert_close(restored.loss_history, sampler.loss_history)


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0, 3]), 5)
    assert emb.shape == (2, 5)
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]))
    freqs = torch.exp(-math.log(10000) * torch.arange(2) / 2)
    torch.testing.assert_close(emb[1, :4], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))


def test_diffrec_mlp_equals_the_concatenated_formulation():
    torch.manual_seed(0)
    net = DiffRecMLP(n_items=30, dims=[8, 16], time_emb_dim=10, dropout=0.0).eval()
    x, t = torch.rand(4, 30), torch.tensor([0, 1, 5, 9])
    time = net.emb_layer(timestep_embedding(t, 10))
    h = torch.cat([x, time], dim=-1)
    for layer in net.in_layers:
        h = torch.tanh(layer(h))
    h = torch.tanh(net.out_layers[0](h))
    expected = net.out_layers[1](h)
    torch.testing.assert_close(net(x, t), expected)
    assert [tuple(l.weight.shape) for l in net.in_layers] == [(16, 40), (8, 16)]


def test_sparse_rows_dense_equals_scipy():
    matrix = sp.random(20, 15, density=0.3, format="csr", random_state=0, dtype=np.float32)
    rows = torch.tensor([3, 0, 19, 3, 7])
    expected = torch.from_numpy(matrix[rows.numpy()].toarray())
    torch.testing.assert_close(SparseRows(matrix).dense(rows), expected)


def test_fused_posterior_step_equals_the_unfused_chain():
    torch.manual_seed(0)
    net = DiffRecMLP(n_items=30, dims=[8, 16], time_emb_dim=10, dropout=0.5).eval()
    diffusion = GaussianDiffusion(**ML1M)
    x = torch.rand(5, 30)
    original = x.clone()
    expected = x
    for t in reversed(range(40)):
        expected = diffusion.p_mean_variance(net, expected, t)["mean"]
    torch.testing.assert_close(diffusion.sample(net, x), expected, rtol=1e-5, atol=1e-6)
    fused = diffusion.sample(net, x, posterior_mean=net.posterior_mean)  # the fused-step protocol
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(x, original)  # the caller's start vector is not modified
