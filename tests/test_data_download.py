"""MovieLens-1M download, tested against a fake server (never the network)."""

from __future__ import annotations

import hashlib
import io
import zipfile
from urllib.error import URLError

import pytest

from refit_gym.data import download, download_movielens_1m, load_dataset, load_ratings
from refit_gym.errors import DownloadError


def _ratings_lines() -> str:
    lines = []
    for user in (1, 2, 3):
        items = list(range(1, 11)) if user != 2 else list(range(10, 0, -1))
        lines += [f"{user}::{item}::5::{978300000 + k}" for k, item in enumerate(items)]
    return "\n".join(lines) + "\n"


def _zip_bytes(members: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return buffer.getvalue()


GOOD_ZIP = _zip_bytes(
    {
        "ml-1m/ratings.dat": _ratings_lines(),
        "ml-1m/movies.dat": "".join(f"{i}::Film {i} (2000)::Drama\n" for i in range(1, 11)),
        "ml-1m/README": "GroupLens terms",
        "__MACOSX/ignored": "x",
    }
)


class _FakeResponse(io.BytesIO):
    def __init__(self, payload: bytes) -> None:
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


@pytest.fixture
def serve(monkeypatch):
    """Make download.urlopen serve the given bytes (or raise), recording the calls."""
    calls = []

    def install(payload=None, error=None):
        def fake_urlopen(url, timeout=None):
            calls.append(url)
            if error is not None:
                raise error
            return _FakeResponse(payload)

        monkeypatch.setattr(download, "urlopen", fake_urlopen)
        return calls

    return install


def test_download_unpacks_and_loads(tmp_path, serve):
    calls = serve(GOOD_ZIP)
    ratings = download_movielens_1m(tmp_path, progress=False, expected_md5=hashlib.md5(GOOD_ZIP).hexdigest())
    assert ratings == tmp_path / "ml-1m" / "ratings.dat" and calls == [download.ML_1M_URL]
    assert not (tmp_path / "__MACOSX").exists() and not (tmp_path / "ml-1m.zip.part").exists()
    assert (tmp_path / "ml-1m" / "DOWNLOAD_SHA256").read_text().startswith(hashlib.sha256(GOOD_ZIP).hexdigest())
    data = load_ratings(ratings)
    assert (data.n_users, data.n_items) == (3, 10) and data.item_titles[0] == "Film 1 (2000)"
    assert load_dataset("ml-1m", data_dir=tmp_path).n_users == 3
    # a second call finds the data and does not download again
    assert download_movielens_1m(tmp_path, progress=False) == ratings and len(calls) == 1


def test_checksum_mismatch_unpacks_nothing(tmp_path, serve):
    serve(GOOD_ZIP)
    with pytest.raises(DownloadError, match="MD5 mismatch"):
        download_movielens_1m(tmp_path, progress=False)  # the real ML-1M MD5 does not match
    assert not (tmp_path / "ml-1m").exists() and not (tmp_path / "ml-1m.zip.part").exists()
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        download_movielens_1m(tmp_path, progress=False, expected_md5=None, expected_sha256="00" * 32)


def test_offline_error_says_which_file_to_place_where(tmp_path, serve):
    serve(error=URLError("no route to host"))
    with pytest.raises(DownloadError) as error:
        download_movielens_1m(tmp_path, progress=False)
    message = str(error.value)
    assert "ml-1m.zip" in message and str(tmp_path / "ml-1m" / "ratings.dat") in message
    assert "no route to host" in message


def test_bad_archives(tmp_path, serve):
    serve(b"this is not a zip")
    with pytest.raises(DownloadError, match="not a valid zip"):
        download_movielens_1m(tmp_path, progress=False, expected_md5=None)
    serve(_zip_bytes({"ml-1m/README": "no ratings here"}))
    with pytest.raises(DownloadError, match="no ml-1m/ratings.dat"):
        download_movielens_1m(tmp_path / "b", progress=False, expected_md5=None)
    serve(_zip_bytes({"ml-1m/../escaped.txt": "x", "ml-1m/ratings.dat": _ratings_lines()}))
    with pytest.raises(DownloadError, match="unsafe member path"):
        download_movielens_1m(tmp_path / "c", progress=False, expected_md5=None)
    assert not (tmp_path / "escaped.txt").exists()


def test_published_checksum_is_recorded():
    assert download.ML_1M_MD5 == "c4d9eecfca2ab87c1945afe126590906"
    assert download.ML_1M_URL == "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
