"""Run records shared by every training loop: a CSV log, a JSON results file and a curve plot."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional


class CsvLogger:
    """Appends one row per call to ``path``; the header grows to the union of keys seen so far.

    Rows are kept in memory and the whole file is rewritten on each call (logs here are a few
    hundred rows), so a late new column never misaligns earlier rows. When TensorBoard is
    installed (``pip install tensorboard``), numeric columns are also written as scalars to
    ``<folder>/tensorboard``, stepped by the row's first column (``epoch`` or ``update``).
    """

    def __init__(self, path: str | Path, resume: bool = False, tensorboard: bool = True) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if resume and self.path.is_file():
            with self.path.open(newline="") as handle:
                self.rows = list(csv.DictReader(handle))
        self.fields: list[str] = list(self.rows[0].keys()) if self.rows else []
        self.writer = _tensorboard_writer(self.path.parent / "tensorboard") if tensorboard else None

    def log(self, row: dict[str, Any]) -> None:
        if self.writer is not None:
            step_key = next(iter(row))
            for key, value in row.items():
                if key != step_key and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, int(row[step_key]))
            self.writer.flush()
        self.rows.append(row)
        self.fields += [key for key in row if key not in self.fields]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)


def _tensorboard_writer(directory: Path):
    """A ``SummaryWriter`` when TensorBoard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(directory))


def plot_curves(
    rows: Iterable[dict[str, Any]], x: str, ys: list[str], path: str | Path, title: Optional[str] = None
) -> Optional[Path]:
    """Plot columns ``ys`` against ``x`` (one panel each) to a PNG; returns None without matplotlib."""
    return plot_runs({"": list(rows)}, x, ys, path, title)


def plot_runs(
    runs: Mapping[str, Iterable[dict[str, Any]]], x: str, ys: list[str], path: str | Path,
    title: Optional[str] = None,
) -> Optional[Path]:
    """Columns ``ys`` against ``x`` of several runs (one line each, one panel per column) to a PNG.

    A column no run has is left out; returns None without matplotlib or without any column.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = {name: list(rows) for name, rows in runs.items()}
    panels = [y for y in ys if any(row.get(y) not in (None, "") for rows in runs.values() for row in rows)]
    if not panels:
        return None
    columns = min(len(panels), 3)
    lines = -(-len(panels) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.4 * columns, 3.3 * lines), squeeze=False)
    for axis, y in zip(axes.flat, panels):
        for name, rows in runs.items():
            points = [(float(r[x]), float(r[y])) for r in rows if r.get(y) not in (None, "")]
            axis.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name or None)
        axis.set_xlabel(x)
        axis.set_ylabel(y)
        axis.set_title(y)
        axis.grid(alpha=0.3)
        if len(runs) > 1:
            axis.legend(fontsize="small")
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
