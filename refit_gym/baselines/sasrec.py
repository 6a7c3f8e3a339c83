"""SASRec (Kang and McAuley, ICDM 2018) trained with cross-entropy over all items: the sequential baseline.

The model is :class:`~refit_gym.models.sequence_encoder.CausalSequenceEncoder` (item and position
embeddings, causal self-attention blocks) with a **tied** output layer: the score of item ``i``
after a window is ``h_last · e_i``, the newest position's encoding times item ``i``'s input
embedding, for all ``n_items`` items.

Training, as in the CE variants of SASRec (e.g. Klenitskiy and Vasilev, RecSys 2023) rather than
the original's one sampled negative: a user's window of ``max_len + 1`` training items gives
``max_len`` (input, next item) pairs (:func:`~refit_gym.models.sequence_encoder.next_item_windows`);
one causal pass encodes every prefix, and the loss is the mean over the batch's non-padding
positions of the full softmax cross-entropy of the next item::

    loss = mean_{(u, j): target_uj != pad}  -log softmax(H_u[j] · Eᵀ)[target_uj]

The window is each user's most recent ``max_len + 1`` training items (``window="recent"``), or a
random contiguous window of that length, drawn afresh every epoch (``window="random"``, which
lets long histories such as ML-1M's contribute all their items). Only ``data.train_sequences``
is read for training; the validation split selects the epoch (early stopping on ``metric``
under the evaluation ``protocol``, by default the sequential one) and the best weights are kept.
The test split is never read by :meth:`SASRecRecommender.fit`.
"""

from __future__ import annotations

import copy
import itertools
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from refit_gym.data.history import HistoryBatch
from refit_gym.data.interactions import InteractionData, UserSequences
from refit_gym.errors import ConfigError, DataError, NotFittedError, TrainingError
from refit_gym.evaluation.metrics import PROTOCOLS, is_positive_int, metric_names
from refit_gym.models.sequence_encoder import CausalSequenceEncoder, next_item_windows, trim_padding

WINDOWS = ("recent", "random")


@dataclass(frozen=True)
class SASRecConfig:
    """The hyper-parameters of :class:`SASRecRecommender` (validated on construction)."""

    hidden: int = 64
    """Embedding and model width (the item embeddings are shared with the output layer)."""
    n_blocks: int = 2
    """Self-attention blocks."""
    n_heads: int = 2
    """Attention heads (must divide ``hidden``)."""
    max_len: int = 50
    """Longest input window; a training window holds ``max_len + 1`` items (``max_len`` targets)."""
    dropout: float = 0.2
    """Dropout inside the blocks (attention and feed-forward)."""
    embedding_dropout: float = 0.2
    """Dropout on the summed item and position embeddings."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    batch_size: int = 128
    """Users (windows) per update."""
    max_epochs: int = 200
    """Most passes over the users."""
    eval_every: int = 1
    """Validate every this many epochs (and after the last one)."""
    patience: int = 5
    """Stop after this many validations in a row without a better ``metric``."""
    window: str = "recent"
    """``recent``: each user's last ``max_len + 1`` training items; ``random``: a random contiguous
    window of that length per user, drawn every epoch."""
    metric: str = "ndcg@10"
    """Validation metric that selects the epoch (a metric of ``protocol``)."""
    protocol: str = "sequential"
    """Evaluation protocol of the validation (``sequential``: leave-one-out, hr / ndcg; ``cf``)."""
    mask_history: Optional[bool] = None
    """Exclude the history from the validation ranking; default: the protocol's (False for sequential)."""
    eval_batch_size: int = 1024
    """Users per scoring call during validation."""
    time_budget_s: Optional[float] = None
    """Stop (keeping the best weights) once training has run this many seconds."""
    seed: int = 0
    """Seed of the initialisation, the user order, the random windows and dropout."""
    device: str = "cpu"
    """Where the model trains and scores."""
    threads: Optional[int] = None
    """``torch.set_num_threads`` while fitting and scoring (restored afterwards); ``None``: unchanged."""

    def __post_init__(self) -> None:
        for name in ("hidden", "n_heads", "max_len", "batch_size", "max_epochs", "eval_every", "patience",
                     "eval_batch_size"):
            _check_positive_int(name, getattr(self, name))
        if not isinstance(self.n_blocks, (int, np.integer)) or isinstance(self.n_blocks, bool) or self.n_blocks < 0:
            raise ConfigError(f"SASRec n_blocks must be a non-negative int, got {self.n_blocks!r}")
        if self.hidden % self.n_heads:
            raise ConfigError(f"SASRec hidden ({self.hidden}) must be divisible by n_heads ({self.n_heads})")
        for name in ("dropout", "embedding_dropout"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ConfigError(f"SASRec {name} must be a number in [0, 1), got {value!r}")
        if not _is_number(self.lr) or not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"SASRec lr must be a finite number > 0, got {self.lr!r}")
        if not _is_number(self.weight_decay) or not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"SASRec weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.window not in WINDOWS:
            raise ConfigError(f"SASRec window must be one of {WINDOWS}, got {self.window!r}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"SASRec protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.mask_history is not None and not isinstance(self.mask_history, bool):
            raise ConfigError(f"SASRec mask_history must be True, False or None, got {self.mask_history!r}")
        validation_ks(self.metric, self.protocol)
        if self.time_budget_s is not None and (not _is_number(self.time_budget_s) or not self.time_budget_s > 0):
            raise ConfigError(f"SASRec time_budget_s must be a number > 0 or None, got {self.time_budget_s!r}")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool):
            raise ConfigError(f"SASRec seed must be an int, got {self.seed!r}")
        if self.threads is not None:
            _check_positive_int("threads", self.threads)
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ConfigError(f"SASRec device {self.device!r} is not a torch device") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_positive_int(name: str, value: Any) -> None:
    if not is_positive_int(value):
        raise ConfigError(f"SASRec {name} must be a positive int, got {value!r}")


def validation_ks(metric: str, protocol: str) -> tuple[int]:
    """The cut-off of ``metric`` (e.g. ``"ndcg@10"`` -> ``(10,)``); ``ConfigError`` unless ``protocol`` reports it."""
    _, _, cutoff = str(metric).partition("@")
    if not cutoff.isdigit() or int(cutoff) < 1 or metric not in metric_names((int(cutoff),), protocol):
        raise ConfigError(f"SASRec metric {metric!r} is not a metric of the {protocol!r} protocol "
                          f"(e.g. {', '.join(metric_names((10,), protocol))})")
    return (int(cutoff),)


def training_windows(sequences: UserSequences, users: np.ndarray, length: int, pad: int,
                     rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """``(len(users), length)`` int64 windows of the users' training sequences, left-padded with ``pad``.

    Without ``rng`` each window holds the user's last ``length`` items; with ``rng`` a sequence
    longer than ``length`` contributes a uniformly random contiguous run of ``length`` items.
    """
    starts, lengths = sequences.indptr[users], sequences.lengths[users]
    taken = np.minimum(lengths, length)
    offset = lengths - taken  # where the window starts inside the sequence: the most recent by default
    if rng is not None:
        offset = np.floor(rng.random(len(users)) * (offset + 1)).astype(np.int64)
    slot = np.arange(length)
    first_slot = (length - taken)[:, None]
    index = (starts + offset)[:, None] + slot - first_slot
    inside = slot >= first_slot
    windows = np.full((len(users), length), pad, dtype=np.int64)
    windows[inside] = sequences.items[index[inside]]
    return windows


class _FullSoftmaxCrossEntropy(torch.autograd.Function):
    """``mean_n -log softmax(h_n · Eᵀ)[t_n]``: the ``(N, n_items)`` logits become the softmax in place
    (kept for the backward pass, which forms the logits' gradient ``(softmax - onehot) / N``)."""

    @staticmethod
    def forward(ctx, encodings: torch.Tensor, item_embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probabilities = encodings @ item_embeddings.T
        largest = probabilities.max(1, keepdim=True).values
        probabilities.sub_(largest).exp_()
        total = probabilities.sum(1, keepdim=True)
        probabilities.div_(total)
        target_logits = (encodings * item_embeddings[targets]).sum(1)
        ctx.save_for_backward(encodings, item_embeddings, targets, probabilities)
        return (largest.squeeze(1) + total.log().squeeze(1) - target_logits).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        encodings, item_embeddings, targets, probabilities = ctx.saved_tensors
        scale = grad / len(targets)
        logits_grad = probabilities * scale  # a new buffer: the saved softmax stays valid (retain_graph)
        logits_grad[torch.arange(len(targets), device=targets.device), targets] -= scale
        return logits_grad @ item_embeddings, logits_grad.T @ encodings, None


def full_softmax_cross_entropy(encodings: torch.Tensor, item_embeddings: torch.Tensor,
                               targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(encodings @ item_embeddings.T, targets)``, the mean over the ``N`` rows,
    without the intermediate ``(N, n_items)`` buffers of ``log_softmax`` and ``nll_loss`` (about a third
    faster on a CPU; the same value and gradients up to float rounding, checked in the tests)."""
    return _FullSoftmaxCrossEntropy.apply(encodings, item_embeddings, targets)


class SASRecRecommender:
    """SASRec with full-softmax cross-entropy; implements :class:`refit_gym.evaluation.Recommender`.

    ``fit(data)`` takes the whole :class:`~refit_gym.data.interactions.InteractionData` (it trains
    on ``data.train_sequences`` and early-stops on the validation split); ``score(history)`` encodes
    the last ``max_len`` visible items of each history and returns ``(B, n_items)`` float32 scores.

    Args:
        config: the hyper-parameters (:class:`SASRecConfig`); keyword arguments override its fields,
            e.g. ``SASRecRecommender(hidden=128, dropout=0.5)``. An unknown name or a bad value raises
            :class:`ConfigError`.

    Attributes (after ``fit``):
        log: one dict per epoch (``epoch``, ``loss``, ``seconds``, and the validation ``metric`` on
            validation epochs).
        best_epoch, best_score: the epoch whose weights are kept and its validation ``metric``.
        epoch_seconds: mean training seconds per epoch (validation excluded).
        fit_seconds: wall time of ``fit``, validation included.
    """

    name = "sasrec"
    fit_on: ClassVar[str] = "data"
    """What ``fit`` takes: the whole InteractionData (``"train"``: the training matrix)."""

    def __init__(self, config: Optional[SASRecConfig] = None, **overrides: Any) -> None:
        if config is not None and not isinstance(config, SASRecConfig):
            raise ConfigError(f"config must be a SASRecConfig, got {type(config).__name__}")
        known = {f.name for f in fields(SASRecConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown SASRec parameter(s) {unknown}; expected some of {sorted(known)}")
        values = {**(asdict(config) if config is not None else {}), **overrides}
        self.config = SASRecConfig(**values)
        self.device = torch.device(self.config.device)
        self.encoder: Optional[CausalSequenceEncoder] = None
        self.log: list[dict] = []
        self.best_epoch: Optional[int] = None
        self.best_score: Optional[float] = None
        self.epoch_seconds: Optional[float] = None
        self.fit_seconds: Optional[float] = None

    @property
    def protocol(self) -> str:
        """The evaluation protocol it is selected with (the evaluator's default for it)."""
        return self.config.protocol

    # ------------------------------------------------------------------ the model
    @property
    def n_items(self) -> int:
        return self._fitted().n_items

    def _fitted(self) -> CausalSequenceEncoder:
        if self.encoder is None:
            raise NotFittedError("SASRecRecommender is not fitted; call fit(data) first")
        return self.encoder

    def _build(self, n_items: int) -> CausalSequenceEncoder:
        c = self.config
        return CausalSequenceEncoder(n_items, c.hidden, c.n_blocks, c.n_heads, c.max_len, dropout=c.dropout,
                                     embedding_dropout=c.embedding_dropout).to(self.device)

    def logits(self, encodings: torch.Tensor) -> torch.Tensor:
        """``(..., hidden)`` encodings -> ``(..., n_items)`` scores with the tied item embeddings."""
        encoder = self._fitted()
        return encodings @ encoder.item_embedding.weight[: encoder.n_items].T

    def loss(self, windows: torch.Tensor) -> torch.Tensor:
        """Mean next-item cross-entropy over the non-padding targets of left-padded ``(B, L + 1)`` windows.

        The rows are encoded in groups of similar length (lengths in ``(2^(k-1), 2^k]``), each
        group cut to its longest row: the encodings are the same as one pass over the whole
        batch (positions are right-aligned and padding is never attended to), at a fraction of
        the cost when most histories are short (Amazon Beauty's median is 4 items)."""
        encoder = self._fitted()
        pad = encoder.n_items
        inputs, targets = next_item_windows(windows, pad)
        lengths = (inputs != pad).sum(1)
        group = torch.ceil(torch.log2(lengths.clamp_min(1).to(torch.float64))).to(torch.int64)
        encodings, wanted = [], []
        for value in torch.unique(group[lengths > 0]).tolist():
            rows = torch.nonzero((group == value) & (lengths > 0)).squeeze(1)
            width = int(lengths[rows].max())
            group_targets = targets[rows, -width:]
            keep = group_targets != pad
            encodings.append(encoder(inputs[rows, -width:])[keep])
            wanted.append(group_targets[keep])
        if not encodings:
            raise DataError("the windows hold no (item, next item) pair: every window has fewer than 2 items")
        item_embeddings = encoder.item_embedding.weight[:pad]
        return full_softmax_cross_entropy(torch.cat(encodings), item_embeddings, torch.cat(wanted))

    def score(self, history: HistoryBatch) -> torch.Tensor:
        """``(B, n_items)`` float32 scores of the next item after each visible history (a fresh tensor).

        A history without a visible item gets all-zero scores."""
        encoder = self._fitted()
        if history.n_items != encoder.n_items:
            raise DataError(f"the histories have {history.n_items} items but SASRec was fitted on {encoder.n_items}")
        with self._threads(), torch.no_grad():
            was_training = encoder.training
            encoder.eval()
            items = trim_padding(history.to_device(self.device).recent(self.config.max_len), encoder.n_items)
            scores = self.logits(encoder(items)[:, -1])
            encoder.train(was_training)
        return scores

    @contextmanager
    def _threads(self) -> Iterator[None]:
        if self.config.threads is None:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.config.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    # ------------------------------------------------------------------ training
    def fit(self, data: InteractionData, log: Optional[Callable[[str], None]] = None) -> "SASRecRecommender":
        """Train on ``data.train_sequences``, validating every ``eval_every`` epochs; keep the best weights.

        Args:
            data: the dataset (its ``valid`` split selects the epoch; ``test`` is not read).
            log: called with one line per validation (e.g. ``print``); default: silent.
        """
        from refit_gym.evaluation.evaluator import EvaluationProtocol

        if not isinstance(data, InteractionData):
            raise DataError(f"SASRec fits on an InteractionData (sequences and a validation split), "
                            f"got {type(data).__name__}")
        c = self.config
        users = np.flatnonzero(data.train_sequences.lengths >= 2)  # a user with one item has no target
        if len(users) == 0:
            raise DataError(f"{data.name}: no user has 2 training items, so there is no next item to learn")
        protocol = EvaluationProtocol(c.protocol, c.mask_history)
        ks = validation_ks(c.metric, c.protocol)
        rng = np.random.default_rng(c.seed)
        started = time.perf_counter()
        self.log, self.best_epoch, self.best_score = [], None, None
        try:
            self._train(data, users, protocol, ks, rng, log)
        except BaseException:
            self.encoder = None  # a failed fit leaves the model unfitted, not half-trained
            raise
        self.epoch_seconds = sum(row["seconds"] for row in self.log) / len(self.log)
        self.fit_seconds = time.perf_counter() - started
        return self

    def _train(self, data: InteractionData, users: np.ndarray, protocol: Any, ks: tuple[int], rng: np.random.Generator,
               log: Optional[Callable[[str], None]]) -> None:
        """The epochs of :meth:`fit`: updates, validation, early stopping; ends with the best weights loaded."""
        from refit_gym.evaluation.evaluator import evaluate

        c = self.config
        sequences, n_items = data.train_sequences, data.n_items
        devices = [self.device] if self.device.type == "cuda" else []
        started = time.perf_counter()
        best_state, since_best = None, 0
        with self._threads(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(c.seed)
            self.encoder = self._build(n_items)
            optimizer = torch.optim.AdamW(self.encoder.parameters(), lr=c.lr, weight_decay=c.weight_decay)
            fixed = None if c.window == "random" else training_windows(sequences, users, c.max_len + 1, n_items)
            for epoch in range(1, c.max_epochs + 1):
                epoch_start = time.perf_counter()
                self.encoder.train()
                windows = fixed if fixed is not None else training_windows(sequences, users, c.max_len + 1,
                                                                           n_items, rng)
                order = rng.permutation(len(users))
                total, count = 0.0, 0
                for first in range(0, len(order), c.batch_size):
                    batch = torch.from_numpy(windows[order[first:first + c.batch_size]]).to(self.device)
                    loss = self.loss(batch)
                    if not torch.isfinite(loss):
                        raise TrainingError(f"SASRec loss is {loss.item()} at epoch {epoch}; lower lr ({c.lr})")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    n_targets = int((batch != n_items).sum()) - len(batch)  # every window holds >= 2 items
                    total, count = total + loss.item() * n_targets, count + n_targets
                seconds = time.perf_counter() - epoch_start
                row: dict[str, Any] = {"epoch": epoch, "loss": total / count, "seconds": seconds}
                out_of_time = c.time_budget_s is not None and time.perf_counter() - started >= c.time_budget_s
                if epoch % c.eval_every == 0 or epoch == c.max_epochs or out_of_time:
                    self.encoder.eval()
                    value = evaluate(self, data, splits=("valid",), ks=ks, batch_size=c.eval_batch_size,
                                     protocol=protocol).metrics["valid"][c.metric]
                    row[c.metric] = value
                    if self.best_score is None or value > self.best_score:
                        self.best_epoch, self.best_score, since_best = epoch, value, 0
                        best_state = copy.deepcopy(self.encoder.state_dict())
                    else:
                        since_best += 1
                    if log is not None:
                        log(f"sasrec epoch {epoch}: loss {row['loss']:.4f}, valid {c.metric} {value:.4f} "
                            f"(best {self.best_score:.4f} at {self.best_epoch}), {seconds:.1f} s/epoch")
                self.log.append(row)
                if since_best >= c.patience or out_of_time:
                    break
        self.encoder.load_state_dict(best_state)
        self.encoder.eval()


# ---------------------------------------------------------------------- tuning on validation
DEFAULT_SASREC_GRID: dict[str, tuple] = {"hidden": (64, 128), "dropout": (0.2, 0.5), "max_len": (50, 200)}
"""The default grid of :func:`tune_sasrec` (8 settings; ``dropout`` sets both dropouts)."""


@dataclass
class SASRecTuning:
    """The result of :func:`tune_sasrec`: the setting with the best validation ``metric``."""

    best_params: dict
    best_score: float
    metric: str
    scores: list[tuple[dict, float]]  # (setting, its best validation metric), in grid order
    model: SASRecRecommender = field(repr=False)
    runs: list[dict] = field(default_factory=list)  # per setting: best epoch, epochs run, seconds

    def to_dict(self) -> dict:
        return {"best_params": self.best_params, "best_score": self.best_score, "metric": self.metric,
                "split": "valid", "runs": self.runs}


def grid_settings(grid: Union[Mapping[str, Sequence], Sequence[Mapping[str, Any]]],
                  fixed: Iterable[str] = ()) -> list[dict]:
    """The settings of ``grid``: a mapping ``{name: values}`` (its product, in order) or a list of dicts.

    ``dropout`` in a setting sets ``embedding_dropout`` too, unless the setting or ``fixed`` (the
    names of the hyper-parameters fixed for every setting) gives it."""
    if isinstance(grid, Mapping):
        names = list(grid)
        for name in names:
            if isinstance(grid[name], (str, bytes)) or not isinstance(grid[name], Sequence) or not grid[name]:
                raise ConfigError(f"SASRec grid[{name!r}] must be a non-empty list of values, got {grid[name]!r}")
        settings = [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]
    else:
        settings = [dict(setting) for setting in grid]
    if not settings:
        raise ConfigError("the SASRec grid is empty")
    fixed = set(fixed)
    for setting in settings:
        if "dropout" in setting and "embedding_dropout" not in fixed:
            setting.setdefault("embedding_dropout", setting["dropout"])
    return settings


def tune_sasrec(
    data: InteractionData,
    grid: Union[Mapping[str, Sequence], Sequence[Mapping[str, Any]]] = DEFAULT_SASREC_GRID,
    split: str = "valid",
    *,
    log: Optional[Callable[[str], None]] = None,
    **fixed: Any,
) -> SASRecTuning:
    """Fit SASRec for every setting of ``grid`` and keep the one with the best validation metric.

    Every setting early-stops on validation (``fixed.get("metric", "ndcg@10")``) and is scored by
    its best validation value; ties keep the earlier setting. Only the validation split may
    select (``split="test"`` raises :class:`ConfigError`); the test split is never read. ``fixed``
    are hyper-parameters shared by all settings (``max_epochs``, ``seed``, ``threads``, ...).
    All settings are validated before the first fit. Returns the fitted best model.
    """
    if split != "valid":
        raise ConfigError(f"tune_sasrec selects on the validation split only, got split={split!r}")
    settings = grid_settings(grid, fixed)
    overlap = sorted(set().union(*settings) & set(fixed))
    if overlap:
        raise ConfigError(f"{overlap} are both in the grid and fixed")
    configs = [SASRecRecommender(**fixed, **setting).config for setting in settings]  # all bad values now
    scores, runs = [], []
    best_index, best_model = -1, None
    for index, (setting, config) in enumerate(zip(settings, configs)):
        if log is not None:
            log(f"tune_sasrec {index + 1}/{len(settings)}: {setting}")
        model = SASRecRecommender(config).fit(data, log=log)
        scores.append((setting, model.best_score))
        runs.append({"params": setting, config.metric: model.best_score, "best_epoch": model.best_epoch,
                     "epochs": len(model.log), "epoch_seconds": model.epoch_seconds,
                     "fit_seconds": model.fit_seconds})
        if best_model is None or model.best_score > scores[best_index][1]:
            best_index, best_model = index, model
    return SASRecTuning(best_params=settings[best_index], best_score=scores[best_index][1],
                        metric=configs[0].metric, scores=scores, model=best_model, runs=runs)


def print_log(line: str) -> None:
    """A ``log`` for :meth:`SASRecRecommender.fit` that writes to stderr."""
    print(line, file=sys.stderr, flush=True)
