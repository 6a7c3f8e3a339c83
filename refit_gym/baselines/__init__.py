"""Strong simple baselines that implement the :class:`refit_gym.evaluation.Recommender` protocol."""

from __future__ import annotations

from refit_gym.baselines.ease import EASERecommender, EASETuning, RecencyEASERecommender, tune_ease
from refit_gym.baselines.popularity import PopularityRecommender
from refit_gym.baselines.sasrec import (
    DEFAULT_SASREC_GRID,
    SASRecConfig,
    SASRecRecommender,
    SASRecTuning,
    tune_sasrec,
)
from refit_gym.errors import NotFittedError
from refit_gym.errors import ConfigError
from refit_gym.data.interactions import InteractionData

BASELINES = {
    "popularity": PopularityRecommender,
    "ease": EASERecommender,
    "ease-recency": RecencyEASERecommender,
    "sasrec": SASRecRecommender,
}


def build_baseline(name: str, **kwargs):
    """An unfitted baseline by name (``"popularity"``, ``"ease"``, ``"ease-recency"``, ``"sasrec"``).

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


def fit_baseline(model, data: InteractionData):
    """``model.fit`` on what the baseline declares in ``fit_on``: ``"train"`` (the default: the
    binary training matrix, popularity and EASE) or ``"data"`` (the whole InteractionData: SASRec
    reads the training sequences and early-stops on validation). Returns the fitted model."""
    fit_on = getattr(model, "fit_on", "train")
    if fit_on == "train":
        return model.fit(data.train)
    if fit_on == "data":
        return model.fit(data)
    raise ConfigError(f"{type(model).__name__}.fit_on must be 'train' or 'data', got {fit_on!r}")


__all__ = [
    "BASELINES",
    "DEFAULT_SASREC_GRID",
    "EASERecommender",
    "EASETuning",
    "NotFittedError",
    "PopularityRecommender",
    "RecencyEASERecommender",
    "SASRecConfig",
    "SASRecRecommender",
    "SASRecTuning",
    "build_baseline",
    "fit_baseline",
    "tune_ease",
    "tune_sasrec",
]
