"""The TorchRL front: specs, partial resets, a Collector batch and a ClipPPOLoss backward over the denoiser."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from tensordict.nn import TensorDictModule
from torchrl.collectors import Collector
from torchrl.envs.utils import check_env_specs
from torchrl.modules import IndependentNormal, ProbabilisticActor, ValueOperator
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

import refit_gym
from refit_gym.envs.policies import DenoiserPolicy
from refit_gym.envs.torchrl_env import DenoisingTorchRLEnv
from refit_gym.errors import ActionError, EpisodeStateError

SMALL = {"pretrained": False, "dataset": "synthetic:n_users=60,n_items=40,seed=0"}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


class UserValue(torch.nn.Module):
    """A critic that sees only the user (the advantage is then per-trajectory, DDPO-style)."""

    def __init__(self, n_users: int) -> None:
        super().__init__()
        self.value = torch.nn.Embedding(n_users, 1)

    def forward(self, user: torch.Tensor) -> torch.Tensor:
        return self.value(user.squeeze(-1))


@pytest.mark.parametrize("action_mode", ["x0", "x_prev"])
def test_check_env_specs_collector_and_ppo_backward(action_mode):
    env = refit_gym.make_torchrl_env(
        "ReFiT-Synthetic-v0", num_envs=4, action_mode=action_mode, exposed_steps=3, **SMALL
    )
    assert env.batch_size == torch.Size([4])
    check_env_specs(env, seed=0)

    base = env.base_model
    frozen_before = {k: v.clone() for k, v in base.denoiser.state_dict().items()}
    head = DenoiserPolicy(base, action_mode, log_std_init=-3.0)  # a trainable copy of the base model
    denoiser = head.model.denoiser
    actor = ProbabilisticActor(
        TensorDictModule(head, in_keys=["x_t", "t"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        spec=env.action_spec,
        distribution_class=IndependentNormal,
        return_log_prob=True,
    )
    critic = ValueOperator(UserValue(env.core.n_users), in_keys=["user"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        collector = Collector(env, actor, frames_per_batch=4 * 3 * 2, total_frames=4 * 3 * 2,
                              auto_register_policy_transforms=False)
    batch = next(iter(collector))
    collector.shutdown()
    assert batch.shape == torch.Size([4, 6])
    done = batch["next", "done"].squeeze(-1)
    assert done[:, 2].all() and done[:, 5].all() and not done[:, [0, 1, 3, 4]].any()
    assert batch["t"][0].squeeze(-1).tolist() == [3, 2, 1, 3, 2, 1]
    reward = batch["next", "reward"].squeeze(-1)
    assert torch.count_nonzero(reward[:, [0, 1, 3, 4]]) == 0 and (reward[:, [2, 5]] < 0).all()
    assert torch.equal(batch["next", "reward_terms", "loglik"], reward)

    GAE(gamma=1.0, lmbda=1.0, value_network=critic)(batch)
    losses = ClipPPOLoss(actor, critic, clip_epsilon=0.2, entropy_bonus=False)(batch)
    (losses["loss_objective"] + losses["loss_critic"]).backward()
    assert torch.isfinite(losses["loss_objective"])
    assert denoiser.out_layers[-1].weight.grad.abs().sum() > 0 and head.log_std.grad is not None
    # the env's own base model is frozen and untouched
    assert all(torch.equal(v, frozen_before[k]) for k, v in base.denoiser.state_dict().items())
    assert not any(p.requires_grad for p in base.denoiser.parameters())


def test_partial_reset_through_the_reset_key():
    env = DenoisingTorchRLEnv(num_envs=3, exposed_steps=2, **SMALL)
    env.set_seed(0)
    td = env.reset()
    for _ in range(2):
        td = env.step(td.set("action", torch.zeros(3, env.core.n_items)))["next"]
    assert td["done"].all()
    before = td["x_t"].clone()
    reset = env.reset(td.clone().set("_reset", torch.tensor([[True], [False], [True]])))
    assert reset["t"].squeeze(-1).tolist() == [2, 0, 2]
    assert torch.equal(reset["x_t"][1], before[1])
    assert reset["done"].squeeze(-1).tolist() == [False, True, False]


def test_seeding_and_errors():
    def rollout(seed):
        env = DenoisingTorchRLEnv(num_envs=2, exposed_steps=3, **SMALL)
        env.set_seed(seed)
        return env.rollout(3, policy=lambda td: td.set("action", torch.full((2, env.core.n_items), 0.5)))

    first, second, third = rollout(1), rollout(1), rollout(2)
    assert torch.equal(first["next", "x_t"], second["next", "x_t"])
    assert torch.equal(first["next", "reward"], second["next", "reward"])
    assert not torch.equal(first["next", "x_t"], third["next", "x_t"])

    env = DenoisingTorchRLEnv(num_envs=2, exposed_steps=1, **SMALL)
    td = env.reset()
    state = env.core.x_t.clone()
    with pytest.raises(ActionError):
        env.step(td.clone().set("action", torch.full((2, env.core.n_items), float("nan"))))
    assert torch.equal(env.core.x_t, state)
    env.step(td.clone().set("action", torch.zeros(2, env.core.n_items)))
    with pytest.raises(EpisodeStateError):
        env.step(td.clone().set("action", torch.zeros(2, env.core.n_items)))
    assert np.array_equal(env.core.t, [0, 0])


def test_gym_wrapper_over_the_vector_env_also_works():
    """The other documented TorchRL route: ``GymWrapper(gym.make_vec(...))`` (DISABLED autoreset)."""
    import gymnasium as gym
    from torchrl.envs import GymWrapper

    env = GymWrapper(gym.make_vec("ReFiT-Synthetic-v0", num_envs=3, exposed_steps=3, **SMALL))
    assert env.batch_size == torch.Size([3])
    check_env_specs(env, seed=0)
    done = env.rollout(7, break_when_any_done=False)["next", "done"].squeeze(-1)
    assert done[:, 2].all() and done[:, 5].all() and not done[:, [0, 1, 3, 4, 6]].any()
