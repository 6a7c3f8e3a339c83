"""Strong simple baselines that implement the :class:`refit_gym.evaluation.Recommender` protocol."""

from __future__ import annotations

from refit_gym.baselines.ease import EASERecommender, EASETuning, RecencyEASERecommender, tune_ease
from refit_gym.baselines.popularity import PopularityRecommender
from refit_gym.errors import NotFittedError
from refit_gym.errors import ConfigError

BASELINES = {"popularity": PopularityRecommender, "ease": EASERecommender, "ease-recency": RecencyEASERecommender}


def build_baseline(name: str, **kwargs):
    """An unfitted baseline by name (``"popularity"``, ``"ease"``, ``"ease-recency"``).

    ``kwargs`` go to its constructor (e.g. ``build_baseline("ease", l2=500.0)``).
    """
    try:
        cls = BASELINES[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown baseline {name!r}; expected one of {', '.join(map(repr, BASELINES))}"
        ) from None
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"bad arguments for baseline {name!r}: {error}") from None


__all__ = [
    "BASELINES",
    "EASERecommender",
    "EASETuning",
    "NotFittedError",
    "PopularityRecommender",
    "RecencyEASERecommender",
    "build_baseline",
    "tune_ease",
]
