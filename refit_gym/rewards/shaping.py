"""Potential-based per-step shaping from the held-out items (Ng, Harada & Russell 1999); off by default.

The env takes ``shaping=None`` unless a study switches it on. With ``gamma = 1`` the shaping
rewards of an episode sum to ``phi(x_final) - phi(x_start)``, whatever the path in between. The
final state's potential is not zeroed, so the shaped objective is ``R + phi(x_final)``: the
optimal policy is unchanged when ``R`` is the held-out log-likelihood of the same temperature
(``phi(x_final)`` is then ``scale * R``), while shaping adds that log-likelihood to any other
reward. What changes in every case is when the credit arrives (``docs/rewards.md``).
"""

from __future__ import annotations

import math

import torch

from refit_gym.errors import ConfigError
from refit_gym.rewards._checks import check_batch, check_choice, check_temperature
from refit_gym.rewards.base import EpisodeBatch, StepShaping, TrainingInteractions
from refit_gym.rewards.functional import held_out_log_likelihood, held_out_mass, masked_log_softmax, scored_items
from refit_gym.rewards.likelihood import DEFAULT_TEMPERATURE

POTENTIALS = ("loglik", "mass")


class HeldOutPotential(StepShaping):
    """``phi(x_t) = scale * L(x_t)``: how likely the current state makes the held-out items.

    ``L`` is the held-out log-likelihood (``potential="loglik"``, normalised by ``|H|`` like
    :class:`~refit_gym.rewards.likelihood.HeldOutLogLikelihood`) or the probability mass
    (``"mass"``) under ``softmax(x_t / tau)`` with the input items masked. The step ``t`` is not
    used (the potential of a state depends on its vector only). Differentiable in ``x_t``.

    Args:
        temperature: softmax temperature ``tau > 0``.
        potential: ``"loglik"`` or ``"mass"``.
        normalize: divide the log-likelihood by ``|H|`` (``"loglik"`` only).
        scale: multiplies the potential (any finite number).

    Raises:
        ConfigError: a parameter out of range or an unknown choice.
    """

    name = "shaping"

    def __init__(
        self,
        temperature: float = DEFAULT_TEMPERATURE,
        potential: str = "loglik",
        normalize: bool = True,
        scale: float = 1.0,
    ) -> None:
        self.temperature = check_temperature(temperature)
        self.kind = check_choice(potential, POTENTIALS, "shaping potential")
        self.normalize = bool(normalize)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ConfigError(f"shaping scale must be a finite number, got {scale!r}")
        self.scale = float(scale)
        self.n_items: int | None = None

    def bind(self, interactions: TrainingInteractions, device: torch.device | str = "cpu") -> "HeldOutPotential":
        self.n_items = interactions.n_items
        return self

    def potential(self, x_t: torch.Tensor, t: torch.Tensor, episode: EpisodeBatch) -> torch.Tensor:
        """``(B,)`` potential of the states ``x_t`` (``t`` unused)."""
        check_batch(x_t, episode, self.n_items)
        log_probs = masked_log_softmax(x_t, episode.visible, self.temperature)
        scored = scored_items(episode.held_out, episode.visible)
        if self.kind == "mass":
            value = held_out_mass(log_probs, scored)
        else:
            value = held_out_log_likelihood(log_probs, scored, self.normalize)
        return self.scale * value

    def config(self) -> dict:
        return {
            "term": type(self).__name__,
            "temperature": self.temperature,
            "potential": self.kind,
            "normalize": self.normalize,
            "scale": self.scale,
        }
