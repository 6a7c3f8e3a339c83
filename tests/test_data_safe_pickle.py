"""The builtin-only unpickler refuses class references and runs nothing."""

from __future__ import annotations

import collections
import os
import pickle

import pytest

from refit_gym.data.safe_pickle import load_builtin_pickle
from refit_gym.errors import DataError


class _WritesMarkerWhenUnpickled:
    """Unpickling this calls os.system; a safe loader must refuse before calling it."""

    def __init__(self, marker_path: str) -> None:
        self.marker_path = marker_path

    def __reduce__(self):
        return (os.system, (f"touch {self.marker_path}",))


def test_builtin_values_load(tmp_path):
    value = {"train": {0: [1, 2, 3]}, "smap": {10: 1}, "t": (1.5, None, True, "x", b"y")}
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(value, protocol=4))
    assert load_builtin_pickle(path) == value


def test_class_reference_is_refused_with_file_and_class_named(tmp_path):
    path = tmp_path / "ordered.pkl"
    path.write_bytes(pickle.dumps(collections.OrderedDict(a=1)))
    with pytest.raises(DataError) as error:
        load_builtin_pickle(path)
    assert "ordered.pkl" in str(error.value)
    assert "collections" in str(error.value) and "OrderedDict" in str(error.value)


def test_reduce_payload_is_not_executed(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_WritesMarkerWhenUnpickled(str(marker))))
    with pytest.raises(DataError) as error:
        load_builtin_pickle(path)
    assert "evil.pkl" in str(error.value) and "system" in str(error.value)
    assert not marker.exists()


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match="absent.pkl.*not found"):
        load_builtin_pickle(tmp_path / "absent.pkl")
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(pickle.dumps({"a": list(range(100))})[:20])
    with pytest.raises(DataError, match="truncated.pkl.*not a valid pickle"):
        load_builtin_pickle(truncated)
