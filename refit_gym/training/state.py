"""Crash-safe training state: snapshots that a killed run resumes from, exactly.

A snapshot is a folder ``<state dir>/step-<n>/`` holding the tensors (``tensors.safetensors``:
weights, RNG states...), the optimiser state (``optimizer.pt``, read back with
``weights_only=True``) and the counters (``meta.json``). It is written completely first, then
``latest.json`` is switched to it with an atomic rename, then older snapshots are deleted. A
process killed at any moment (SIGKILL included) leaves either the previous snapshot or the new
one as ``latest``, never a mix of the two.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from refit_gym.errors import CheckpointError

LATEST = "latest.json"


def save_snapshot(directory: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                  optimizer: Optional[dict[str, Any]] = None) -> Path:
    """Write snapshot ``step`` and make it the latest (see the module docstring)."""
    directory = Path(directory)
    target = directory / f"step-{step}"
    staging = directory / f".step-{step}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / "tensors.safetensors"))
    if optimizer is not None:
        torch.save(optimizer, staging / "optimizer.pt")
    (staging / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    pointer = directory / (LATEST + ".tmp")
    pointer.write_text(json.dumps({"snapshot": target.name}))
    os.replace(pointer, directory / LATEST)
    for old in directory.iterdir():
        if old.is_dir() and old.name != target.name:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_snapshot(directory: str | Path) -> Optional[tuple[dict[str, torch.Tensor], dict[str, Any], Optional[dict]]]:
    """``(tensors, meta, optimizer state)`` of the latest snapshot, or ``None`` when there is none."""
    directory = Path(directory)
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    try:
        folder = directory / json.loads(pointer.read_text())["snapshot"]
        tensors = load_file(str(folder / "tensors.safetensors"))
        meta = json.loads((folder / "meta.json").read_text())
        optimizer_file = folder / "optimizer.pt"
        optimizer = torch.load(optimizer_file, weights_only=True) if optimizer_file.is_file() else None
    except Exception as error:  # a damaged snapshot must be named, not half-loaded
        raise CheckpointError(f"the training state in {directory} cannot be read ({type(error).__name__}: {error}); "
                              "start again with --overwrite") from None
    return tensors, meta, optimizer


def rng_tensors(prefix: str = "rng") -> dict[str, torch.Tensor]:
    """The global torch RNG states (CPU, and CUDA when available) as tensors."""
    out = {f"{prefix}.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"{prefix}.cuda{index}"] = state
    return out


def restore_rng(tensors: dict[str, torch.Tensor], prefix: str = "rng") -> None:
    torch.set_rng_state(tensors[f"{prefix}.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith(f"{prefix}.cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


__all__ = ["LATEST", "load_snapshot", "restore_rng", "rng_tensors", "save_snapshot"]
