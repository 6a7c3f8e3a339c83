"""Where refit-gym looks for datasets: the data directory and a dataset's path inside it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from refit_gym.errors import DataError

DATA_DIR_ENV_VAR = "REFIT_GYM_DATA"
"""Environment variable naming the data directory (e.g. ``../shared/data`` in CI)."""

PathLike = Union[str, os.PathLike]


def default_cache_data_dir() -> Path:
    """The per-user default data directory: ``$XDG_CACHE_HOME/refit_gym/data``.

    ``XDG_CACHE_HOME`` is honoured when it is set to an absolute path (as the XDG spec asks);
    otherwise ``~/.cache/refit_gym/data``. The directory is not created.
    """
    xdg_cache_home = os.environ.get("XDG_CACHE_HOME", "")
    if xdg_cache_home and os.path.isabs(xdg_cache_home):
        cache_root = Path(xdg_cache_home)
    else:
        cache_root = Path.home() / ".cache"
    return cache_root / "refit_gym" / "data"


def resolve_data_dir(explicit: Optional[PathLike] = None) -> Path:
    """The data directory, chosen in this order.

    1. ``explicit`` (the config's ``data.data_dir``, the CLI's ``--data-dir``) when given;
    2. the environment variable ``REFIT_GYM_DATA`` when set and non-empty;
    3. the user cache directory (:func:`default_cache_data_dir`).

    Args:
        explicit: a directory given by the caller; ``None`` to fall through to the next rule.

    Returns:
        The directory, with ``~`` expanded. It is not created and may not exist.
    """
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV_VAR, "")
    if from_env:
        return Path(from_env).expanduser()
    return default_cache_data_dir()


def find_dataset(name_or_path: PathLike, data_dir: Optional[PathLike] = None) -> Path:
    """The path of a dataset given by name or by path.

    Args:
        name_or_path: an existing file or folder (used as is), or a dataset name such as
            ``"diffrec_ml-1m_clean"`` looked up as ``<data dir>/<name>``.
        data_dir: the data directory to look names up in; ``None`` resolves it with
            :func:`resolve_data_dir` (``REFIT_GYM_DATA``, then the user cache directory).

    Returns:
        The existing path.

    Raises:
        DataError: neither the path as given nor ``<data dir>/<name>`` exists; the message
            lists what was searched and how to point refit-gym at the data.
    """
    as_given = Path(name_or_path).expanduser()
    if as_given.exists():
        return as_given
    resolved_dir = resolve_data_dir(data_dir)
    in_data_dir = resolved_dir / str(name_or_path)
    if in_data_dir.exists():
        return in_data_dir
    if data_dir is not None and str(data_dir) != "":
        dir_origin = "given explicitly"
    elif os.environ.get(DATA_DIR_ENV_VAR, ""):
        dir_origin = f"from ${DATA_DIR_ENV_VAR}"
    else:
        dir_origin = f"the default; ${DATA_DIR_ENV_VAR} is not set"
    raise DataError(
        f"dataset {str(name_or_path)!r} not found: searched the path {str(as_given)!r} and "
        f"{str(in_data_dir)!r} (data directory {str(resolved_dir)!r}, {dir_origin}). "
        f"Point refit-gym at the folder holding the datasets with ${DATA_DIR_ENV_VAR}=DIR or "
        f"--set data.data_dir=DIR, give the dataset's own path, or fetch MovieLens-1M with "
        f"`refit-gym download ml-1m`."
    )


def read_text(path: Path, encoding: str = "latin-1") -> str:
    """A data file's text; a missing, unreadable or folder path raises :class:`DataError` naming it."""
    try:
        return Path(path).read_text(encoding=encoding)
    except FileNotFoundError as error:
        raise DataError(f"{path}: file not found") from error
    except IsADirectoryError as error:
        raise DataError(f"{path}: is a folder, expected a file") from error
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error})") from error
