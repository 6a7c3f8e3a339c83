"""Loader of raw rating files: MovieLens ``ratings.dat``, ML-100K ``u.data``, or a CSV with a header.

Raw explicit ratings become implicit feedback (``rating >= min_rating``), ids are renumbered
to ``0..n-1`` and each user's interactions are split chronologically by
:func:`~refit_gym.data.splitting.chronological_split` (DiffRec's 7:2:1 protocol).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from refit_gym.data.assemble import interaction_data_from_split
from refit_gym.data.interactions import InteractionData
from refit_gym.data.paths import read_text
from refit_gym.data.splitting import DEFAULT_SPLIT_RATIOS, chronological_split
from refit_gym.data.titles import find_movies_file, read_movielens_titles, titles_in_order
from refit_gym.errors import ConfigError, DataError

RATINGS_FILE_FORMATS = ("movielens", "udata", "csv")
"""``movielens``: ``user::item::rating::timestamp`` (ML-1M / ML-10M ``ratings.dat``);
``udata``: tab-separated ``user item rating timestamp`` without header (ML-100K ``u.data``);
``csv``: comma- (or, for ``.tsv`` / a tab in the header, tab-) separated with a header naming
``user`` and ``item`` and optionally ``rating`` and ``timestamp`` columns."""

RATINGS_FILE_SUFFIXES = (".dat", ".data", ".csv", ".tsv")

_COLUMN_ALIASES = {
    "user": ("user", "user_id", "userid", "uid", "user id"),
    "item": ("item", "item_id", "itemid", "iid", "movie", "movie_id", "movieid", "item id"),
    "rating": ("rating", "ratings", "score"),
    "timestamp": ("timestamp", "time", "ts", "unix_time", "unixtime"),
}
_NUMERIC_FORMAT_DTYPE = np.dtype(
    [("user", "i8"), ("item", "i8"), ("rating", "f8"), ("timestamp", "i8")]
)
_GENERIC_FILE_STEMS = {"ratings", "u", "data", "interactions"}
_INT64_MAX = np.iinfo(np.int64).max

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RatingsTable:
    """The parsed columns of a ratings file, one entry per line (file order).

    Attributes:
        users, items: raw ids (int64 when every id is an integer, else str).
        ratings: float64 ratings, or ``None`` when the file has no rating column.
        timestamps: float64 / int64 timestamps, or ``None`` when the file has none.
        file_format: one of :data:`RATINGS_FILE_FORMATS`.
    """

    users: np.ndarray
    items: np.ndarray
    ratings: Optional[np.ndarray]
    timestamps: Optional[np.ndarray]
    file_format: str


def load_ratings(
    path: Union[str, os.PathLike],
    min_rating: float = 4.0,
    ratios: Sequence[float] = DEFAULT_SPLIT_RATIOS,
    file_format: Optional[str] = None,
    name: Optional[str] = None,
) -> InteractionData:
    """Load a raw ratings file as implicit feedback with a per-user chronological split.

    Steps: parse (:func:`read_ratings_table`); keep rows with ``rating >= min_rating`` (every
    row when the file has no rating column); renumber users and items to ``0..n-1`` in the
    order of their raw ids; split each user's interactions by timestamp (ties and files
    without timestamps in file order) with :func:`~refit_gym.data.splitting.chronological_split`,
    which also drops too-short users, duplicate pairs and held-out items unseen in train;
    renumber the survivors to ``0..n-1`` again. Repeated ``(user, item)`` rows are dropped
    with a logged warning (the earliest is kept), so no pair can be both a training input and
    a held-out target; every user left has training items. Item titles come from a
    ``movies.dat`` next to the file when there is one. ``extras["raw_user_ids"]`` /
    ``extras["raw_item_ids"]`` map the final ids back to the file's ids.

    Args:
        path: the ratings file.
        min_rating: the smallest rating counted as a positive interaction (4 as in DiffRec).
        ratios: ``(train, valid, test)`` fractions per user.
        file_format: force one of :data:`RATINGS_FILE_FORMATS`; ``None`` detects it.
        name: the dataset name; defaults to the file's stem, or its folder's name for the
            usual file names (``ratings.dat``, ``u.data``).

    Returns:
        The :class:`InteractionData`.

    Raises:
        DataError: missing file, malformed line (file, line number and content: a wrong
            field count, a non-integer, negative or beyond-int64 id, a rating that is not a
            finite number), or no user left after filtering and splitting.
    """
    path = Path(path)
    table = read_ratings_table(path, file_format)
    if table.ratings is None:
        positive = np.ones(len(table.users), dtype=bool)
    else:
        positive = table.ratings >= min_rating
    if not positive.any():
        raise DataError(
            f"{path}: no interaction with rating >= {min_rating:g} "
            f"({len(table.users)} rows read)"
        )
    user_labels, user_codes = np.unique(table.users[positive], return_inverse=True)
    item_labels, item_codes = np.unique(table.items[positive], return_inverse=True)
    times = None if table.timestamps is None else table.timestamps[positive]
    split = chronological_split(user_codes, item_codes, times, ratios)
    if len(split.train) == 0:
        raise DataError(
            f"{path}: no user has enough positive interactions to give each of train / valid / "
            f"test at least one item with ratios {tuple(ratios)}"
        )
    if split.n_dropped_duplicates:
        logger.warning(
            "%s: %d repeated (user, item) row(s) dropped, the earliest of each pair kept",
            path,
            split.n_dropped_duplicates,
        )
    item_titles = None
    movies_file = find_movies_file(path, allow_raw_ml1m_sibling=False)
    if movies_file is not None and item_labels.dtype.kind in "iu":
        item_titles = titles_in_order(item_labels, read_movielens_titles(movies_file))
    data = interaction_data_from_split(
        name or _default_name(path),
        user_codes,
        item_codes,
        split,
        source=str(path),
        item_titles=item_titles,
        extras={"file_format": table.file_format, "min_rating": min_rating},
    )
    data.extras["raw_user_ids"] = user_labels[data.extras["input_user_ids"]]
    data.extras["raw_item_ids"] = item_labels[data.extras["input_item_ids"]]
    return data


def detect_ratings_format(path: Path, first_line: str) -> str:
    """Guess the format of a ratings file from its first non-empty line and its suffix.

    Args:
        path: the file (its suffix is a hint).
        first_line: its first non-empty line.

    Returns:
        ``"movielens"`` when the line contains ``::``; ``"udata"`` for a ``.data`` file or a
        tab-separated line of numbers (no header); else ``"csv"``.
    """
    if "::" in first_line:
        return "movielens"
    if path.suffix.lower() == ".data":
        return "udata"
    fields = first_line.split("\t")
    if len(fields) >= 3 and all(_is_number(field) for field in fields):
        return "udata"
    return "csv"


def read_ratings_table(path: Path, file_format: Optional[str] = None) -> RatingsTable:
    """Parse a ratings file into columns.

    Args:
        path: the file.
        file_format: one of :data:`RATINGS_FILE_FORMATS`, or ``None`` to detect it.

    Raises:
        DataError: missing / unreadable file, no data lines, or a malformed line.
    """
    if file_format is not None and file_format not in RATINGS_FILE_FORMATS:
        raise ConfigError(
            f"unknown ratings file format {file_format!r}; expected one of {RATINGS_FILE_FORMATS}"
        )
    text = read_text(path)
    first_line = next((line for line in text.splitlines() if line.strip()), None)
    if first_line is None:
        raise DataError(f"{path}: the file is empty")
    file_format = file_format or detect_ratings_format(path, first_line)
    if file_format == "csv":
        return _read_csv_table(path, text)
    return _read_numeric_table(path, text, file_format)


def _read_numeric_table(path: Path, text: str, file_format: str) -> RatingsTable:
    """``ratings.dat`` / ``u.data``: four numeric fields per line, no header."""
    separator = "::" if file_format == "movielens" else "\t"
    if separator == "::" and "\t" in text:  # the tab-separated parse below would accept it
        _raise_first_bad_numeric_line(path, text, separator)
    tab_separated = text.replace("::", "\t") if separator == "::" else text
    try:
        rows = np.loadtxt(
            io.StringIO(tab_separated),
            delimiter="\t",
            comments=None,
            dtype=_NUMERIC_FORMAT_DTYPE,
            ndmin=1,
        )
    except ValueError:
        _raise_first_bad_numeric_line(path, text, separator)
        raise  # _raise_first_bad_numeric_line always raises; kept for type checkers
    if rows["user"].min() < 0 or rows["item"].min() < 0 or not np.isfinite(rows["rating"]).all():
        _raise_first_bad_numeric_line(path, text, separator)
    return RatingsTable(
        users=rows["user"],
        items=rows["item"],
        ratings=rows["rating"],
        timestamps=rows["timestamp"],
        file_format=file_format,
    )


def _raise_first_bad_numeric_line(path: Path, text: str, separator: str) -> None:
    """Find the first malformed line of a headerless numeric file and raise a DataError."""
    shown_separator = "::" if separator == "::" else "<tab>"
    expected = shown_separator.join(("user", "item", "rating", "timestamp"))
    for line_number, line in enumerate(text.splitlines(), start=1):
        problem = _numeric_line_problem(line, separator, expected) if line.strip() else None
        if problem:
            raise DataError(f"{path}: line {line_number}: {problem}: {line[:200]!r}")
    raise DataError(f"{path}: cannot parse the file as '{expected}' lines")


def _numeric_line_problem(line: str, separator: str, expected: str) -> Optional[str]:
    """What is wrong with one line of a headerless numeric file, or ``None``."""
    if separator == "::" and "\t" in line:
        return f"a tab in a '::'-separated line (expected '{expected}')"
    fields = line.strip("\r\n").split(separator)
    if len(fields) != 4:
        return f"expected 4 fields '{expected}', got {len(fields)}"
    try:
        user, item, rating, timestamp = int(fields[0]), int(fields[1]), float(fields[2]), int(fields[3])
    except ValueError:
        return f"expected integer ids, a numeric rating and an integer timestamp ('{expected}')"
    if user < 0 or item < 0:
        return "negative user or item id"
    if max(user, item, abs(timestamp)) > _INT64_MAX:
        return "user id, item id or timestamp beyond the int64 range"
    if not math.isfinite(rating):
        return "the rating is not a finite number"
    return None


def _read_csv_table(path: Path, text: str) -> RatingsTable:
    """A delimited file whose header names the ``user`` and ``item`` (and optional) columns."""
    lines = text.splitlines()
    header_index = next(index for index, line in enumerate(lines) if line.strip())
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in lines[header_index] else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header: Optional[list[str]] = None
    users: list[str] = []
    items: list[str] = []
    ratings: list[float] = []
    timestamps: list[float] = []
    columns: dict[str, int] = {}
    for fields in reader:
        line_number = reader.line_num
        if not fields or all(not field.strip() for field in fields):
            continue
        if header is None:
            header = fields
            columns = _header_columns(path, header)
            continue
        line = delimiter.join(fields)
        if len(fields) != len(header):
            raise DataError(
                f"{path}: line {line_number}: expected {len(header)} fields "
                f"({delimiter.join(header)!r}), got {len(fields)}: {line[:200]!r}"
            )
        user, item = fields[columns["user"]].strip(), fields[columns["item"]].strip()
        if not user or not item:
            raise DataError(f"{path}: line {line_number}: empty user or item id: {line[:200]!r}")
        if _is_negative_integer(user) or _is_negative_integer(item):
            raise DataError(f"{path}: line {line_number}: negative user or item id: {line[:200]!r}")
        users.append(user)
        items.append(item)
        for column, values in (("rating", ratings), ("timestamp", timestamps)):
            if column in columns:
                values.append(_finite_number(path, line_number, column, fields[columns[column]], line))
    if not users:
        raise DataError(f"{path}: no data lines after the header")
    return RatingsTable(
        users=_ids_array(users),
        items=_ids_array(items),
        ratings=np.asarray(ratings, dtype=np.float64) if "rating" in columns else None,
        timestamps=np.asarray(timestamps, dtype=np.float64) if "timestamp" in columns else None,
        file_format="csv",
    )


def _header_columns(path: Path, header: list[str]) -> dict[str, int]:
    """Map ``user`` / ``item`` / ``rating`` / ``timestamp`` to column positions of a header."""
    normalised = [field.strip().lower() for field in header]
    columns: dict[str, int] = {}
    for column, aliases in _COLUMN_ALIASES.items():
        position = next((i for i, field in enumerate(normalised) if field in aliases), None)
        if position is not None:
            columns[column] = position
    if "user" not in columns or "item" not in columns:
        raise DataError(
            f"{path}: line 1: expected a header naming the columns user,item[,rating,timestamp], "
            f"got {','.join(header)[:200]!r}"
        )
    return columns


def _finite_number(path: Path, line_number: int, column: str, field: str, line: str) -> float:
    """``field`` (the ``column`` of a CSV line) as a finite float, else a DataError showing the line."""
    try:
        value = float(field)
    except ValueError:
        raise DataError(f"{path}: line {line_number}: the {column} is not a number: {line[:200]!r}") from None
    if not math.isfinite(value):
        raise DataError(f"{path}: line {line_number}: the {column} is not a finite number: {line[:200]!r}")
    return value


def _is_negative_integer(text: str) -> bool:
    """Whether an id reads as a negative integer (e.g. ``-1``, a common "unknown" marker)."""
    return text.startswith("-") and text[1:].isdigit()


def _ids_array(ids: list[str]) -> np.ndarray:
    """int64 ids when every id is an integer that fits, else the strings (ids are labels)."""
    try:
        return np.asarray([int(i) for i in ids], dtype=np.int64)
    except (ValueError, OverflowError):
        return np.asarray(ids, dtype=str)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _default_name(path: Path) -> str:
    """The file's stem, or its folder's name for generic stems such as ``ratings``."""
    if path.stem.lower() in _GENERIC_FILE_STEMS and path.parent.name:
        return path.parent.name
    return path.stem
