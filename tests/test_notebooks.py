"""The notebooks run top to bottom in quick mode (their own asserts are the checks; a cell error fails)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    # Quick mode: every budget shrinks (seconds, not the full study); figures go to tmp_path, never
    # over the committed full-mode ones.
    monkeypatch.setenv("REFIT_GYM_QUICK", "1")
    monkeypatch.setenv("REFIT_GYM_FIGURES", str(tmp_path / "figures"))
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()


def test_there_is_a_notebook():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


def test_committed_notebooks_carry_no_outputs():
    nbformat = pytest.importorskip("nbformat")
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        filled = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code" and cell.get("outputs")]
        assert not filled, f"{path.name}: cells {filled} carry outputs; strip them before committing"
