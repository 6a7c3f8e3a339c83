"""Checkpoints: a folder with the denoiser's weights (safetensors) and a JSON description.

Layout of a checkpoint directory::

    model.safetensors   the denoiser's state_dict (no pickle: loading never runs code)
    config.json         the experiment config, the base model's name and shape, the data summary,
                        the seed and package versions
    metrics.json        (optional) the metrics measured when it was saved

Files are written to a temporary name and renamed, so an interrupted save never leaves a
half-written checkpoint behind and never destroys the previous one.
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
from refit_gym.models import build_model
from refit_gym.models.base import DiffusionRecommender, check_data_matches

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


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` via a temporary file and an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def save_checkpoint(
    directory: str | Path,
    model: DiffusionRecommender,
    config: ExperimentConfig,
    data: InteractionData,
    metrics: Optional[dict[str, Any]] = None,
    extra: Optional[dict[str, Any]] = None,
) -> Path:
    """Save ``model`` (weights + config) so that :func:`load_checkpoint` rebuilds it exactly."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.denoiser.state_dict().items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, directory / WEIGHTS_FILE)
    description = {
        "format": "refit-gym-checkpoint/1",
        "model_name": model.model_name,
        "model_shape": model.config,
        "experiment": config.to_dict(),
        "data": data.summary(),
        "versions": package_versions(),
        **(extra or {}),
    }
    write_json_atomic(directory / CONFIG_FILE, description)
    if metrics is not None:
        write_json_atomic(directory / METRICS_FILE, metrics)
    return directory


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a refit-gym checkpoint: {CONFIG_FILE} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None


def load_checkpoint(
    directory: str | Path,
    data: InteractionData,
    device: torch.device | str = "cpu",
) -> tuple[DiffusionRecommender, ExperimentConfig]:
    """Rebuild the model saved in ``directory`` for ``data`` and load its weights (no unpickling)."""
    directory = Path(directory)
    description = read_checkpoint_config(directory)
    config = config_from_dict(description["experiment"])
    check_data_matches(description.get("model_shape", {}), data)
    model = build_model(config.model, config.diffusion, data, device="cpu")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS_FILE} is missing")
    try:
        state = load_file(str(weights))
        model.denoiser.load_state_dict(state, strict=True)
    except (RuntimeError, OSError) as error:
        raise CheckpointError(f"{weights} does not match the model in {CONFIG_FILE}: {error}") from None
    model.eval()
    return model.to(device), config
