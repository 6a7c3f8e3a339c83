"""Shared fixtures: a small synthetic dataset and the real-data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from refit_gym.data import InteractionData, make_synthetic, resolve_data_dir

DEFAULT_REAL_DATASETS = ("diffrec_ml-1m_clean",)


@pytest.fixture
def synthetic_data() -> InteractionData:
    """The default synthetic dataset (500 users x 300 items, seed 0); fast and offline."""
    return make_synthetic(seed=0)


@pytest.fixture
def real_data_dir(request: pytest.FixtureRequest) -> Path:
    """The data directory holding the real datasets a test needs.

    The datasets are the ``real_data`` marker's arguments
    (``@pytest.mark.real_data("diffurec_ml-1m")``), by default ``diffrec_ml-1m_clean``.
    When one is missing the test fails if the environment variable ``CI`` is ``"true"``
    and is skipped otherwise.
    """
    marker = request.node.get_closest_marker("real_data")
    names = tuple(marker.args) if marker is not None and marker.args else DEFAULT_REAL_DATASETS
    data_dir = resolve_data_dir()
    missing = [name for name in names if not (data_dir / name).exists()]
    if missing:
        message = (
            f"real dataset(s) {', '.join(missing)} not found in {data_dir}; "
            f"set REFIT_GYM_DATA to the folder holding them (e.g. ../shared/data)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return data_dir
