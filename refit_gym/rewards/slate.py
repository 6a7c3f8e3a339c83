"""The reward of the slate the environment draws at the terminal step (env option ``slate_size``).

With ``slate_size=K`` the env ends every episode by drawing a slate of ``K`` distinct non-input
items from Plackett-Luce(``softmax(scores / slate_temperature)``) (:mod:`refit_gym.slates`) and
hands it to the reward as ``episode.slates``. :class:`SlateReward` scores that slate alone, a
black box of the drawn items: ``hits``, ``recall`` or ``ndcg`` of the held-out items
(:func:`refit_gym.slates.slate_reward`). Its value depends on the draw, not on the scores
directly: not differentiable.
"""

from __future__ import annotations

import torch

from refit_gym.errors import ConfigError
from refit_gym.rewards._checks import check_batch, check_choice
from refit_gym.rewards.base import EpisodeBatch, RewardTerm, TrainingInteractions


class SlateReward(RewardTerm):
    """A metric of the env's slate (``episode.slates``, ``(B, K)``) against the held-out items ``H``.

    ``hits``: ``|slate & H|``; ``recall``: ``hits / |H|``; ``ndcg``: ``DCG@K / IDCG@K`` (IDCG
    over ``min(|H|, K)`` positions); 0 when ``H`` is empty.

    Args:
        metric: ``"hits"``, ``"recall"`` or ``"ndcg"`` (default).

    Raises:
        ConfigError: an unknown metric; at call time, an episode without slates (the env's
            ``slate_size`` option is off; the env refuses such a reward when it is built).
    """

    name = "slate"
    differentiable = False
    uses_slates = True

    def __init__(self, metric: str = "ndcg") -> None:
        from refit_gym.slates import HELD_OUT_SLATE_REWARDS  # (refit_gym.slates imports the rewards package)

        self.metric = check_choice(metric, HELD_OUT_SLATE_REWARDS, "slate reward metric")
        self.n_items: int | None = None

    def bind(self, interactions: TrainingInteractions, device: torch.device | str = "cpu") -> "SlateReward":
        self.n_items = interactions.n_items
        return self

    def __call__(self, scores: torch.Tensor, episode: EpisodeBatch) -> torch.Tensor:
        """``(B,)`` float32 metric of each row's slate."""
        from refit_gym.slates import slate_reward  # (refit_gym.slates imports the rewards package)

        if episode.slates is None:
            raise ConfigError("the `slate` reward needs the env option slate_size (the env draws a slate of "
                              "slate_size items at the terminal step); pass slate_size=K to the env")
        check_batch(scores, episode, self.n_items)
        return slate_reward(episode.slates, episode, self.metric)

    def config(self) -> dict:
        return {"term": type(self).__name__, "metric": self.metric}
