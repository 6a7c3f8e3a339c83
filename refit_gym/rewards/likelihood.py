"""Own-history recovery terms: how likely the final state makes the user's held-out training items.

The env hides part of each user's training items from the initial state (``episode.held_out``;
by default the most recent ones) and these terms score how well the final scores recover them
under the item distribution ``p = softmax(scores / tau)`` with the input items masked
(:func:`~refit_gym.rewards.functional.masked_log_softmax`; ``mask_visible=False`` keeps them in the
softmax, as an evaluation that ranks the history does).

Which of the two to optimise
----------------------------
:class:`HeldOutLogLikelihood` is the **exact multinomial log-likelihood** of the held-out
interactions, ``sum_{i in H} log p(i)``. Its gradient in the scores lifts every held-out item,
``sum_{i in H} grad log p(i)``. Maximised directly (the ``supervised`` reference, or the
likelihood term of the ``refit`` agent) it is the exact-log-likelihood objective. For a policy
whose last step samples an item ``a ~ p``, the score-function reward with the same expected
gradient is the importance-weighted hit ``r(a) = 1[a in H] / p(a)``:
``E_a[r(a) grad log p(a)] = sum_{i in H} grad log p(i)``.

:class:`HeldOutLikelihood` is the probability **mass** ``M = sum_{i in H} p(i)``, the expected
value of the hit reward ``1[a in H]``. Its gradient is ``sum_{i in H} p(i) grad log p(i)``: each
held-out item is weighted by its current probability, so it sharpens onto held-out items that
are already ranked high and neglects the rest. Measured on ML-1M in the project's fine-tuning
probes (the agents' current results are in ``docs/finetuning.md``): policy-gradient
fine-tuning on hit / mass rewards raised the held-out mass from 0.05 to 0.12-0.25 while
validation Recall@20 fell from 0.114 to 0.090-0.102; the log-likelihood gradient toward the most
recent 25 % of training items raised validation Recall@20 from 0.1146 to about 0.128.
"""

from __future__ import annotations

import torch

from refit_gym.errors import ConfigError
from refit_gym.rewards._checks import check_batch, check_temperature
from refit_gym.rewards.base import EpisodeBatch, RewardTerm, TrainingInteractions
from refit_gym.rewards.functional import held_out_log_likelihood, held_out_mass, masked_log_softmax, scored_items

DEFAULT_TEMPERATURE = 0.1
"""The softmax temperature of the ML-1M probes (DiffRec scores lie roughly in ``[0, 1]``)."""


class _HeldOutTerm(RewardTerm):
    """Shared binding and checks of the held-out recovery terms."""

    differentiable = True

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, mask_visible: bool = True) -> None:
        self.temperature = check_temperature(temperature)
        if not isinstance(mask_visible, bool):
            raise ConfigError(f"mask_visible must be true or false, got {mask_visible!r}")
        self.mask_visible = mask_visible
        self.n_items: int | None = None

    def bind(self, interactions: TrainingInteractions, device: torch.device | str = "cpu") -> "_HeldOutTerm":
        """Remember the item count (nothing else is needed from training data); returns self."""
        self.n_items = interactions.n_items
        return self

    def _log_probs(self, scores: torch.Tensor, episode: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch(scores, episode, self.n_items)
        # unmasked, the input items compete too, as under an evaluation that does not mask the history
        masked = episode.visible if self.mask_visible else None
        return masked_log_softmax(scores, masked, self.temperature), scored_items(episode.held_out, episode.visible)


class HeldOutLogLikelihood(_HeldOutTerm):
    """Multinomial log-likelihood of the held-out items under ``softmax(scores / tau)``, input items masked.

    ``R = (1 / |H|) sum_{i in H} log p(i)`` with ``normalize=True`` (the default: the mean
    log-probability per held-out item, so users with many held-out items do not dominate a
    batch), or ``sum_{i in H} log p(i)`` (the exact log-likelihood) with ``normalize=False``.
    Users with no held-out item get 0. Always ``<= 0``. Differentiable in ``scores``; see the
    module docstring for why this, not :class:`HeldOutLikelihood`, is the exact-likelihood
    objective.

    Args:
        temperature: softmax temperature ``tau > 0``.
        normalize: divide by the number of held-out items ``|H|``.
        mask_visible: exclude the input items from the softmax (the default); ``False`` lets them
            compete, as under the sequential protocol's default evaluation, which ranks the history
            too (``docs/sequential.md``, "What the reward sees").

    Raises:
        ConfigError: ``temperature <= 0`` or not finite; ``mask_visible`` not a bool.
    """

    name = "loglik"

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, normalize: bool = True,
                 mask_visible: bool = True) -> None:
        super().__init__(temperature, mask_visible)
        self.normalize = bool(normalize)

    def __call__(self, scores: torch.Tensor, episode: EpisodeBatch) -> torch.Tensor:
        """``(B,)`` log-likelihood of each episode's held-out items."""
        log_probs, scored = self._log_probs(scores, episode)
        return held_out_log_likelihood(log_probs, scored, self.normalize)

    def config(self) -> dict:
        return {"term": type(self).__name__, "temperature": self.temperature, "normalize": self.normalize,
                "mask_visible": self.mask_visible}


class HeldOutLikelihood(_HeldOutTerm):
    """Probability mass ``sum_{i in H} p(i)`` on the held-out items (the likelihood, not its log).

    In ``[0, 1]``: the chance that one item drawn from ``softmax(scores / tau)`` (input items
    masked) is a held-out one, i.e. the expected hit reward. 0 for users with no held-out item.
    Differentiable, but its gradient sharpens onto held-out items already ranked high (module
    docstring); prefer :class:`HeldOutLogLikelihood` as an objective.

    Args:
        temperature: softmax temperature ``tau > 0``.
        mask_visible: as :class:`HeldOutLogLikelihood`.

    Raises:
        ConfigError: ``temperature <= 0`` or not finite; ``mask_visible`` not a bool.
    """

    name = "likelihood"

    def __call__(self, scores: torch.Tensor, episode: EpisodeBatch) -> torch.Tensor:
        """``(B,)`` probability mass of each episode's held-out items."""
        log_probs, scored = self._log_probs(scores, episode)
        return held_out_mass(log_probs, scored)

    def config(self) -> dict:
        return {"term": type(self).__name__, "temperature": self.temperature, "mask_visible": self.mask_visible}
