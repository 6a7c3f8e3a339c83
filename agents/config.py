"""Fine-tuning configuration: one documented dataclass, read from the ``finetune`` section of a config.

Every agent reads the fields it uses and ignores the rest, so switching the algorithm is one key
(``finetune.agent``) or one CLI flag (``--agent``). See ``docs/finetuning.md`` for why the
defaults are what they are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from refit_gym.config import check_field_type
from refit_gym.errors import ConfigError
from refit_gym.rewards.registry import normalize_reward_spec
from refit_gym.slates import SLATE_REWARDS


@dataclass
class FinetuneConfig:
    agent: str = "refit"
    """Algorithm: ``refit``, ``supervised``, ``reinforce``, ``ppo``, ``torchrl-ppo``, ``sb3-ppo``,
    ``slate-rloo``, ``slate-grpo``, ``slate-plrank``."""

    # --- the denoising MDP the agent fine-tunes in ------------------------------------------
    action_mode: str = "x_prev"
    """``x_prev`` (action = next state, exact per-step Gaussian log-probs) or ``x0``."""
    exposed_steps: int = 0
    """The last k reverse steps are the policy's, the earlier ones run by the frozen base model;
    0 = all T steps (the default: the policy then sees its own states, as in evaluation)."""
    holdout: str = "recent"
    """Training items hidden from the input and scored by the rewards: ``recent`` (each user's
    most recent fraction; points at the future items valid/test hold), ``random`` or ``none``."""
    holdout_fraction: float = 0.25
    """Fraction of each user's training items hidden."""
    holdout_count: Optional[int] = None
    """Hide exactly this many of each user's training items instead of a fraction (the
    sequential scenarios hide the last one); None = ``holdout_fraction``."""
    reward: dict[str, Any] = field(default_factory=lambda: {"collaborative": {"weight": 1.0, "k": 20, "temperature": 0.1}})
    """Reward terms optimised by policy gradient (see ``refit_gym.rewards.build_reward``)."""

    # --- the ReFiT objective -------------------------------------------------------------------
    likelihood_weight: float = 1.0
    """Weight of the exact log-likelihood of the held-out items under softmax(x0 / temperature)
    (``refit`` and ``supervised``); 0 turns it off."""
    likelihood_temperature: float = 0.1
    """Temperature tau of the categorical last step softmax(x0 / tau)."""
    likelihood_mask_visible: bool = True
    """The likelihood term's softmax excludes the visible (input) items; ``false`` lets them compete,
    like the sequential protocol's default evaluation, which ranks the history too."""
    pg_weight: float = 1.0
    """Weight of the policy-gradient term for the ``reward`` terms (``refit``); 0 turns it off."""
    anchor: str = "l2"
    """Anchor to the pretrained model: ``l2`` (weights), ``kl`` (policy means) or ``none``."""
    anchor_weight: float = 1.0e-3
    """Weight of the anchor term."""
    pretrain_loss_weight: float = 0.0
    """Weight of the base model's own pretraining loss on a fresh batch of its training data, added to
    each update (``refit`` and ``supervised``; InstructGPT's "PPO-ptx" pretraining mix,
    ``agents/pretraining_mix.py``); 0 = off (the default: the paper's abstract names no such term)."""
    pretrain_batch_size: int = 0
    """Training examples (the model's own ``training_batches`` unit: a user, or a user's window) in
    that batch; 0 = ``users_per_batch``."""

    categorical_samples: int = 0
    """``reinforce``: items sampled per rollout from a categorical last step softmax(x0 / tau)
    (0 = off; the Gaussian steps alone carry the gradient)."""
    categorical_reward: str = "importance"
    """``reinforce``: reward of a sampled item: ``importance`` (1[held out] / (p |H|), whose
    expected gradient is the exact log-likelihood's) or ``hit`` (1[held out])."""

    # --- slate agents (slate-rloo, slate-grpo, slate-plrank; agents/slate.py) ----------------------
    slate_size: int = 20
    """K: items per slate, drawn without replacement from Plackett-Luce(softmax(scores / slate_temperature))."""
    slate_temperature: float = 0.1
    """tau of the slate policy (the likelihood term's default temperature)."""
    slate_reward: str = "ndcg"
    """Black-box reward of a slate: ``ndcg``, ``recall`` or ``hits`` of the hidden items, or
    ``collaborative`` (the share of the user's collaborative target the slate covers)."""
    slate_collaborative_k: int = 20
    """Neighbours per user of the ``collaborative`` slate reward."""
    slate_chain: str = "deterministic"
    """``deterministic`` (one chain per user along the policy's mean; only the slates are sampled,
    ``rollouts_per_user`` of them per user) or ``stochastic`` (``rollouts_per_user`` chains per user
    whose last ``trained_steps`` Gaussian steps explore; their log-probs join the slate's)."""

    # --- policy and exploration ----------------------------------------------------------------
    log_std_init: float = -4.0
    """Initial exploration log-std of the Gaussian steps (DiffRec ML-1M's own is about -7)."""
    std_mode: str = "fixed"
    """``fixed``, ``learned`` (a trainable log-std) or ``scheduled`` (linear to ``log_std_final``)."""
    log_std_final: float = -5.0
    """Final log-std of the ``scheduled`` mode."""
    log_prob_reduction: str = "mean"
    """Per-step log-prob reduction over item dims: ``sum`` (the exact log-likelihood of the step)
    or ``mean`` (DDPO's). Default ``mean``: with ``sum`` over 2,810 ML-1M items the policy-gradient
    term's gradient is ~300x the likelihood term's and, after clipping, drowns it (measured: the
    held-out log-likelihood did not move in 45 updates)."""
    trained_steps: int = 4
    """Exploration and policy-gradient terms on the last this-many exposed steps (0 = all); the
    earlier exposed steps follow the policy's deterministic mean (DiffRec's evaluation path)."""

    # --- optimisation --------------------------------------------------------------------------
    lr: float = 1.0e-4
    """Adam learning rate."""
    weight_decay: float = 0.0
    """Adam(W) weight decay."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping (0 = off)."""
    term_gradients: str = "off"
    """``off`` (one backward of the total loss), ``log`` (each term's gradient separately: their
    norms and pairwise cosines are logged, the update is unchanged) or ``normalize`` (each term's
    gradient is scaled to norm 1 before weighting, so the weights mean what they say)."""
    gradient_signal_every: int = 0
    """Every this many updates, measure the agent's gradient estimate on the update's users before
    it steps (``agents.gradient_signal``): the cosine of two independent estimates, the cosine to
    the exact held-out log-likelihood gradient and the norm, logged as ``gradient_signal/*``; the
    training is unchanged (own seeded draws). 0 = off."""
    users_per_batch: int = 128
    """Users per update."""
    rollouts_per_user: int = 4
    """K rollouts per user (the group of the per-user baseline)."""
    inner_epochs: int = 4
    """``ppo``: passes over each batch of rollouts."""
    clip_range: float = 0.2
    """``ppo`` / ``torchrl-ppo``: clip range of the importance ratio."""
    advantage_clip: float = 5.0
    """Normalised advantages are clipped to +- this."""
    shuffle_rewards_within_user: bool = False
    """A placebo control of the policy-gradient term: before the advantages are computed, each
    user's K rollouts have their rewards permuted among them (a fresh permutation each update, from
    the agent's generator), so the term keeps its magnitude and noise but its expected signal is
    zero while no advantage is clipped (each user's mean reward, the baseline and the logged
    rewards are unchanged). ``refit``, ``reinforce`` (its Gaussian steps; not with
    ``categorical_samples``) and ``ppo``; needs ``rollouts_per_user`` >= 2 and ``pg_weight`` > 0."""

    precision: str = "fp32"
    """``fp32`` or ``bf16``: autocast of the updates' matrix products (rollouts and losses); the
    env's states, rewards and the optimiser stay float32."""

    # --- the run -------------------------------------------------------------------------------
    max_updates: int = 2000
    """Hard cap on updates."""
    time_budget_s: Optional[float] = 900.0
    """Wall-clock budget of the fine-tuning loop (evaluations included); None = no budget."""
    eval_every: int = 25
    """Validate (deterministic protocol, valid Recall@20) every this many updates."""
    patience: int = 8
    """Stop after this many evaluations without a new best validation score."""
    select_metric: str = "recall@20"
    """Validation metric that selects the checkpoint."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "action_mode": ("x_prev", "x0"),
    "holdout": ("recent", "random", "none"),
    "anchor": ("l2", "kl", "none"),
    "std_mode": ("fixed", "learned", "scheduled"),
    "log_prob_reduction": ("sum", "mean"),
    "categorical_reward": ("importance", "hit"),
    "precision": ("fp32", "bf16"),
    "term_gradients": ("off", "log", "normalize"),
    "slate_reward": SLATE_REWARDS,
    "slate_chain": ("deterministic", "stochastic"),
}


def finetune_config(values: Optional[dict[str, Any]] = None, **overrides: Any) -> FinetuneConfig:
    """A validated :class:`FinetuneConfig` from a mapping (the config's ``finetune`` section)."""
    merged = {**(values or {}), **overrides}
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in config section 'finetune'; known: {sorted(known)}")
    fields = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    for name, value in merged.items():
        check_field_type(f"finetune.{name}", fields[name], value)
    config = FinetuneConfig(**merged)
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            raise ConfigError(f"finetune.{name} must be one of {choices}, got {getattr(config, name)!r}")
    positive = ("lr", "likelihood_temperature", "users_per_batch", "rollouts_per_user", "inner_epochs",
                "max_updates", "eval_every", "patience", "slate_size", "slate_temperature", "slate_collaborative_k")
    for name in positive:
        if not getattr(config, name) > 0:
            raise ConfigError(f"finetune.{name} must be > 0, got {getattr(config, name)!r}")
    for name in ("likelihood_weight", "pg_weight", "anchor_weight", "pretrain_loss_weight", "pretrain_batch_size",
                 "weight_decay", "max_grad_norm", "trained_steps",
                 "exposed_steps", "categorical_samples", "gradient_signal_every"):
        if getattr(config, name) < 0:
            raise ConfigError(f"finetune.{name} must be >= 0, got {getattr(config, name)!r}")
    if config.holdout_count is not None and config.holdout_count < 0:
        raise ConfigError(f"finetune.holdout_count must be >= 0 or null, got {config.holdout_count}")
    if not 0 <= config.holdout_fraction < 1:
        raise ConfigError(f"finetune.holdout_fraction must be in [0, 1), got {config.holdout_fraction}")
    if isinstance(config.reward, (str, dict)):  # an instance (Python use) is checked when it binds
        try:
            normalize_reward_spec(config.reward)  # a misspelt term fails here, not after pretraining
        except ConfigError as error:
            raise ConfigError(f"finetune.reward: {error}") from None
    return config
