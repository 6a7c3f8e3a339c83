"""Checkpoints: a folder with a base model's trainable state (safetensors) and a JSON description.

Layout of a checkpoint directory::

    model.safetensors   the model's ``state_dict()``: every trainable tensor (denoiser, item
                        embeddings, encoders); no pickle, so loading never runs code
    config.json         the experiment config (the model section names the model class), the
                        model's shape, the data summary, the seed and package versions
    metrics.json        (optional) the metrics measured when it was saved

Each file is written to a temporary name and renamed, so no file is ever half-written and a
failed write keeps the previous one. ``config.json`` records the SHA-256 of the weights it
describes. A save writes the new weights and the new description in full (``*.tmp``) before it
renames either, then renames the weights, then the description, then writes the metrics. A save
killed between the two renames leaves the new weights beside ``config.json.tmp``, which
describes them: reading the checkpoint then takes that pending description (so the pair always
matches), and the next save renames it into place before it writes anything; any other pair
that does not match is refused, naming it. The metrics of such a checkpoint may be those of the
previous save.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from refit_gym.config import ExperimentConfig, config_from_dict
from refit_gym.data.interactions import InteractionData
from refit_gym.errors import CheckpointError
from refit_gym.models import BaseModel, build_model

FORMAT = "refit-gym-checkpoint/2"
"""Version 2 saves the whole model's ``state_dict``; version 1 saved DiffRec's denoiser alone
(its keys without the ``denoiser.`` prefix), which :func:`load_checkpoint` still reads."""
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on, for the run record."""
    import gymnasium
    import numpy
    import scipy

    import refit_gym

    return {
        "refit_gym": refit_gym.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "gymnasium": gymnasium.__version__,
    }


def json_text(payload: Any) -> str:
    """The JSON text the project writes (indented, sorted keys, ``str`` for other objects)."""
    return json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` via a temporary file and an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json_text(payload))
    os.replace(tmp, path)


def check_data_matches(model_shape: dict[str, Any], data: InteractionData, where: str = "the model") -> None:
    """Raise ``CheckpointError`` if a recorded model shape differs from the data it is used with."""
    expected = (model_shape.get("n_users"), model_shape.get("n_items"))
    if expected != (data.n_users, data.n_items):
        raise CheckpointError(
            f"{where} was built for {expected[0]} users x {expected[1]} items but the data "
            f"{data.name!r} has {data.n_users} x {data.n_items}"
        )


def save_checkpoint(
    directory: str | Path,
    model: BaseModel,
    config: ExperimentConfig,
    data: InteractionData,
    metrics: Optional[dict[str, Any]] = None,
    extra: Optional[dict[str, Any]] = None,
) -> Path:
    """Save ``model`` (weights + config) so that :func:`load_checkpoint` rebuilds it exactly."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _finish_an_interrupted_save(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    digest = _sha256(tmp)
    description = {
        "weights_sha256": digest,
        "format": FORMAT,
        "model_name": model.name,
        "model_shape": model.describe(),
        "experiment": config.to_dict(),
        "data": data.summary(),
        "versions": package_versions(),
        **(extra or {}),
    }
    pending = _pending_description(directory)
    pending.write_text(json_text(description))
    os.replace(tmp, directory / WEIGHTS_FILE)  # from here until the next rename, `pending` describes the weights
    os.replace(pending, directory / CONFIG_FILE)
    if metrics is not None:
        write_json_atomic(directory / METRICS_FILE, metrics)
    return directory


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; ``CheckpointError`` when it is truncated or corrupted."""
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError)
        raise CheckpointError(f"{path} is truncated or corrupted and cannot be read "
                              f"({type(error).__name__}: {error})") from None


def _pending_description(directory: Path) -> Path:
    """Where a save writes the new ``config.json`` before renaming it (``write_json_atomic``'s temporary name)."""
    return directory / (CONFIG_FILE + ".tmp")


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory: the description of the weights it holds.

    When a save was killed after renaming the weights but before renaming their description,
    the pending description (``config.json.tmp``) is the one whose digest matches the weights,
    and it is returned instead (the checkpoint is read, never repaired, here).
    """
    directory = Path(directory)
    path = directory / CONFIG_FILE
    description = _read_json(path) if path.is_file() else None
    pending = _pending_for_the_weights(directory, description)
    if pending is not None:
        return pending
    if description is None:
        inside = sorted(str(p.parent) for p in directory.glob(f"*/{CONFIG_FILE}")) if directory.is_dir() else []
        hint = f"; the checkpoints inside it are {', '.join(inside)}" if inside else ""
        raise CheckpointError(f"{directory} is not a refit-gym checkpoint: {CONFIG_FILE} is missing{hint}")
    return description


def _pending_for_the_weights(directory: Path, description: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The pending description when it, and not ``description``, matches the weights; else ``None``."""
    pending, weights = _pending_description(directory), directory / WEIGHTS_FILE
    if not (pending.is_file() and weights.is_file()):
        return None
    try:
        newer = json.loads(pending.read_text())
    except json.JSONDecodeError:  # killed while writing it: the weights were not renamed yet
        return None
    digest = newer.get("weights_sha256")
    if digest is None or (description is not None and description.get("weights_sha256") == digest):
        return None
    return newer if _sha256(weights) == digest else None


def _finish_an_interrupted_save(directory: Path) -> None:
    """Rename a pending description that is the only one matching the weights into place, before
    a new save overwrites it (else a second save killed early would leave no matching pair)."""
    path = directory / CONFIG_FILE
    try:
        description = _read_json(path) if path.is_file() else None
    except CheckpointError:  # an unreadable config.json is replaced by the save anyway
        description = None
    if _pending_for_the_weights(directory, description) is not None:
        os.replace(_pending_description(directory), path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None


def load_checkpoint(
    directory: str | Path,
    data: InteractionData,
    device: torch.device | str = "cpu",
) -> tuple[BaseModel, ExperimentConfig]:
    """Rebuild the model saved in ``directory`` for ``data`` and load its weights (no unpickling)."""
    directory = Path(directory)
    description = read_checkpoint_config(directory)
    config = config_from_dict(description["experiment"])
    check_data_matches(description.get("model_shape", {}), data, where=f"the checkpoint {directory}")
    with torch.random.fork_rng(devices=[]):  # the weights are overwritten: loading leaves the caller's RNG alone
        model = build_model(config.model, config.diffusion, data, device="cpu")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS_FILE} is missing")
    expected_digest = description.get("weights_sha256")
    if expected_digest is not None and _sha256(weights) != expected_digest:
        raise CheckpointError(f"{weights} is not the file {CONFIG_FILE} describes (a save interrupted between the two?); "
                              "resume the run that wrote it (--resume), or use another checkpoint")
    state = read_weights(weights)
    if description.get("format") == "refit-gym-checkpoint/1":  # DiffRec's denoiser alone
        state = {f"denoiser.{key}": value for key, value in state.items()}
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        problems = [f"{len(keys)} {what} (first: {keys[0]})" for keys, what in
                    ((missing, "missing tensor(s)"), (unexpected, "unexpected tensor(s)"),
                     (reshaped, "tensor(s) of another shape")) if keys]
        raise CheckpointError(f"{weights} does not match the {model.name} model that {CONFIG_FILE} describes: "
                              + "; ".join(problems) + " (weights of another model or of another config?)")
    model.load_state_dict(state, strict=True)
    model.eval()
    return model.to(device), config
