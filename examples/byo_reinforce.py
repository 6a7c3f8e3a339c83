"""Bring your own algorithm: REINFORCE with a per-user baseline over refit-gym's public API, in one file.

CleanRL-style: the hyper-parameters are one dataclass, the maths is in the loop. The policy is a
trainable copy of the env's pretrained denoiser with a Gaussian head
(``refit_gym.envs.DenoiserPolicy``); the env is either the Gymnasium vector env
(``gym.make_vec``, numpy in and out) or the TorchRL env (``refit_gym.make_torchrl_env``, tensors
stay on the device). The agent sees only the reward of its actions (kind (a)).

    python examples/byo_reinforce.py --front gym --updates 30 --plot curve.png
    python examples/byo_reinforce.py --front torchrl

Each update draws ``users`` users, runs ``rollouts`` episodes for each (the last
``exposed_steps`` steps of the denoising chain), then takes the REINFORCE step with the mean
return of the user's own rollouts as its baseline (the spread between users is far larger than
the effect of one action, so a batch-wide baseline drowns the signal):

    loss = -mean_i (R_i - mean_{j: user(j) = user(i)} R_j) * sum_s log pi(a_is | s_is)

Every ``eval_every`` updates it prints the return of the deterministic policy (the Gaussian's
mean) on fixed users, which rises from the pretrained policy's. Reward-only learning on this
MDP is slow (docs/finetuning.md): expect a small, steady rise, not a jump.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

import refit_gym
from refit_gym.envs import DenoiserPolicy


@dataclass
class Args:
    env_id: str = "ReFiT-Synthetic-v0"
    """Any registered id (``refit-gym envs``)."""
    front: str = "gym"
    """``gym`` (the Gymnasium vector env) or ``torchrl`` (the TorchRL env)."""
    users: int = 8
    """Users per update."""
    rollouts: int = 8
    """Episodes per user (their mean return is the user's baseline); ``users * rollouts`` run side by side."""
    exposed_steps: int = 1
    """The agent takes the last k steps of the chain; the pretrained model runs the others."""
    updates: int = 20
    """REINFORCE updates."""
    lr: float = 2e-4
    """Adam's learning rate."""
    log_std: float = -3.0
    """Exploration log-std of the Gaussian head (the pretrained model's own is far smaller)."""
    eval_every: int = 5
    """Print the deterministic policy's return on fixed users every this many updates."""
    seed: int = 0
    """Seeds the env and torch."""
    plot: str = ""
    """Write the learning curve to this PNG."""


def episode_gym(env, policy: DenoiserPolicy, users: np.ndarray, seed: int, explore: bool = True):
    """One episode per row of the vector env (row i for user ``users[i]``): returns and summed log-probs."""
    obs, _ = env.reset(seed=seed, options={"users": users})
    log_prob, returns = 0.0, np.zeros(env.num_envs, dtype=np.float32)
    done = np.zeros(env.num_envs, dtype=bool)
    while not done.all():
        loc, scale = policy(torch.from_numpy(obs["x_t"]), torch.from_numpy(obs["t"]))
        dist = torch.distributions.Normal(loc, scale)
        action = dist.sample() if explore else loc
        log_prob = log_prob + dist.log_prob(action).sum(-1)
        obs, reward, terminated, truncated, info = env.step(action.detach().numpy())
        returns += reward
        done = terminated | truncated
    return torch.from_numpy(returns), log_prob


def episode_torchrl(env, policy: DenoiserPolicy, users: np.ndarray, seed: int, explore: bool = True):
    """The same with the TorchRL env (tensordicts, no numpy)."""
    env.set_seed(seed)
    env.reset_users = users
    td = env.reset()
    log_prob, returns = 0.0, torch.zeros(env.num_envs)
    while True:
        loc, scale = policy(td["x_t"], td["t"])
        dist = torch.distributions.Normal(loc, scale)
        td["action"] = (dist.sample() if explore else loc).detach()
        log_prob = log_prob + dist.log_prob(td["action"]).sum(-1)
        td = env.step(td)["next"]
        returns += td["reward"].squeeze(-1)
        if bool(td["done"].all()):
            return returns, log_prob


def train(args: Args) -> list[tuple[int, float]]:
    """The learning curve: ``(update, deterministic return on fixed users)``."""
    torch.manual_seed(args.seed)
    n = args.users * args.rollouts
    if args.front == "gym":
        env = gym.make_vec(args.env_id, num_envs=n, exposed_steps=args.exposed_steps)
        run_episode = episode_gym
    else:
        env = refit_gym.make_torchrl_env(args.env_id, num_envs=n, exposed_steps=args.exposed_steps)
        run_episode = episode_torchrl
    policy = DenoiserPolicy(env.base_model, action_mode="x0", log_std_init=args.log_std)  # a trainable copy
    policy.log_std.requires_grad_(False)  # a fixed exploration std
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=args.lr)
    rng = np.random.default_rng(args.seed)
    fixed_users = np.arange(n) % env.core.n_users

    def evaluation(update: int) -> tuple[int, float]:
        with torch.no_grad():
            returns, _ = run_episode(env, policy, fixed_users, seed=12345, explore=False)
        print(f"update {update:3d}: deterministic return on fixed users {float(returns.mean()):.4f}", flush=True)
        return update, float(returns.mean())

    curve = [evaluation(0)]
    for update in range(1, args.updates + 1):
        users = rng.choice(env.core.n_users, size=args.users, replace=False)
        returns, log_prob = run_episode(env, policy, np.repeat(users, args.rollouts), seed=args.seed * 10_000 + update)
        grouped = returns.reshape(args.users, args.rollouts)
        advantage = (grouped - grouped.mean(1, keepdim=True)).reshape(-1)
        loss = -(advantage * log_prob).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if update % args.eval_every == 0 or update == args.updates:
            curve.append(evaluation(update))
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(Args):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = Args(**vars(parser.parse_args()))
    curve = train(args)
    if args.plot:
        from refit_gym.training.run_log import plot_curves

        plot_curves([{"update": u, "deterministic return": r} for u, r in curve], "update",
                    ["deterministic return"], args.plot, title=f"REINFORCE on {args.env_id} ({args.front})")


if __name__ == "__main__":
    main()
