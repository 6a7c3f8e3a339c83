"""Datasets: loaders of DiffRec / DiffuRec / raw rating files, a synthetic generator, the split.

Every loader returns an :class:`InteractionData`. :func:`load_dataset` picks the loader from
a name or path; names are looked up in the data directory (:func:`resolve_data_dir`).
"""

from refit_gym.data.diffrec import load_diffrec_split
from refit_gym.data.download import download_movielens_1m
from refit_gym.data.interactions import InteractionData, UserSequences
from refit_gym.data.loaders import load_dataset
from refit_gym.data.paths import find_dataset, resolve_data_dir
from refit_gym.data.ratings import load_ratings
from refit_gym.data.sequences import load_sequences
from refit_gym.data.splitting import chronological_split
from refit_gym.data.synthetic import make_synthetic

__all__ = [
    "InteractionData",
    "UserSequences",
    "chronological_split",
    "download_movielens_1m",
    "find_dataset",
    "load_dataset",
    "load_diffrec_split",
    "load_ratings",
    "load_sequences",
    "make_synthetic",
    "resolve_data_dir",
]
