"""What the sequential diffusion recommenders share: the next item's embedding is the diffused state.

DiffuRec (``diffurec.py``) and DreamRec (``dreamrec.py``) diffuse the **embedding of the next
item** (a ``hidden``-wide vector) instead of an interaction row:

* ``state_dim = hidden``; the chain starts from noise (``ChainInputs.start = None``);
* the conditioning is the visible history's most recent ``max_len`` items, ``items`` ``(B,
  max_len)`` int64, left-padded with ``n_items`` (newest last). The denoiser reads them through
  the model's own, trainable, item embedding -- so fine-tuning may change the history encoder
  too;
* ``item_scores(x0) = x0 E^T`` over all items (``E`` the item embedding, padding row dropped);
* evaluation (:meth:`score`) runs the deterministic chain from a noise vector drawn per user from
  ``(eval_seed, user)``, so a user's scores do not depend on the batch or on the order of
  evaluation; both models' own code draws fresh unseeded noise.

Pretraining examples (``training``):

* ``every_prefix`` (the published models' own data): one ``(prefix, next item)`` example per
  position of every training sequence (``sum_u (len_u - 1)`` examples an epoch), each prefix cut
  to its last ``max_len`` items; one loss term per example;
* ``causal_pass`` (our CPU setting): one window of ``max_len + 1`` items per user and epoch (its
  most recent, or a random one with ``window: random``), every position of the window a next-item
  target, all encoded in one causal pass (SASRec's training). On Amazon Beauty (median length 4)
  that is nearly the same set of targets at a fifth of the examples; on ML-1M (median 94) an
  epoch sees ``max_len`` targets of each user.

The padding of both the windows and the conditioning is ``n_items`` (the library's item ids are
``0..n_items - 1``; DiffuRec's pickles number items from 1 and pad with 0, see
``refit_gym/data/sequences.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterator, Optional

import torch
import torch.nn as nn

from refit_gym.data.history import HistoryBatch, SequenceTable
from refit_gym.data.interactions import TrainingInteractions
from refit_gym.diffusion.gaussian import GaussianDiffusion
from refit_gym.errors import ConfigError
from refit_gym.models.base import BaseModel, ChainInputs, ConditionSpec, ModelConfig
from refit_gym.models.sequence_encoder import trim_padding

TRAINING_MODES = ("every_prefix", "causal_pass")
BUCKET_POOL = 50
"""Training batches are formed from pools of this many batches sorted by window length."""
WINDOWS = ("recent", "random")


@dataclass
class SequentialConfig(ModelConfig):
    """Fields every sequential diffusion model has (each model sets its own defaults)."""

    hidden: int = 128
    """Item embedding width = the width of the diffused state."""
    max_len: int = 50
    """The most recent items of a history the model reads."""
    training: str = "causal_pass"
    """``every_prefix`` (one example per position, the published models' data) or ``causal_pass``
    (every position of a user's window in one causal pass; the CPU setting)."""
    window: str = "recent"
    """``causal_pass``: each user's most recent ``max_len + 1`` items, or a ``random`` window per epoch."""
    eval_seed: int = 0
    """Seed of the per-user start noise of evaluation (:meth:`SequentialDiffusion.score`)."""
    embedding_std: float = 1.0
    """Std of the item embedding's initialisation (DiffuRec and DreamRec: 1, ``nn.Embedding``'s
    default; ``hidden ** -0.5`` starts the item logits ``x0 E^T`` near 0, as SASRec's init)."""


class SequentialDiffusion(BaseModel):
    """Base of the models whose diffused state is the next item's embedding (see the module docstring).

    A subclass builds its denoiser, defines :meth:`denoise` ``(x_t, t, items)`` and
    :meth:`next_item_loss` (the loss of a batch of windows, per target position).
    """

    protocol: ClassVar[str] = "sequential"

    def __init__(
        self, config: SequentialConfig, diffusion: GaussianDiffusion, train: TrainingInteractions, noise_steps: int = 0
    ) -> None:
        super().__init__(config, diffusion, train, noise_steps)
        if config.training not in TRAINING_MODES:
            raise ConfigError(f"model.training must be one of {TRAINING_MODES}, got {config.training!r}")
        if config.window not in WINDOWS:
            raise ConfigError(f"model.window must be one of {WINDOWS}, got {config.window!r}")
        for name in ("hidden", "max_len"):
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if not float(config.embedding_std) > 0:
            raise ConfigError(f"model.embedding_std must be > 0, got {config.embedding_std!r}")
        self.pad = self.n_items
        self.item_embedding = nn.Embedding(self.n_items + 1, config.hidden, padding_idx=self.pad)
        nn.init.normal_(self.item_embedding.weight, 0.0, float(config.embedding_std))

    # ------------------------------------------------------------------ the interface
    @property
    def state_dim(self) -> int:
        return self.config.hidden

    def encode(self, history: HistoryBatch) -> ChainInputs:
        return ChainInputs(start=None, condition={"items": history.recent(self.config.max_len)})

    def condition_spec(self) -> dict[str, ConditionSpec]:
        return {"items": ConditionSpec((self.config.max_len,), torch.int64, 0, self.n_items)}

    def item_vectors(self) -> torch.Tensor:
        """``(n_items, hidden)``: the embedding of every item (the padding row left out)."""
        return self.item_embedding.weight[: self.n_items]

    def item_scores(self, x0: torch.Tensor) -> torch.Tensor:
        return x0 @ self.item_vectors().t()

    def evaluation_noise(self, users: torch.Tensor) -> torch.Tensor:
        """``(B, hidden)``: each user's start noise, drawn from ``(eval_seed, user)`` alone."""
        rows = []
        for user in users.tolist():
            generator = torch.Generator().manual_seed(self.config.eval_seed * 1_000_003 + int(user))
            rows.append(torch.randn(self.config.hidden, generator=generator))
        return torch.stack(rows).to(self.device)

    @torch.no_grad()
    def score(self, history: HistoryBatch, chunk: int = 256) -> torch.Tensor:
        """Scores of the deterministic chain from each user's evaluation noise. Rows are run in
        chunks of ``chunk`` users of similar history length, each window cut to the chunk's
        longest history (:func:`trim_padding`: the same numbers, a fraction of the work when
        most histories are shorter than ``max_len``)."""
        history = history.to_device(self.device)
        inputs = self.encode(history)
        noise = self.evaluation_noise(history.users)
        order = torch.argsort(history.lengths(), stable=True)
        x0 = torch.empty(history.batch_size, self.state_dim, device=self.device)
        for rows in order.split(chunk):
            condition = {name: value[rows] for name, value in inputs.condition.items()}
            x0[rows] = self.sample(ChainInputs(None, condition), noise=noise[rows])
        return self.item_scores(x0)

    # ------------------------------------------------------------------ pretraining
    def training_batches(
        self, table: SequenceTable, batch_size: int, generator: torch.Generator
    ) -> Iterator[HistoryBatch]:
        """Batches of windows ``(B, max_len + 1)``, left-padded, whose last position is a target
        (``every_prefix``: one window per prefix; ``causal_pass``: one per user)."""
        length = self.config.max_len + 1
        lengths = (table.indptr[1:] - table.indptr[:-1]).cpu()
        if self.config.training == "every_prefix":
            # every position but a user's first is the target of one example ending there
            owner = torch.repeat_interleave(torch.arange(table.n_users), lengths)
            position = torch.arange(len(owner))
            is_target = position != table.indptr[:-1].cpu()[owner]
            users, ends = owner[is_target], position[is_target] + 1
        else:
            users = torch.arange(table.n_users)[lengths > 1]
            ends = table.indptr[1:].cpu()[users]
            if self.config.window == "random":
                span = (lengths[users] - length).clamp_min(0)
                ends = ends - (torch.rand(len(users), generator=generator) * (span + 1)).floor().to(torch.int64)
        # batches of similar lengths (cut to their longest window in training_loss): shuffled,
        # sorted by length within pools of BUCKET_POOL batches, the batches' order shuffled again
        order = torch.randperm(len(users), generator=generator)
        span = (ends - table.indptr[:-1].cpu()[users]).clamp_max(length)
        batches = []
        for pool in order.split(batch_size * BUCKET_POOL):
            pool = pool[torch.argsort(span[pool], stable=True)]
            batches.extend(pool.split(batch_size))
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield _windows(table, users[batches[b]], ends[batches[b]], length)

    def training_loss(self, batch, timestep_sampler, reweight: bool = True, generator=None) -> torch.Tensor:
        """The mean of :meth:`next_item_loss` over the batch's targets (all window positions for
        ``causal_pass``, the last for ``every_prefix``); ``reweight`` / importance sampling do not
        apply (timesteps uniform, as in both models' code)."""
        batch = batch.to_device(self.device)
        items = trim_padding(batch.items, self.pad)
        inputs, targets = items[:, :-1], items[:, 1:]
        targets = targets.masked_fill(inputs == self.pad, self.pad)
        if self.config.training == "every_prefix":
            targets = torch.cat([torch.full_like(targets[:, :-1], self.pad), targets[:, -1:]], dim=1)
        losses = self.next_item_loss(inputs, targets, generator)
        return losses[targets != self.pad].mean()

    def next_item_loss(
        self, inputs: torch.Tensor, targets: torch.Tensor, generator: Optional[torch.Generator]
    ) -> torch.Tensor:
        """``(B, L)`` losses of predicting ``targets[:, j]`` after ``inputs[:, :j + 1]`` (values at
        padding targets are ignored)."""
        raise NotImplementedError

    def sample_timesteps(self, shape: tuple[int, ...], generator: Optional[torch.Generator]) -> torch.Tensor:
        """Uniform timesteps of ``shape`` on the model's device."""
        return torch.randint(0, self.diffusion.steps, shape, generator=generator).to(self.device)

    def noised_targets(
        self, targets: torch.Tensor, t: torch.Tensor, generator: Optional[torch.Generator], detach: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, x_t)`` of the targets' embeddings, ``(B, L, hidden)`` each (padding targets: the
        padding row; their losses are ignored). ``detach``: no gradient flows from either back to
        the item embedding (DreamRec's ``target_gradient: false``)."""
        x0 = self.item_embedding(targets)
        if detach:
            x0 = x0.detach()
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        flat = self.diffusion.q_sample(x0.reshape(-1, x0.shape[-1]), t.reshape(-1), noise=noise.reshape(-1, x0.shape[-1]))
        return x0, flat.view_as(x0)


def _windows(table: SequenceTable, users: torch.Tensor, ends: torch.Tensor, length: int) -> HistoryBatch:
    """The ``length`` items before each ``ends`` (exclusive) of the users' sequences, left-padded."""
    users, ends = users.to(table.device), ends.to(table.device)
    starts = table.indptr[users]
    position = torch.arange(-length, 0, device=table.device)
    index = ends.unsqueeze(1) + position
    valid = index >= starts.unsqueeze(1)
    items = table.items[index.clamp_min(0)] if table.items.numel() else torch.zeros_like(index)
    items = torch.where(valid, items, torch.full_like(items, table.n_items))
    return HistoryBatch(users=users, items=items, visible=valid, n_items=table.n_items)


__all__ = ["SequentialConfig", "SequentialDiffusion", "TRAINING_MODES", "WINDOWS"]
