"""One entry point, :func:`load_dataset`, that picks the right loader for a name or path."""

from __future__ import annotations

import inspect
import os
from typing import Optional, Union

from refit_gym.data.diffrec import DIFFREC_SPLIT_FILES, load_diffrec_split
from refit_gym.data.interactions import InteractionData
from refit_gym.data.paths import find_dataset
from refit_gym.data.ratings import RATINGS_FILE_SUFFIXES, load_ratings
from refit_gym.data.sequences import SEQUENCE_FILE_NAME, load_sequences
from refit_gym.data.synthetic import make_synthetic
from refit_gym.errors import ConfigError, DataError

SYNTHETIC_NAME = "synthetic"
RATINGS_FILE_NAMES = ("ratings.dat", "u.data", "ratings.csv", "ratings.tsv")
"""Files that make a folder a raw-ratings dataset (e.g. ``ml-1m/`` after a download)."""

__all__ = [
    "load_dataset",
    "load_diffrec_split",
    "load_ratings",
    "load_sequences",
    "make_synthetic",
    "parse_synthetic_spec",
]


def load_dataset(
    name_or_path: Union[str, os.PathLike], data_dir: Optional[Union[str, os.PathLike]] = None
) -> InteractionData:
    """Load a dataset by name or path, choosing the loader from what the path is.

    - ``"synthetic"`` or ``"synthetic:key=value,..."`` (keywords of :func:`make_synthetic`,
      e.g. ``"synthetic:n_users=1000,seed=3"``) -> :func:`make_synthetic`;
    - a folder with ``train_list.npy`` -> :func:`load_diffrec_split`;
    - a folder with ``dataset.pkl``, or a ``.pkl`` file -> :func:`load_sequences`;
    - a folder with ``ratings.dat`` / ``u.data`` / ``ratings.csv`` / ``ratings.tsv``, or a
      ``.dat`` / ``.data`` / ``.csv`` / ``.tsv`` file -> :func:`load_ratings`.

    Nothing is cached on disk.

    Args:
        name_or_path: a dataset name looked up in the data directory (e.g.
            ``"diffrec_ml-1m_clean"``, ``"ml-1m"``), an existing path, or a synthetic spec.
        data_dir: the data directory for names; ``None`` resolves it (``REFIT_GYM_DATA``, then
            the user cache directory).

    Returns:
        The :class:`InteractionData`.

    Raises:
        DataError: the dataset is not found or its format is not recognised (the message
            says what was looked for), or its files are malformed.
        ConfigError: a bad synthetic spec.
    """
    text = str(name_or_path)
    if text == SYNTHETIC_NAME or text.startswith(SYNTHETIC_NAME + ":"):
        return make_synthetic(**parse_synthetic_spec(text))
    path = find_dataset(name_or_path, data_dir)
    if path.is_dir():
        if (path / DIFFREC_SPLIT_FILES[0]).is_file():
            return load_diffrec_split(path)
        if (path / SEQUENCE_FILE_NAME).is_file():
            return load_sequences(path / SEQUENCE_FILE_NAME)
        ratings_file = next((path / name for name in RATINGS_FILE_NAMES if (path / name).is_file()), None)
        if ratings_file is not None:
            return load_ratings(ratings_file)
        raise DataError(
            f"{path}: not a recognised dataset folder; expected {DIFFREC_SPLIT_FILES[0]} "
            f"(DiffRec split), {SEQUENCE_FILE_NAME} (DiffuRec sequences) or one of "
            f"{', '.join(RATINGS_FILE_NAMES)} (raw ratings)"
        )
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        return load_sequences(path)
    if suffix in RATINGS_FILE_SUFFIXES:
        return load_ratings(path)
    raise DataError(
        f"{path}: unrecognised dataset file type {suffix or '(no suffix)'!r}; expected a .pkl "
        f"(DiffuRec sequences) or a {' / '.join(RATINGS_FILE_SUFFIXES)} ratings file, or a folder"
    )


def parse_synthetic_spec(spec: str) -> dict:
    """Keyword arguments of :func:`make_synthetic` from ``"synthetic[:key=value,...]"``.

    Args:
        spec: e.g. ``"synthetic:n_users=1000,n_items=500,seed=3"``; values are parsed as int,
            then float.

    Raises:
        ConfigError: an unknown key, a missing ``=``, or a value that is not a number.
    """
    _, _, arguments = spec.partition(":")
    allowed = set(inspect.signature(make_synthetic).parameters) - {"ratios"}
    keywords: dict = {}
    for assignment in filter(None, (part.strip() for part in arguments.split(","))):
        key, equals, value = (piece.strip() for piece in assignment.partition("="))
        if not equals:
            raise ConfigError(f"synthetic spec {spec!r}: expected key=value, got {assignment!r}")
        if key not in allowed:
            raise ConfigError(
                f"synthetic spec {spec!r}: unknown key {key!r}; allowed: {', '.join(sorted(allowed))}"
            )
        keywords[key] = _number(spec, key, value)
    return keywords


def _number(spec: str, key: str, value: str) -> Union[int, float]:
    """``value`` as an int when it is one, else a float."""
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            continue
    raise ConfigError(f"synthetic spec {spec!r}: {key}={value!r} is not a number")
