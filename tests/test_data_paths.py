"""Data directory resolution and dataset lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

from refit_gym.data import find_dataset, resolve_data_dir
from refit_gym.errors import DataError


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("REFIT_GYM_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_explicit_argument_wins_over_env(clean_env, tmp_path):
    clean_env.setenv("REFIT_GYM_DATA", str(tmp_path / "from_env"))
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_data_dir(str(tmp_path / "explicit")) == tmp_path / "explicit"


def test_env_var_wins_over_cache(clean_env, tmp_path):
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    clean_env.setenv("REFIT_GYM_DATA", str(tmp_path / "from_env"))
    assert resolve_data_dir() == tmp_path / "from_env"


def test_xdg_cache_home_then_home_cache(clean_env, tmp_path):
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir() == tmp_path / "xdg" / "refit_gym" / "data"
    clean_env.delenv("XDG_CACHE_HOME")
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "refit_gym" / "data"
    clean_env.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec ignores relative paths
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "refit_gym" / "data"
    assert not (tmp_path / "home").exists()  # resolving never creates the directory


def test_find_dataset_existing_path_then_name(clean_env, tmp_path):
    folder = tmp_path / "data" / "my_set"
    folder.mkdir(parents=True)
    assert find_dataset(folder) == folder
    assert find_dataset("my_set", data_dir=tmp_path / "data") == tmp_path / "data" / "my_set"
    clean_env.setenv("REFIT_GYM_DATA", str(tmp_path / "data"))
    assert find_dataset("my_set") == tmp_path / "data" / "my_set"


def test_missing_dataset_message_says_what_was_searched_and_what_to_set(clean_env, tmp_path):
    with pytest.raises(DataError) as error:
        find_dataset("diffrec_ml-1m_clean", data_dir=tmp_path)
    message = str(error.value)
    assert "diffrec_ml-1m_clean" in message
    assert str(Path(tmp_path) / "diffrec_ml-1m_clean") in message
    assert "REFIT_GYM_DATA" in message and "--set data.data_dir=DIR" in message
    assert "refit-gym download ml-1m" in message
