"""The denoising chain of a frozen diffusion recommender as a batched, torch-native MDP.

:class:`DenoisingMDP` is the one implementation of the environment's dynamics; the Gymnasium,
vector, TorchRL and Stable-Baselines3 classes are thin fronts over it. It imports no gymnasium:
it works on tensors on one device and steps a whole batch of users at once, with no per-row
Python loop. It never names a base model: the model turns the *visible* part of each user's
history into the chain's start and conditioning (:meth:`~refit_gym.models.BaseModel.encode`),
and the state ``x_t`` is whatever the model diffuses (an interaction row of ``n_items``, or an
item embedding of ``d``): ``state_dim`` wide.

Randomness. Every draw comes from streams keyed by ``(episode seed, stream, step)``: a reset
draws one 63-bit *episode seed* from the caller's ``numpy.random.Generator`` (the front's
``np_random``) and nothing else, and a step draws nothing from it. Users come from
``numpy.random.default_rng(seed)``; holdout keys, initial noise, the noise of a stochastic prefix,
the transition noise and the slates' uniforms come from a torch generator on the env's device,
re-seeded for every draw. Each draw is made for the *whole* batch, ``randn(B, ceil16(state_dim))[:, :state_dim]``, and a
row takes its own row: torch's CPU normal sampler fills blocks of 16 values, so with a width
padded to a multiple of 16 row 0 of a batch of B is bit-identical to a batch of one. Hence, on
CPU, row 0 of a batched env and a single env with the same seed follow the same trajectory for
the same actions; and row ``i`` never depends on what the other rows do.

State tensors are never modified in place: every transition (and every partial reset) builds
new tensors, so observations handed out earlier stay valid.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from refit_gym.data.history import HistoryBatch, SequenceTable
from refit_gym.data.interactions import TrainingInteractions
from refit_gym.errors import ActionError, ConfigError, EpisodeStateError, RewardError
from refit_gym.evaluation.metrics import top_k_lowest_id_first
from refit_gym.models.base import BaseModel, ChainInputs, ConditionSpec
from refit_gym.rewards.base import EpisodeBatch, RewardTerm, StepShaping
from refit_gym.runtime import PRECISIONS, autocast
from refit_gym.slates import sample_slates, slate_log_prob

ACTION_MODES = ("x0", "x_prev")
HOLDOUT_MODES = ("recent", "random", "none")
DEFAULT_ACTION_BOUND = 10.0
DEFAULT_HOLDOUT_FRACTION = 0.25
DEFAULT_SLATE_TEMPERATURE = 0.02

# stream ids of the keyed random draws
_HOLDOUT, _INITIAL_NOISE, _PREFIX_NOISE, _TRANSITION_NOISE, _SLATE = range(1, 6)  # (stream 0: users, by numpy)


def padded_width(n: int) -> int:
    """``n`` rounded up to a multiple of 16 (the block size of torch's CPU normal sampler)."""
    return 16 * math.ceil(n / 16)


def stream_seed(episode_seed: int, stream: int, step: int = 0) -> int:
    """A 63-bit torch seed for draw ``(stream, step)`` of an episode (via ``numpy.random.SeedSequence``)."""
    words = np.random.SeedSequence([episode_seed, stream, step]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def held_out_counts_tensor(lengths: torch.Tensor, fraction: float, count: Optional[int] = None) -> torch.Tensor:
    """How many training items each user hides: ``round(fraction * L)`` (or ``count`` when given),
    at least 1, at most ``L - 1``.

    ``L`` is the length of the user's history. A user with one item hides nothing (the input
    would be empty), and ``fraction = 0`` (or ``count = 0``) hides nothing.
    """
    if count is not None:
        if count <= 0:
            return torch.zeros_like(lengths)
        return torch.minimum(torch.full_like(lengths, count), (lengths - 1).clamp_min(0))
    if fraction <= 0.0:
        return torch.zeros_like(lengths)
    counts = torch.floor(fraction * lengths.to(torch.float64) + 0.5).to(torch.int64)
    return torch.minimum(counts.clamp_min(1), (lengths - 1).clamp_min(0))


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_number(
    name: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if not math.isfinite(value) or too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be a finite number in {interval}, got {value!r}")
    return value


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    if not low <= int(value) <= high:
        raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def frozen_copy(model: BaseModel) -> BaseModel:
    """``model`` itself if it is already frozen (eval mode, no trainable parameter), else a frozen copy.

    The env never trains or changes the model it is given: an agent that fine-tunes the same
    network object does not change the env's prefix steps.
    """
    if not model.training and not any(p.requires_grad for p in model.parameters()):
        return model
    frozen = copy.deepcopy(model)
    frozen.eval()
    frozen.requires_grad_(False)
    return frozen


@dataclass
class StepResult:
    """What :meth:`DenoisingMDP.step` returns (tensors on the env's device unless noted).

    Attributes:
        observation: the new observation (see :meth:`DenoisingMDP.observation`).
        reward: ``(B,)`` float32; the terminal reward on rows that ended, shaping (if any) on
            every stepped row, 0 elsewhere.
        terminated: ``(B,)`` bool numpy array (host): the rows whose chain reached ``t = 0``.
        components: reward term name -> ``(B,)`` float32, valid on the ``terminated`` rows
            (0 elsewhere): the *unweighted* terms of the terminal reward, plus ``"shaping"``
            when shaping is on (valid on every stepped row).
        stepped: ``(B,)`` bool numpy array (host): the rows this call moved.
        slates: ``(B, K)`` int64, the slate drawn for each row that ended (``-1`` on the other
            rows); ``None`` when the ``slate_size`` option is off.
        slate_log_prob: ``(B,)`` float32, the exact Plackett-Luce log-probability of each ended
            row's slate under its final scores (0 on the other rows); ``None`` when off.
    """

    observation: dict[str, torch.Tensor]
    reward: torch.Tensor
    terminated: np.ndarray
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    stepped: Optional[np.ndarray] = None
    slates: Optional[torch.Tensor] = None
    slate_log_prob: Optional[torch.Tensor] = None


class DenoisingMDP:
    """A batch of ``batch_size`` denoising chains of a frozen diffusion recommender.

    One episode = one user's reverse chain. At reset the user's chronological training history
    loses its held-out positions; the base model encodes the visible rest into the chain's start
    (DiffRec: the visible row; a sequential model: noise) and conditioning, the start is
    optionally forward-noised (``noise_steps``), and the first ``T - exposed_steps`` reverse
    steps are run by the frozen base model; the agent then takes the last ``exposed_steps``
    steps. The reward is computed once, on the final state's item scores, when ``t`` reaches 0.

    Slates (option ``slate_size=K``, off by default). At the terminal step the env also draws, for
    every row that ends, a slate of ``K`` distinct items from Plackett-Luce(``softmax(s /
    slate_temperature)``) over the items not in the row's input, ``s = model.item_scores(x_0)``
    (Gumbel top-K, :func:`refit_gym.slates.sample_slates`); the reward sees it as
    ``EpisodeBatch.slates`` (the ``slate`` term scores it), and the step reports it with its exact
    log-probability (:func:`refit_gym.slates.slate_log_prob`) in ``StepResult.slates`` /
    ``slate_log_prob``. The slate is an action of the *policy* that the env samples from the
    policy's final scores, exactly as it samples the Gaussian transition noise in ``x0`` mode: the
    full policy is the Gaussian steps followed by the slate, and its log-probability is the sum of
    the steps' Gaussian log-densities and the slate's log-probability. An outside agent may (a)
    treat the slate as env noise: a Gaussian-policy gradient then stays unbiased for ``E[reward |
    x_0]``, the reward averaged over the slate; or (b) recompute ``slate_log_prob`` of the reported
    slate under its own differentiable final scores (same input mask and temperature) and add the
    slate's score-function term. The draws come from the episode's keyed streams (stream
    ``_SLATE``, the step's count), made for the whole padded batch and sliced: the same seed gives
    the same slates, and row ``i`` gets the same draw whatever the batch size or which rows step.

    Args:
        model: the base diffusion recommender (a :class:`~refit_gym.models.BaseModel`). The env
            keeps a frozen copy (or shares it when it is already frozen).
        reward: the terminal reward, a :class:`~refit_gym.rewards.base.RewardTerm` bound to the
            training interactions, typically a ``WeightedReward``, whose unweighted terms
            (``components``) are reported next to the weighted total.
        interactions: the training interactions (for the ``recent`` holdout).
        batch_size: number of chains stepped together (B).
        shaping: optional potential-based :class:`~refit_gym.rewards.base.StepShaping`, added
            on every step (off by default).
        action_mode: ``"x0"``: the action is the predicted clean vector and the env applies the
            posterior step ``q_posterior_mean(action, x_t) + transition_std * z``; ``"x_prev"``:
            the action *is* the next state (deterministic transition, DDPO-style).
        exposed_steps: k, how many of the T reverse steps the agent takes (default T).
        stochastic_prefix: run the first ``T - k`` steps with the schedule's posterior noise
            instead of the deterministic mean path (DiffRec's inference path).
        transition_std: std of the ``x0``-mode transition noise; ``None`` = the schedule's
            posterior std ``exp(0.5 * posterior_log_variance)`` at each step. The last step
            (diffusion step 0) is always noiseless, as in DDPM and DiffRec. Unused in ``x_prev``.
        holdout: which training items are hidden from the input and scored by the reward
            (``EpisodeBatch.held_out``): ``"recent"`` (each user's most recent
            ``holdout_fraction`` by ``train_sequences``), ``"random"`` (a fresh random subset of
            the same size every episode) or ``"none"``. Holding out works on positions, scoring
            on items: an item repeated in a history that is also shown at an earlier position
            stays in the input and is not scored.
        holdout_fraction: the hidden fraction, in ``[0, 1)`` (see :func:`held_out_counts_tensor`).
        holdout_count: hide exactly this many items per user instead of a fraction (at most
            ``L - 1``; the sequential scenarios hide the last training item: 1); ``None`` = use
            ``holdout_fraction``.
        noise_steps: the start vector is ``q_sample``d to this step first (0 = un-noised);
            default: the model's own (DiffRec: 0).
        action_bound: actions are validated, then clipped to ``[-action_bound, action_bound]``;
            the state ``x_t`` is kept in the same range.
        device: where every tensor lives.
        row_window: ``(offset, global_batch)``: these ``batch_size`` rows are rows
            ``offset .. offset + batch_size - 1`` of a batch of ``global_batch`` split over
            processes (data-parallel training): every random draw is made for the global batch
            and sliced, so a row's randomness does not depend on how the batch is split.
        precision: ``fp32``, or ``bf16``: the base model's hidden prefix and the reward's item
            scores run under bfloat16 autocast (states, actions and rewards stay float32).
        slate_size: ``K``, draw a slate of ``K`` items at the terminal step (above); ``None`` or 0
            = off (the default). At most ``n_items``; a reset whose user leaves fewer than ``K``
            non-input items raises.
        slate_temperature: ``tau`` of the slate's Plackett-Luce distribution (> 0; default 0.02).

    Raises:
        ConfigError: a parameter out of range (the message names it and the value), or a
            reward with a slate term (``uses_slates``) while ``slate_size`` is off.
    """

    def __init__(
        self,
        model: BaseModel,
        reward: RewardTerm,
        interactions: TrainingInteractions,
        *,
        batch_size: int = 1,
        shaping: Optional[StepShaping] = None,
        action_mode: str = "x0",
        exposed_steps: Optional[int] = None,
        stochastic_prefix: bool = False,
        transition_std: Optional[float] = None,
        holdout: str = "recent",
        holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
        holdout_count: Optional[int] = None,
        noise_steps: Optional[int] = None,
        action_bound: float = DEFAULT_ACTION_BOUND,
        device: torch.device | str = "cpu",
        row_window: Optional[tuple[int, int]] = None,
        precision: str = "fp32",
        slate_size: Optional[int] = None,
        slate_temperature: float = DEFAULT_SLATE_TEMPERATURE,
    ) -> None:
        if not isinstance(model, BaseModel):
            raise ConfigError(f"model must be a refit_gym.models.BaseModel, got {type(model).__name__}")
        if not callable(reward):
            raise ConfigError(f"reward must be a callable RewardTerm, got {type(reward).__name__}")
        if shaping is not None and not callable(shaping):
            raise ConfigError(f"shaping must be a StepShaping or None, got {type(shaping).__name__}")
        if (interactions.n_users, interactions.n_items) != (model.n_users, model.n_items):
            raise ConfigError(
                f"the model has {model.n_users} users x {model.n_items} items but the interactions "
                f"have {interactions.n_users} x {interactions.n_items}"
            )
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ConfigError(f"unknown device {device!r}: {error}") from None
        diffusion = model.diffusion
        self.steps = int(diffusion.steps)
        self.batch_size = _check_int("batch_size", batch_size, 1, 2**31 - 1)
        self.row_offset, self.global_batch = (0, self.batch_size) if row_window is None else row_window
        if not 0 <= self.row_offset <= self.global_batch - self.batch_size:
            raise ConfigError(f"row_window {row_window} does not hold a batch of {self.batch_size} rows")
        self.action_mode = _check_choice("action_mode", action_mode, ACTION_MODES)
        self.exposed_steps = self.steps if exposed_steps is None else _check_int(
            "exposed_steps", exposed_steps, 1, self.steps
        )
        if not isinstance(stochastic_prefix, (bool, np.bool_)):
            raise ConfigError(f"stochastic_prefix must be a bool, got {stochastic_prefix!r}")
        self.stochastic_prefix = bool(stochastic_prefix)
        self.holdout = _check_choice("holdout", holdout, HOLDOUT_MODES)
        self.holdout_fraction = _check_number("holdout_fraction", holdout_fraction, 0.0, 1.0, high_open=True)
        self.holdout_count = None if holdout_count is None else _check_int("holdout_count", holdout_count, 0, 2**31 - 1)
        self.noise_steps = model.noise_steps if noise_steps is None else _check_int(
            "noise_steps", noise_steps, 0, self.steps
        )
        self.action_bound = _check_number("action_bound", action_bound, 0.0, 3.0e38, low_open=True)
        self.transition_std = None if transition_std is None else _check_number(
            "transition_std", transition_std, 0.0, 3.0e38
        )
        self.precision = _check_choice("precision", precision, PRECISIONS)
        self.slate_size: Optional[int] = None if slate_size is None else (
            _check_int("slate_size", slate_size, 0, model.n_items) or None
        )
        self.slate_temperature = _check_number("slate_temperature", slate_temperature, 0.0, 3.0e38, low_open=True)
        if getattr(reward, "uses_slates", False) and self.slate_size is None:
            raise ConfigError("the reward has a slate term (e.g. `slate`), which needs the env option slate_size "
                              "(the env draws a slate of slate_size items at the terminal step); pass slate_size=K")

        frozen = frozen_copy(model)
        if frozen.device != self.device:  # never move the caller's (possibly shared) model
            frozen = (copy.deepcopy(frozen) if frozen is model else frozen).to(self.device)
        self.model = frozen
        self.reward, self.shaping = reward, shaping
        self.interactions = interactions  # what the rewards are bound to (training data only)
        self.n_users, self.n_items, self.state_dim = model.n_users, model.n_items, int(model.state_dim)
        self.width = padded_width(self.state_dim)

        # per-step tables, indexed by the diffusion step (remaining steps - 1)
        coef1 = diffusion.posterior_mean_coef1.detach().cpu()
        coef2 = diffusion.posterior_mean_coef2.detach().cpu()
        if not (torch.isfinite(coef1).all() and torch.isfinite(coef2).all()):
            raise ConfigError(
                "the model's noise schedule has non-finite posterior coefficients (noise_scale = 0?); "
                "the denoising MDP needs a Gaussian schedule"
            )
        if self.transition_std is None:
            std = torch.exp(0.5 * diffusion.posterior_log_variance_clipped.detach().cpu())
        else:
            std = torch.full((self.steps,), self.transition_std, dtype=torch.float64)
        std[0] = 0.0
        self._prefix_std = torch.exp(0.5 * diffusion.posterior_log_variance_clipped.detach().cpu())
        self._prefix_std[0] = 0.0
        self._coef1_host = coef1.tolist()
        self._coef2_host = coef2.tolist()
        self._std_host = std.tolist()
        self._coef1 = coef1.to(torch.float32).to(self.device)
        self._coef2 = coef2.to(torch.float32).to(self.device)
        self._std = std.to(torch.float32).to(self.device)

        # the users' chronological training histories, gathered per batch on the device
        self._histories = SequenceTable(interactions.train_sequences, self.n_items, self.device)

        self._generator = torch.Generator(device=self.device)
        self._noise_buffer = torch.empty(self.global_batch, self.width, device=self.device)
        self._product_buffer = torch.empty(self.batch_size, self.state_dim, device=self.device)
        self._episode_seed: Optional[int] = None
        self._step_count = 0
        self._t_host = np.zeros(self.batch_size, dtype=np.int64)
        self._users_host = np.zeros(self.batch_size, dtype=np.int64)
        self._ready = False
        self.x_t = torch.zeros(self.batch_size, self.state_dim, device=self.device)
        self.users = torch.zeros(self.batch_size, dtype=torch.int64, device=self.device)
        self.visible = torch.zeros(self.batch_size, self.n_items, device=self.device)
        self.held_out = torch.zeros(self.batch_size, self.n_items, dtype=torch.bool, device=self.device)
        # The items of the last shown positions, for reward terms that read positions (EpisodeBatch.recent_items).
        recent_width = int(getattr(reward, "recent_items_needed", 0) or 0)
        self.recent_items: Optional[torch.Tensor] = (
            torch.full((self.batch_size, recent_width), -1, dtype=torch.int64, device=self.device)
            if recent_width else None
        )
        self.context: dict[str, torch.Tensor] = {}
        self._context_spec = dict(self.model.condition_spec())

    # ------------------------------------------------------------------ description
    @property
    def base_model(self) -> BaseModel:
        """The frozen base model (copy it before fine-tuning it, e.g. ``DenoiserPolicy.from_model``)."""
        return self.model

    @property
    def t(self) -> np.ndarray:
        """Remaining steps per row (host copy, ``(B,)`` int64)."""
        return self._t_host.copy()

    @property
    def ready(self) -> bool:
        """Whether :meth:`reset` has been called (the state exists)."""
        return self._ready

    @property
    def done(self) -> np.ndarray:
        """``(B,)`` bool: rows whose chain has ended (or that were never reset)."""
        return (self._t_host == 0) | (not self._ready)

    @property
    def context_spec(self) -> dict[str, ConditionSpec]:
        """Per-row shape, dtype and bounds of each conditioning tensor of the base model."""
        return dict(self._context_spec)

    def config(self) -> dict[str, Any]:
        """The chain parameters, JSON-able, for the run record."""
        reward_config = self.reward.config() if hasattr(self.reward, "config") else type(self.reward).__name__
        return {
            "model": self.model.name,
            "state_dim": self.state_dim,
            "action_mode": self.action_mode,
            "steps": self.steps,
            "exposed_steps": self.exposed_steps,
            "stochastic_prefix": self.stochastic_prefix,
            "transition_std": self.transition_std,
            "holdout": self.holdout,
            "holdout_fraction": self.holdout_fraction,
            "holdout_count": self.holdout_count,
            "noise_steps": self.noise_steps,
            "action_bound": self.action_bound,
            "precision": self.precision,
            "slate_size": self.slate_size,
            "slate_temperature": self.slate_temperature,
            "batch_size": self.batch_size,
            "device": str(self.device),
            "reward": reward_config,
            "shaping": None if self.shaping is None else type(self.shaping).__name__,
        }

    # ------------------------------------------------------------------ random draws
    def _seeded(self, stream: int, step: int = 0) -> torch.Generator:
        return self._generator.manual_seed(stream_seed(self._episode_seed, stream, step))

    def _normal(self, stream: int, step: int = 0, std: float = 1.0) -> torch.Tensor:
        """``(B, state_dim)`` normals ``N(0, std^2)`` of draw ``(stream, step)``; row i is row i of every batch size."""
        generator = self._seeded(stream, step)
        # a scratch buffer: every caller consumes the noise at once (and never keeps it)
        noise = self._noise_buffer.normal_(0.0, std, generator=generator)
        return noise[self.row_offset : self.row_offset + self.batch_size, : self.state_dim]

    # ------------------------------------------------------------------ reset
    def reset(
        self,
        rng: np.random.Generator,
        users: Optional[Sequence[int] | np.ndarray | torch.Tensor] = None,
        mask: Optional[Sequence[bool] | np.ndarray | torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """Start new episodes on the rows in ``mask`` (default: all rows); returns the observation.

        Args:
            rng: the front's ``np_random``; exactly one integer is drawn from it (the episode seed).
            users: user ids of the reset rows (one per row of the batch, or one per masked row);
                default: drawn uniformly from ``numpy.random.default_rng(episode seed)``.
            mask: ``(B,)`` bools, the rows to reset; the other rows keep their state.

        Raises:
            ConfigError: ``users`` or ``mask`` has the wrong shape, or a user id is out of range.
        """
        rows = self._rows_from_mask(mask)
        if rows is not None and len(rows) == 0:
            return self.observation()
        if not self._ready and rows is not None:
            rows = None  # the first reset initialises every row
        n_rows = self.batch_size if rows is None else len(rows)
        self._episode_seed = int(rng.integers(0, 2**63 - 1))
        self._step_count = 0
        chosen_host = self._choose_users(users, rows, n_rows)
        chosen = torch.from_numpy(chosen_host).to(self.device)
        with torch.no_grad():
            history = self._histories.batch(chosen)
            shown = history.hide(self._hidden_positions(history, rows))
            visible = shown.item_mask()
            held_out = history.item_mask() & ~visible
            if self.slate_size is not None:
                self._check_slate_room(visible, chosen_host)
            inputs = self.model.encode(shown)
            context = inputs.condition
            x = self._initial_state(inputs, rows)
            visible = visible.to(torch.float32)
            recent = None
            if self.recent_items is not None:
                recent = shown.recent(self.recent_items.shape[1])
                recent = recent.masked_fill(recent == shown.pad, -1)
        if rows is None:
            self.x_t, self.users, self.visible, self.held_out = x, chosen, visible, held_out
            self.recent_items = recent
            self.context = dict(context)
            self._users_host = chosen_host.copy()
            self._t_host = np.full(self.batch_size, self.exposed_steps, dtype=np.int64)
        else:
            index = torch.from_numpy(rows).to(self.device)
            self.x_t = self.x_t.index_put((index,), x)
            self.users = self.users.index_put((index,), chosen)
            self.visible = self.visible.index_put((index,), visible)
            self.held_out = self.held_out.index_put((index,), held_out)
            if recent is not None:
                self.recent_items = self.recent_items.index_put((index,), recent)
            self.context = {name: self.context[name].index_put((index,), value) for name, value in context.items()}
            users_host, t_host = self._users_host.copy(), self._t_host.copy()
            users_host[rows], t_host[rows] = chosen_host, self.exposed_steps
            self._users_host, self._t_host = users_host, t_host
        self._ready = True
        return self.observation()

    def _check_slate_room(self, visible: torch.Tensor, users: np.ndarray) -> None:
        """Raise when a row leaves fewer than ``slate_size`` items outside its input (nothing changed yet)."""
        room = self.n_items - visible.sum(1)
        short = room < self.slate_size
        if bool(short.any()):
            row = int(torch.nonzero(short)[0, 0])
            raise ConfigError(f"slate_size {self.slate_size} exceeds the {int(room[row])} items user {int(users[row])} "
                              "may recommend (items not in the input); lower slate_size")

    def _rows_from_mask(self, mask) -> Optional[np.ndarray]:
        if mask is None:
            return None
        if isinstance(mask, torch.Tensor):
            mask = mask.detach().cpu().numpy()
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.reshape(-1).shape != (self.batch_size,):
            raise ConfigError(
                f"reset mask must be {self.batch_size} bools, got a {mask.dtype} array of shape {mask.shape}"
            )
        mask = mask.reshape(-1)
        return None if mask.all() else np.flatnonzero(mask)

    def _choose_users(self, users, rows: Optional[np.ndarray], n_rows: int) -> np.ndarray:
        if users is None:
            drawn = np.random.default_rng(self._episode_seed).integers(0, self.n_users, size=self.global_batch)
            drawn = drawn[self.row_offset : self.row_offset + self.batch_size]
            return drawn if rows is None else drawn[rows]
        if isinstance(users, torch.Tensor):
            users = users.detach().cpu().numpy()
        users = np.asarray(users)
        if users.ndim == 0:
            users = users.reshape(1)
        users = users.reshape(-1)
        if users.dtype.kind not in "iu":
            raise ConfigError(f"users must be integer ids, got dtype {users.dtype}")
        if rows is not None and len(users) == self.batch_size:
            users = users[rows]
        if len(users) != n_rows:
            raise ConfigError(f"expected {n_rows} user ids (one per reset row), got {len(users)}")
        if len(users) and (users.min() < 0 or users.max() >= self.n_users):
            raise ConfigError(f"user ids must be in [0, {self.n_users - 1}], got {users.min()}..{users.max()}")
        return users.astype(np.int64)

    def _select(self, full: torch.Tensor, rows: Optional[np.ndarray]) -> torch.Tensor:
        return full if rows is None else full[torch.from_numpy(rows).to(full.device)]

    def _hidden_positions(self, history: HistoryBatch, rows: Optional[np.ndarray]) -> torch.Tensor:
        """``(B, L)`` bool: the positions of the users' histories hidden from the input this episode.

        ``recent``: the last :func:`held_out_counts` positions of each history. ``random``: every
        position of the ``held_out_counts(n distinct items)`` items with the smallest uniform keys;
        the keys are drawn in item space, ``(B, ceil16(n_items))`` for the whole batch, so a row's
        choice does not depend on the batch around it.
        """
        if self.holdout == "none":
            return torch.zeros_like(history.visible)
        if self.holdout == "recent":
            lengths = history.lengths()
            first_hidden = lengths - held_out_counts_tensor(lengths, self.holdout_fraction, self.holdout_count)
            return history.visible & (history.visible_rank() >= first_hidden.unsqueeze(1))
        generator = self._seeded(_HOLDOUT)
        width = padded_width(self.n_items)
        keys = torch.rand(self.global_batch, width, generator=generator, device=self.device)
        keys = keys[self.row_offset : self.row_offset + self.batch_size, : self.n_items]
        keys = self._select(keys, rows)
        items = history.item_mask()
        keys = torch.where(items, keys, torch.full_like(keys, 2.0))
        order = keys.argsort(dim=1)
        ranks = torch.empty_like(order).scatter_(
            1, order, torch.arange(self.n_items, device=self.device).expand_as(order).contiguous()
        )
        counts = held_out_counts_tensor(items.sum(1), self.holdout_fraction, self.holdout_count)
        hidden_items = torch.cat([ranks < counts.unsqueeze(1), torch.zeros_like(items[:, :1])], dim=1)
        return history.visible & hidden_items.gather(1, history.items)

    def _initial_state(self, inputs: ChainInputs, rows: Optional[np.ndarray]) -> torch.Tensor:
        """The chain's start (the model's clean start forward-noised to ``noise_steps``, or pure
        noise for a model that starts from noise), run through the hidden prefix."""
        context = inputs.condition
        needs_noise = inputs.start is None or self.noise_steps > 0
        noise = self._select(self._normal(_INITIAL_NOISE), rows) if needs_noise else None
        x = self.model.start_state(inputs, noise, self.noise_steps)
        with autocast(self.precision, self.device):
            denoise = self.model.chain_denoiser(**context)  # the frozen model: its condition encoded once
            for t in range(self.steps - 1, self.exposed_steps - 1, -1):
                x = self.model.diffusion.p_mean_variance(denoise, x, t)["mean"]
                if self.stochastic_prefix and self._prefix_std[t] > 0:
                    x = x.float() + float(self._prefix_std[t]) * self._select(self._normal(_PREFIX_NOISE, t), rows)
        return x.to(torch.float32).clamp(-self.action_bound, self.action_bound)

    # ------------------------------------------------------------------ observation
    def observation(self) -> dict[str, torch.Tensor]:
        """``x_t`` ``(B, state_dim)`` float32, ``t`` ``(B, 1)`` int64 (remaining steps), ``user`` ``(B, 1)``
        int64, and the base model's conditioning tensors.

        The tensors are the env's own (never modified in place later); copy before mutating them.
        """
        if not self._ready:
            raise EpisodeStateError("the environment has not been reset yet; call reset() first")
        return {
            "x_t": self.x_t,
            "t": torch.from_numpy(self._t_host.copy()).to(self.device).unsqueeze(1),
            "user": self.users.unsqueeze(1),
            **self.context,
        }

    def episode(self, rows: Optional[np.ndarray] = None) -> EpisodeBatch:
        """What the reward knows about the rows' episodes (all rows by default)."""
        return EpisodeBatch(
            users=self._select(self.users, rows),
            visible=self._select(self.visible, rows),
            held_out=self._select(self.held_out, rows),
            recent_items=None if self.recent_items is None else self._select(self.recent_items, rows),
        )

    # ------------------------------------------------------------------ step
    def validate_action(self, action: Any, batch_shape: Optional[tuple[int, ...]] = None) -> torch.Tensor:
        """The action as a float32 ``(B, state_dim)`` tensor on the device, clipped to the bound.

        Accepts a torch tensor or anything ``numpy.asarray`` takes. Floating dtypes other than
        float32 (float64, float16, bfloat16) are cast to float32.

        Raises:
            ActionError: wrong shape, a non-floating dtype, or a NaN / inf entry.
        """
        expected = (self.batch_size, self.state_dim) if batch_shape is None else (*batch_shape, self.state_dim)
        if isinstance(action, torch.Tensor):
            tensor = action.detach()
            if not tensor.is_floating_point():
                raise ActionError(f"the action must be a floating-point array, got dtype {tensor.dtype}")
        else:
            try:
                array = np.asarray(action)
            except (TypeError, ValueError) as error:
                raise ActionError(f"the action could not be read as an array: {error}") from None
            if array.dtype.kind != "f":
                raise ActionError(f"the action must be a floating-point array, got dtype {array.dtype}")
            if not (array.flags.c_contiguous and array.flags.writeable and array.dtype.isnative):
                array = np.array(array, dtype=array.dtype.newbyteorder("="), order="C")
            tensor = torch.from_numpy(array)
        if tuple(tensor.shape) != expected:
            raise ActionError(f"the action must have shape {expected}, got {tuple(tensor.shape)}")
        tensor = tensor.to(device=self.device, dtype=torch.float32).reshape(self.batch_size, self.state_dim)
        # one cheap reduction: NaN / inf make the sum non-finite; only then look closer (a finite
        # sum can also overflow, so the exact check decides)
        if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
            bad_rows = np.flatnonzero(~torch.isfinite(tensor).all(dim=1).cpu().numpy())
            raise ActionError(
                f"the action holds NaN or inf in {len(bad_rows)} row(s) (first: row {bad_rows[0]}); "
                "the state was not changed"
            )
        return tensor.clamp(-self.action_bound, self.action_bound)

    def step(
        self, action: Any, active: Optional[np.ndarray] = None, batch_shape: Optional[tuple[int, ...]] = None
    ) -> StepResult:
        """Advance the rows in ``active`` (default all) by one reverse step with ``action``.

        Args:
            action: ``(B, state_dim)`` floats (every row's, also those not stepped).
            active: ``(B,)`` bools; rows not active keep their state and get reward 0.
            batch_shape: the leading dims the action must have instead of ``(B,)`` (``()`` for
                an unbatched single-row action).

        Raises:
            ActionError: a bad action (nothing is changed).
            EpisodeStateError: an active row has already ended (reset it first) or the env was
                never reset.
        """
        if not self._ready:
            raise EpisodeStateError("the environment has not been reset yet; call reset() first")
        rows = None
        if active is not None:
            active = np.asarray(active)
            if active.dtype != np.bool_ or active.shape != (self.batch_size,):
                raise ConfigError(f"active must be {self.batch_size} bools, got {active.dtype} {active.shape}")
            if not active.all():
                rows = np.flatnonzero(active)
        finished = self._t_host == 0 if rows is None else np.zeros(self.batch_size, dtype=bool)
        if rows is not None:
            finished[rows] = self._t_host[rows] == 0
        if finished.any():
            raise EpisodeStateError(
                f"{int(finished.sum())} row(s) of the batch (first: row {np.flatnonzero(finished)[0]}) have "
                "already reached t = 0; reset them before stepping (reset(options={'reset_mask': ...}))"
            )
        action = self.validate_action(action, batch_shape)
        stepped = np.ones(self.batch_size, dtype=bool) if rows is None else active
        slates, slate_lp = self.empty_slates()
        if rows is not None and len(rows) == 0:
            zero = torch.zeros(self.batch_size, device=self.device)
            return StepResult(self.observation(), zero, np.zeros(self.batch_size, dtype=bool), {}, stepped,
                              slates, slate_lp)

        t_rows = self._t_host if rows is None else self._t_host[rows]
        x_rows = self._select(self.x_t, rows)
        a_rows = self._select(action, rows)
        with torch.no_grad():
            x_next = self._transition(x_rows, a_rows, t_rows - 1, rows)
        t_next_rows = t_rows - 1
        terminal_rows_local = np.flatnonzero(t_next_rows == 0)

        reward = torch.zeros(self.batch_size, device=self.device)
        components: dict[str, torch.Tensor] = {}
        if len(terminal_rows_local):
            term_rows = terminal_rows_local if rows is None else rows[terminal_rows_local]
            all_rows = len(term_rows) == self.batch_size
            if all_rows and rows is None:
                x_terminal = x_next
            else:
                x_terminal = x_next[torch.from_numpy(terminal_rows_local).to(self.device)]
            terms, total, drawn, drawn_lp = self._terminal_reward(x_terminal, None if all_rows else term_rows)
            index = torch.from_numpy(term_rows).to(self.device)
            reward = reward.index_put((index,), total.to(torch.float32))
            if drawn is not None:
                slates = slates.index_put((index,), drawn)
                slate_lp = slate_lp.index_put((index,), drawn_lp.to(torch.float32))
            for name, value in terms.items():
                components[name] = torch.zeros(self.batch_size, device=self.device).index_put(
                    (index,), value.detach().to(torch.float32)
                )
        if self.shaping is not None:
            with torch.no_grad():
                t_dev = torch.from_numpy(t_rows).to(self.device).unsqueeze(1)
                shaped = self.shaping(x_rows, t_dev, x_next, t_dev - 1, self.episode(rows)).to(torch.float32)
            shaping_full = shaped if rows is None else torch.zeros(self.batch_size, device=self.device).index_put(
                (torch.from_numpy(rows).to(self.device),), shaped
            )
            reward = reward + shaping_full
            components["shaping"] = shaping_full

        # commit (nothing above modified the state)
        if rows is None:
            self.x_t = x_next
            self._t_host = t_next_rows.copy()
        else:
            self.x_t = self.x_t.index_put((torch.from_numpy(rows).to(self.device),), x_next)
            t_host = self._t_host.copy()
            t_host[rows] = t_next_rows
            self._t_host = t_host
        self._step_count += 1
        terminated = np.zeros(self.batch_size, dtype=bool)
        terminated[terminal_rows_local if rows is None else rows[terminal_rows_local]] = True
        return StepResult(self.observation(), reward, terminated, components, stepped, slates, slate_lp)

    def empty_slates(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(B, K)`` -1 slates and ``(B,)`` zero log-probabilities (``None, None`` when slates are off)."""
        if self.slate_size is None:
            return None, None
        return (torch.full((self.batch_size, self.slate_size), -1, dtype=torch.int64, device=self.device),
                torch.zeros(self.batch_size, device=self.device))

    def _slate_uniforms(self, rows: Optional[np.ndarray]) -> torch.Tensor:
        """``(B, n_items)`` Uniform(0, 1) draws of this step's slates, drawn as ``(global B, ceil16(n_items))``
        and sliced, so a row's draw does not depend on the batch around it or on which rows step."""
        generator = self._seeded(_SLATE, self._step_count)
        uniform = torch.rand(self.global_batch, padded_width(self.n_items), generator=generator, device=self.device)
        return self._select(uniform[self.row_offset : self.row_offset + self.batch_size, : self.n_items], rows)

    def _transition(
        self, x: torch.Tensor, action: torch.Tensor, diffusion_t: np.ndarray, rows: Optional[np.ndarray]
    ) -> torch.Tensor:
        """The next state of the stepped rows (diffusion step ``diffusion_t`` per row)."""
        if self.action_mode == "x_prev":
            return action
        # `action` is the env's own clipped copy, so it is updated in place (fewer large
        # allocations); plain multiplies and adds only (no fused multiply-add), so a row's result
        # does not depend on where it sits in the batch.
        uniform = bool((diffusion_t == diffusion_t[0]).all())
        if uniform:
            t = int(diffusion_t[0])
            coef1, coef2, std = self._coef1_host[t], self._coef2_host[t], self._std_host[t]
        else:
            index = torch.from_numpy(diffusion_t).to(self.device)
            coef1, coef2 = self._coef1[index].unsqueeze(1), self._coef2[index].unsqueeze(1)
            std = self._std[index].unsqueeze(1)
        product = torch.mul(x, coef2, out=self._product_buffer) if rows is None else x * coef2
        mean = action.mul_(coef1).add_(product)
        if uniform and std > 0.0:
            mean.add_(self._select(self._normal(_TRANSITION_NOISE, self._step_count, std), rows))
        elif not uniform and bool((std > 0).any()):
            noise = self._select(self._normal(_TRANSITION_NOISE, self._step_count), rows)
            mean.add_(noise.mul_(std))  # the noise tensor is the env's own
        return mean.clamp_(-self.action_bound, self.action_bound)

    def _terminal_reward(
        self, x0: torch.Tensor, rows: Optional[np.ndarray]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Per-term values, the total reward, and (slates on) the slates and their log-probabilities
        of the rows that just ended."""
        episode = self.episode(rows)
        slate_lp = None
        with torch.no_grad():
            with autocast(self.precision, self.device):
                scores = self.model.item_scores(x0).float()
            if self.slate_size is not None:
                episode.slates = sample_slates(scores, episode.visible, self.slate_size, self.slate_temperature,
                                               uniform=self._slate_uniforms(rows))
                slate_lp = slate_log_prob(scores, episode.visible, episode.slates, self.slate_temperature)
            if hasattr(self.reward, "components") and hasattr(self.reward, "total"):
                terms = dict(self.reward.components(scores, episode))
                total = self.reward.total(terms, episode.batch_size)
            else:
                total = self.reward(scores, episode)
                terms = {getattr(self.reward, "name", "reward"): total}
        if not bool(torch.isfinite(total).all()):  # a reward term's bug must not reach an agent as NaN
            name, values = next(((n, v) for n, v in terms.items() if not bool(torch.isfinite(v).all())),
                                ("total", total))
            row = int(torch.nonzero(~torch.isfinite(values))[0, 0])
            raise RewardError(f"the reward term {name!r} is {float(values[row])} for user {int(episode.users[row])}; "
                              "the state was not changed (check the reward term: it must be finite)")
        return terms, total.to(self.device), episode.slates, slate_lp

    # ------------------------------------------------------------------ rendering
    def top_items(
        self, k: int = 10, rows: Optional[np.ndarray] = None, exclude_input: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, item ids)`` of the top-k current item scores of ``rows`` (all by default).

        With ``exclude_input`` the items given in the input are left out, as a recommendation
        list would. Equal scores rank the lower item id first, as in the evaluation.
        """
        with torch.no_grad():
            scores = self.model.item_scores(self._select(self.x_t, rows))
            if exclude_input:
                scores = scores.masked_fill(self._select(self.visible, rows) > 0, float("-inf"))
        return torch.return_types.topk(top_k_lowest_id_first(scores, min(k, self.n_items)))  # .values, .indices
