"""DreamRec (Yang et al., NeurIPS 2023; code YangZhengyi98/DreamRec): generate the next item's embedding.

The diffused state is the next item's embedding (``refit_gym/models/sequential.py``). The
condition is the history's encoding ``h`` (a self-attention encoder, read at the newest
position); the denoiser predicts ``x0`` from ``[x_t, h, step embedding]``:

* ``denoiser: mlp1`` -- one ``Linear(3 hidden -> hidden)`` (the official default), or ``mlp2`` --
  ``Linear(3 hidden -> 2 hidden) - GELU - Linear(2 hidden -> hidden)``;
* step embedding ``sinusoid(t, hidden)`` through ``Linear(hidden, 2 hidden) - GELU - Linear(2 hidden,
  hidden)``;
* **classifier-free guidance**: during training ``h`` is replaced by a learned "none" embedding
  with probability ``p_uncond``; the chain uses ``(1 + w) f(x_t, h, t) - w f(x_t, none, t)``.

Loss: ``MSE(E[target], f(x_t, h, t))`` (x0-prediction, mean over the embedding), timesteps
uniform. Item scores: ``x0 E^T``. Embeddings are ``N(0, 1)`` initialised, as in the official code.

``target_gradient`` (default ``True``, the official code: ``x_start = item_embeddings(target)``
with its gradient) lets the MSE reach the item embedding through the diffused target. The MSE then
has a trivial minimum -- every embedding at 0 (or at one common vector) -- and nothing (no
negatives) resists it. Measured on Amazon Beauty (lr 5e-3, validation): the item norms shrink
(8.0 -> 4.0 in 10 epochs, 0.5 in 40) fastest for the items most often a target (Spearman of norm
and training popularity -0.76 after 10 epochs), so ``x0 E^T`` ranks rare items first and
validation HR@10 stays at chance; the official script on the same data (its defaults, and its
YooChoose README settings) is at chance too. ``target_gradient: false`` detaches the target (the
embedding learns only through the history encoder, so it keeps its scale), which is not
DreamRec's code but is what makes the model rank on that data.

Settings (``training``, see ``sequential.py``): ``every_prefix`` (faithful: one example per
prefix, the encoder attends over the whole window) or ``causal_pass`` (CPU: all positions of a
user's window at once with a **causal** encoder; position ``j``'s encoding conditions the
prediction of item ``j + 1`` -- the same examples, since DreamRec's condition is an encoding of
the prefix alone). DreamRec's own history window is the last 10 items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from refit_gym.data.interactions import TrainingInteractions
from refit_gym.diffusion.gaussian import GaussianDiffusion
from refit_gym.errors import ConfigError
from refit_gym.models.base import ChainInputs
from refit_gym.models.sequence_encoder import CausalSequenceEncoder, trim_padding
from refit_gym.models.sequential import SequentialConfig, SequentialDiffusion
from refit_gym.models.time_embedding import timestep_embedding

DENOISERS = ("mlp1", "mlp2")


@dataclass
class DreamRecConfig(SequentialConfig):
    name: str = "dreamrec"
    hidden: int = 64
    """Item embedding width (DreamRec: 64)."""
    n_blocks: int = 1
    """Self-attention blocks of the history encoder (DreamRec: 1)."""
    n_heads: int = 1
    """Attention heads (DreamRec: 1)."""
    max_len: int = 10
    """History window (DreamRec: 10)."""
    dropout: float = 0.1
    """Dropout of the encoder (DreamRec: 0.1)."""
    denoiser: str = "mlp1"
    """``mlp1`` (DreamRec's default) or ``mlp2``."""
    p_uncond: float = 0.1
    """Probability of training with the "none" condition (classifier-free guidance)."""
    guidance: float = 2.0
    """Guidance weight ``w`` of the chain (DreamRec: 2)."""
    target_gradient: bool = True
    """Let the x0-MSE train the item embedding through the diffused target (DreamRec's code);
    ``False`` detaches the target, which keeps the embedding from collapsing (module docstring)."""


class DreamRecDenoiser(nn.Module):
    """``f(x_t, h, t)``, the guided combination and the "none" condition (see the module docstring)."""

    def __init__(self, config: DreamRecConfig) -> None:
        super().__init__()
        if config.denoiser not in DENOISERS:
            raise ConfigError(f"model.denoiser must be one of {DENOISERS}, got {config.denoiser!r}")
        if not 0.0 <= config.p_uncond < 1.0:
            raise ConfigError(f"model.p_uncond must be in [0, 1), got {config.p_uncond}")
        hidden = config.hidden
        self.hidden, self.guidance = hidden, float(config.guidance)
        self.step_mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        if config.denoiser == "mlp1":
            self.net = nn.Sequential(nn.Linear(3 * hidden, hidden))
        else:
            self.net = nn.Sequential(nn.Linear(3 * hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.none_embedding = nn.Parameter(torch.randn(hidden))

    def step_embedding(self, t: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(N, hidden)``: the step MLP of ``t``'s ``N`` entries (times ``weight^T`` when given), run
        once per distinct step and then spread over the entries."""
        steps, index = torch.unique(t.reshape(-1), return_inverse=True)
        embedding = self.step_mlp(timestep_embedding(steps, self.hidden))
        return (embedding if weight is None else F.linear(embedding, weight))[index]

    def conditional(self, x_t: torch.Tensor, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = self.step_embedding(t).view_as(x_t)
        return self.net(torch.cat([x_t, h, step], dim=-1))

    def forward(self, x_t: torch.Tensor, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The guided ``x0`` prediction ``(1 + w) f(x_t, h, t) - w f(x_t, none, t)``."""
        conditional = self.conditional(x_t, h, t)
        if self.guidance == 0.0:
            return conditional
        unconditional = self.conditional(x_t, self.none_embedding.expand_as(h), t)
        return (1.0 + self.guidance) * conditional - self.guidance * unconditional

    def chain(self, h: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(x_t, t) -> forward(x_t, h, t)`` for the steps of one chain, with what does not depend on
        ``x_t`` computed once. ``mlp1`` is one linear layer ``W [x_t, c, s] + b``, so the guided
        combination folds into it: ``W_x x_t + W_s s + b + W_h ((1 + w) h - w none)`` -- one
        ``hidden x hidden`` product per row and step instead of two ``3 hidden x hidden`` ones
        (``W_s s`` is computed once per distinct step)."""
        if len(self.net) != 1:  # mlp2: not linear in the condition
            return lambda x_t, t: self(x_t, h, t)
        w_x, w_h, w_s = self.net[0].weight.split(self.hidden, dim=1)
        condition = (1.0 + self.guidance) * h - self.guidance * self.none_embedding.expand_as(h)
        fixed = F.linear(condition, w_h, self.net[0].bias)
        return lambda x_t, t: F.linear(x_t, w_x) + self.step_embedding(t, w_s).view_as(x_t) + fixed


class DreamRec(SequentialDiffusion):
    """DreamRec on the base-model interface (see the module docstring)."""

    name = "dreamrec"
    Config = DreamRecConfig

    def __init__(
        self, config: DreamRecConfig, diffusion: GaussianDiffusion, train: TrainingInteractions, noise_steps: int = 0
    ) -> None:
        super().__init__(config, diffusion, train, noise_steps)
        if not isinstance(config.target_gradient, bool):
            raise ConfigError(f"model.target_gradient must be true or false, got {config.target_gradient!r}")
        self.encoder = CausalSequenceEncoder(
            self.n_items, config.hidden, config.n_blocks, config.n_heads, config.max_len, config.dropout,
            config.dropout, item_embedding=self.item_embedding, causal=config.training == "causal_pass",
            embedding_scale=1.0,
        )
        self.denoiser = DreamRecDenoiser(config)

    def history_encoding(self, items: torch.Tensor) -> torch.Tensor:
        """``(B, hidden)``: the encoding of the window at its newest position."""
        return self.encoder(trim_padding(items, self.pad))[:, -1]

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x_t, self.history_encoding(items), t)

    def step_denoiser(self, items: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The history encoded once (it does not depend on ``x_t``); each call is :meth:`denoise`'s
        denoiser on it (the same arithmetic, differentiable)."""
        h = self.history_encoding(items)
        return lambda x_t, t: self.denoiser(x_t, h, t)

    def chain_denoiser(self, items: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The history encoded once for a whole chain (it does not depend on ``x_t``), the guided
        ``mlp1`` folded into one product per step (:meth:`DreamRecDenoiser.chain`)."""
        return self.denoiser.chain(self.history_encoding(items))

    @torch.no_grad()
    def sample(self, inputs: ChainInputs, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The deterministic chain, the history encoded once."""
        return self.diffusion.sample(self.chain_denoiser(**inputs.condition), self.start_state(inputs, noise), 0)

    def next_item_loss(
        self, inputs: torch.Tensor, targets: torch.Tensor, generator: Optional[torch.Generator]
    ) -> torch.Tensor:
        if self.config.training == "every_prefix":
            h = torch.zeros(*targets.shape, self.config.hidden, device=self.device)
            h[:, -1] = self.history_encoding(inputs)
        else:
            h = self.encoder(inputs)
        drop = torch.rand(targets.shape, generator=generator).to(self.device) < self.config.p_uncond
        h = torch.where(drop.unsqueeze(-1), self.denoiser.none_embedding.expand_as(h), h)
        t = self.sample_timesteps(tuple(targets.shape), generator)
        x0, x_t = self.noised_targets(targets, t, generator, detach=not self.config.target_gradient)
        real = targets != self.pad
        losses = torch.zeros(targets.shape, device=self.device)
        prediction = self.denoiser.conditional(x_t[real], h[real], t[real])
        losses[real] = (prediction - x0[real]).pow(2).mean(-1)
        return losses
