"""Run folders: what a training command may do with its ``--output`` folder, and the record of its state.

A run folder holds ``run.json``: the kind of run (``pretrain``, ``finetune``, ``run``), its whole
config, and its status (``running`` until the run ends, then ``finished``). A run killed
mid-way keeps ``running``: :func:`run_status` reports it as unfinished, and ``refit-gym
evaluate`` says so. The rules, checked before any work starts:

* a folder that already holds a run is refused unless ``resume`` (continue it: the config must
  be the same, the differences are named) or ``overwrite`` (replace it);
* ``resume`` on a folder that holds no run is refused (there is nothing to continue);
* a non-empty folder that holds no refit-gym run is never overwritten (it may be anything).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from refit_gym.errors import ConfigError

RUN_FILE = "run.json"
IGNORED_DIFFERENCES = ("device",)
"""Config keys a resumed run may change (the hardware it runs on)."""


def _write(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_run(folder: str | Path) -> Optional[dict[str, Any]]:
    """The folder's ``run.json``, or ``None`` when it holds no run."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); the folder's run record is damaged") from None


def run_status(folder: str | Path) -> Optional[str]:
    """``"finished"``, ``"running"`` (interrupted, or still going) or ``None`` (no run record)."""
    record = read_run(folder)
    return None if record is None else record.get("status")


def config_differences(saved: Any, given: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings, as ``key: saved -> given``."""
    if isinstance(saved, dict) and isinstance(given, dict):
        out = []
        for key in sorted(set(saved) | set(given)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved:
                out.append(f"{name}: (absent) -> {given[key]!r}")
            elif key not in given:
                out.append(f"{name}: {saved[key]!r} -> (absent)")
            else:
                out.extend(config_differences(saved[key], given[key], name))
        return out
    return [] if saved == given else [f"{prefix}: {saved!r} -> {given!r}"]


@dataclass
class RunFolder:
    """A run folder claimed by one run (see the module docstring)."""

    path: Path
    kind: str
    config: dict[str, Any]
    resumed: bool
    finished: bool = False
    """``resume`` of a run that had already finished: there is nothing to do (the caller returns
    its results)."""

    @classmethod
    def claim(cls, path: str | Path, kind: str, config: dict[str, Any], resume: bool = False,
              overwrite: bool = False, distributed: Any = None, inputs: tuple = ()) -> "RunFolder":
        """Check the rules for ``path`` and write its ``run.json`` (status ``running``).

        Data-parallel (``distributed``, a :class:`~refit_gym.training.distributed.Distributed`),
        rank 0 claims the folder and every rank gets its verdict, or the same error. ``inputs``
        are paths the run reads (a pretrained checkpoint): ``overwrite`` never deletes one of them.

        Raises:
            ConfigError: the folder holds a run and neither ``resume`` nor ``overwrite`` is
                given; ``resume`` with a different kind or config (the differences are named)
                or with no run to resume; ``overwrite`` of a folder that holds no refit-gym run.
        """
        if distributed is not None and distributed.active:
            outcome: Any = None
            if distributed.main:
                try:
                    outcome = cls.claim(path, kind, config, resume, overwrite, inputs=inputs)
                except ConfigError as error:
                    outcome = error
            outcome = distributed.broadcast_object(outcome)
            if isinstance(outcome, ConfigError):
                raise outcome
            return outcome
        path, config, record = cls.check(path, kind, config, resume, overwrite, inputs)
        if overwrite and record is not None:
            for child in path.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        path.mkdir(parents=True, exist_ok=True)
        started = record.get("started") if (resume and record) else time.strftime("%Y-%m-%d %H:%M:%S")
        finished = bool(resume and record and record.get("status") == "finished")
        if finished:  # a kill after finishing but before the state was deleted leaves it behind
            for leftover in ("training_state", "trainer_state"):
                shutil.rmtree(path / leftover, ignore_errors=True)
        folder = cls(path, kind, config, bool(resume and record), finished)
        if not finished:
            folder._record("running", started=started)
        return folder

    @staticmethod
    def check(path: str | Path, kind: str, config: dict[str, Any], resume: bool = False, overwrite: bool = False,
              inputs: tuple = ()) -> tuple[Path, dict[str, Any], Optional[dict[str, Any]]]:
        """The checks of :meth:`claim`, writing nothing (for a command to fail before any work).

        Returns ``(path, the JSON-normalised config, the existing run record or None)``.
        """
        path = Path(path)
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        config = json.loads(json.dumps(config, default=str))
        record = read_run(path)
        occupied = path.is_dir() and any(path.iterdir())
        if record is None and resume:
            raise ConfigError(f"nothing to resume in {path}: it holds no run ({RUN_FILE} is missing); "
                              "drop --resume to start a new run there")
        if record is not None and resume:
            if record.get("kind") != kind:
                raise ConfigError(f"{path} holds a {record.get('kind')} run, not a {kind} run: it cannot be resumed "
                                  "by this command")
            differences = [d for d in config_differences(record.get("config", {}), config)
                           if d.split(":")[0] not in IGNORED_DIFFERENCES]
            if differences:
                raise ConfigError(f"cannot resume {path} with a different config: " + "; ".join(differences)
                                  + " (resume with the same config, or pass --overwrite to start again)")
        elif record is not None and not overwrite:
            raise ConfigError(f"{path} already holds a {record.get('status', 'unknown')} {record.get('kind')} run "
                              f"(started {record.get('started', '?')}); pass --resume to continue it or --overwrite "
                              "to replace it")
        elif record is not None and overwrite:
            if record.get("kind") != kind:
                raise ConfigError(f"{path} holds a {record.get('kind')} run: --overwrite replaces only a {kind} run "
                                  "(choose another folder)")
            resolved = path.resolve()
            for used in inputs:
                if used is not None and (Path(used).resolve() == resolved or resolved in Path(used).resolve().parents):
                    raise ConfigError(f"--overwrite would delete {used}, which this run reads; choose another --output")
        elif occupied and record is None:
            raise ConfigError(f"{path} is not empty and holds no refit-gym run; choose an empty or new folder "
                              "(it is never overwritten)")
        return path, config, record

    def _record(self, status: str, **extra: Any) -> None:
        previous = read_run(self.path) or {}
        _write(self.path / RUN_FILE, {**previous, "kind": self.kind, "config": self.config, "status": status,
                                      "updated": time.strftime("%Y-%m-%d %H:%M:%S"), **extra})

    def finish(self, **summary: Any) -> None:
        """Mark the run finished (with a summary of how it ended)."""
        self._record("finished", **summary)


__all__ = ["RUN_FILE", "RunFolder", "config_differences", "read_run", "run_status"]
