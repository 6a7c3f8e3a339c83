"""Downloading MovieLens-1M from GroupLens (the only dataset refit-gym fetches itself).

MovieLens may not be redistributed (GroupLens terms), so refit-gym never ships it: the user
downloads the official archive, which this module does with a checksum check.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from typing import Optional, Union
from urllib.error import URLError
from urllib.request import urlopen

from refit_gym.progress import progress as progress_bar

from refit_gym.data.paths import resolve_data_dir
from refit_gym.errors import DownloadError

ML_1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
ML_1M_MD5 = "c4d9eecfca2ab87c1945afe126590906"
"""The MD5 GroupLens publishes next to ``ml-1m.zip`` (``ml-1m.zip.md5``); this is what is
verified. GroupLens publishes no SHA-256, and we could not compute one offline, so
:data:`ML_1M_SHA256` is ``None``; the SHA-256 of the downloaded archive is computed anyway and
written to ``ml-1m/DOWNLOAD_SHA256`` so that a pinned value can be added later."""
ML_1M_SHA256: Optional[str] = None
ML_1M_FOLDER = "ml-1m"
_CHUNK_BYTES = 1 << 16


def download_movielens_1m(
    data_dir: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
    url: str = ML_1M_URL,
    expected_md5: Optional[str] = ML_1M_MD5,
    expected_sha256: Optional[str] = ML_1M_SHA256,
    timeout: float = 60.0,
) -> Path:
    """Download and unpack MovieLens-1M into ``<data_dir>/ml-1m/``.

    Nothing is downloaded when ``<data_dir>/ml-1m/ratings.dat`` already exists. Afterwards
    ``load_ratings(<data_dir>/ml-1m/ratings.dat)`` (or ``load_dataset("ml-1m")``) works.

    Args:
        data_dir: where to put the data; ``None`` resolves it with
            :func:`~refit_gym.data.paths.resolve_data_dir`. Created if missing.
        progress: show a tqdm progress bar.
        url: the archive's address (the official GroupLens one by default).
        expected_md5: the archive's MD5 (GroupLens' published value by default); ``None``
            skips the MD5 check (tests serving their own archive pass theirs).
        expected_sha256: the archive's SHA-256, checked when given.
        timeout: seconds to wait for the server.

    Returns:
        The path of ``ratings.dat``.

    Raises:
        DownloadError: no network or an HTTP error (the message says which file to place
            where to proceed offline), a checksum mismatch, or an archive without
            ``ml-1m/ratings.dat``.
    """
    target_dir = resolve_data_dir(data_dir)
    ratings_file = target_dir / ML_1M_FOLDER / "ratings.dat"
    if ratings_file.is_file():
        return ratings_file
    target_dir.mkdir(parents=True, exist_ok=True)
    partial_archive = target_dir / "ml-1m.zip.part"
    try:
        md5, sha256 = _fetch(url, partial_archive, progress, timeout, target_dir)
        if expected_md5 is not None and md5 != expected_md5.lower():
            raise DownloadError(
                f"{url}: MD5 mismatch (expected {expected_md5}, got {md5}); the download is "
                f"corrupt or the file changed. Nothing was unpacked."
            )
        if expected_sha256 is not None and sha256 != expected_sha256.lower():
            raise DownloadError(
                f"{url}: SHA-256 mismatch (expected {expected_sha256}, got {sha256}); nothing "
                f"was unpacked."
            )
        _unpack_ml_1m(partial_archive, target_dir)
    finally:
        partial_archive.unlink(missing_ok=True)
    if not ratings_file.is_file():
        raise DownloadError(f"{url}: the archive holds no {ML_1M_FOLDER}/ratings.dat")
    (ratings_file.parent / "DOWNLOAD_SHA256").write_text(f"{sha256}  ml-1m.zip\n")
    return ratings_file


def _fetch(url: str, destination: Path, progress: bool, timeout: float, target_dir: Path) -> tuple[str, str]:
    """Stream ``url`` into ``destination``; return its MD5 and SHA-256 hex digests."""
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    try:
        with urlopen(url, timeout=timeout) as response, destination.open("wb") as output:
            length = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
            with progress_bar(
                total=int(length) if length else None,
                unit="B",
                unit_scale=True,
                desc="ml-1m.zip",
                enabled=progress,
            ) as bar:
                while chunk := response.read(_CHUNK_BYTES):
                    output.write(chunk)
                    md5.update(chunk)
                    sha256.update(chunk)
                    bar.update(len(chunk))
    except (URLError, OSError, ValueError) as error:
        raise DownloadError(
            f"could not download {url} ({error}). Without network access, download "
            f"ml-1m.zip elsewhere and unzip it so that {target_dir / ML_1M_FOLDER / 'ratings.dat'} "
            f"exists (or set REFIT_GYM_DATA / --data to a folder holding ml-1m/ratings.dat)."
        ) from error
    return md5.hexdigest(), sha256.hexdigest()


def _unpack_ml_1m(archive: Path, target_dir: Path) -> None:
    """Extract the ``ml-1m/`` members of the archive into ``target_dir`` (no path escapes)."""
    try:
        with zipfile.ZipFile(archive) as zip_file:
            for member in zip_file.infolist():
                member_path = PurePosixPath(member.filename)
                if member.is_dir() or member_path.parts[:1] != (ML_1M_FOLDER,):
                    continue
                if member_path.is_absolute() or ".." in member_path.parts:
                    raise DownloadError(f"{archive}: refusing the unsafe member path {member.filename!r}")
                destination = target_dir.joinpath(*member_path.parts)
                destination.parent.mkdir(parents=True, exist_ok=True)
                with zip_file.open(member) as source, destination.open("wb") as output:
                    shutil.copyfileobj(source, output)
    except zipfile.BadZipFile as error:
        raise DownloadError(f"{archive}: not a valid zip archive ({error})") from error
