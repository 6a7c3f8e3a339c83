"""MovieLens item titles from ``movies.dat`` (``MovieID::Title::Genres``, latin-1)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Union

from refit_gym.data.paths import read_text
from refit_gym.errors import DataError

MOVIES_FILE_NAME = "movies.dat"
RAW_MOVIELENS_1M_FOLDER = "movielens-1m_raw_partial"


def read_movielens_titles(path: Union[str, os.PathLike]) -> dict[int, str]:
    """Read a MovieLens ``movies.dat``.

    Args:
        path: the file; each line is ``MovieID::Title::Genres`` in latin-1.

    Returns:
        ``{movie id: title}``.

    Raises:
        DataError: the file is missing or a line is malformed (file, line number, content).
    """
    path = Path(path)
    text = read_text(path)
    titles: dict[int, str] = {}
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        movie_id, separator, rest = line.partition("::")
        title, genre_separator, _genres = rest.rpartition("::")
        if not separator or not genre_separator or not movie_id.strip().isdigit():
            raise DataError(
                f"{path}: line {line_number} is not 'MovieID::Title::Genres': {line[:200]!r}"
            )
        titles[int(movie_id)] = title
    return titles


def titles_in_order(
    raw_item_ids: Iterable[int], titles_by_raw_id: dict[int, str]
) -> tuple[str, ...]:
    """Titles for items given by raw id, ``"item <raw id>"`` for ids without a title.

    Args:
        raw_item_ids: the raw id of each item, in the dataset's item order.
        titles_by_raw_id: as returned by :func:`read_movielens_titles`.
    """
    return tuple(titles_by_raw_id.get(int(raw), f"item {raw}") for raw in raw_item_ids)


def find_movies_file(data_file: Path, allow_raw_ml1m_sibling: bool) -> Optional[Path]:
    """The ``movies.dat`` belonging to a data file, if one exists.

    Args:
        data_file: the ratings / sequence file.
        allow_raw_ml1m_sibling: also look in a sibling ``movielens-1m_raw_partial`` folder
            (the layout of the shared data directory); only sensible for ML-1M data.

    Returns:
        ``movies.dat`` next to ``data_file``, else (when allowed) in
        ``../movielens-1m_raw_partial/``, else ``None``.
    """
    candidates = [data_file.parent / MOVIES_FILE_NAME]
    if allow_raw_ml1m_sibling:
        candidates.append(data_file.parent.parent / RAW_MOVIELENS_1M_FOLDER / MOVIES_FILE_NAME)
    return next((candidate for candidate in candidates if candidate.is_file()), None)
