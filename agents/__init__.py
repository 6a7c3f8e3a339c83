"""Policy-gradient fine-tuning agents for refit-gym, behind one interface (:class:`agents.base.Agent`).

Swap the algorithm with one config key (``finetune.agent``) or one line::

    from agents import build_agent
    agent = build_agent("reinforce", policy, core, reference_model, config)

``AGENTS`` maps names to classes; the TorchRL and Stable-Baselines3 agents import their
libraries only when built.
"""

from __future__ import annotations

import importlib
from typing import Any

from refit_gym.errors import ConfigError

AGENTS: dict[str, str] = {
    "refit": "agents.refit:RefitAgent",
    "supervised": "agents.supervised:SupervisedAgent",
    "reinforce": "agents.reinforce:ReinforceAgent",
    "ppo": "agents.ppo:PPOAgent",
    "torchrl-ppo": "agents.torchrl_ppo:TorchRLPPOAgent",
    "sb3-ppo": "agents.sb3_ppo:SB3PPOAgent",
    "slate-rloo": "agents.slate:SlateRLOOAgent",
    "slate-grpo": "agents.slate:SlateGRPOAgent",
    "slate-plrank": "agents.slate:SlatePLRankAgent",
}


def agent_class(name: str) -> type:
    """The agent class registered under ``name``."""
    if name not in AGENTS:
        raise ConfigError(f"unknown agent {name!r}; available: {sorted(AGENTS)}")
    module, _, attribute = AGENTS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def build_agent(name: str, policy: Any, core: Any, reference: Any, config: Any, **options: Any):
    """Build agent ``name`` over ``policy`` (trainable), ``core`` (the env) and the frozen ``reference``
    (``options``: the agent's keyword arguments, e.g. ``pretraining_reweight``)."""
    return agent_class(name)(policy, core, reference, config, **options)


__all__ = ["AGENTS", "agent_class", "build_agent"]
