"""Experiment configuration: typed dataclasses read from YAML.

Every field carries its documentation right under it, so the YAML files in ``configs/`` and
this module are the same object. Unknown keys are errors (a typo never silently falls back to a
default). Sections that later components own (``env``, ``finetune``) are kept as plain mappings
here and validated by their owners.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from refit_gym.errors import ConfigError


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    """A dataset name under the data directory (``diffrec_ml-1m_clean``), a path (DiffRec split
    folder, ratings file, CSV, sequence pickle) or ``synthetic[:key=value,...]``."""
    data_dir: Optional[str] = None
    """Data directory; default ``$REFIT_GYM_DATA``, then the user cache directory."""


def _model_section(values: Any) -> Any:
    """The typed ``model`` section: its ``name`` picks the base model's own config dataclass."""
    from refit_gym.models.base import model_config

    return model_config(values)


@dataclass
class DiffusionConfig:
    steps: int = 40
    """Number of diffusion steps T."""
    noise_schedule: str = "linear-var"
    """``linear-var`` (DiffRec), ``linear``, ``cosine``, ``binomial``, ``trunc-lin`` (DiffuRec) or ``exp`` (DreamRec)."""
    noise_scale: float = 0.005
    """Scale of the linear schedules."""
    noise_min: float = 0.005
    """Start of the linear schedules (times noise_scale)."""
    noise_max: float = 0.01
    """End of the linear schedules (times noise_scale)."""
    mean_type: str = "x0"
    """What the denoiser predicts: ``x0`` or ``eps``."""
    beta_fixed: bool = True
    """Overwrite beta_0 with 1e-5 (DiffRec)."""
    reweight: bool = True
    """SNR-difference loss weights (DiffRec)."""
    timestep_sampling: str = "importance"
    """``importance`` (DiffRec's loss-aware sampling) or ``uniform``."""
    noise_steps: int = 0
    """Inference starts from the history row noised to this step; 0 = un-noised (DiffRec's
    ``sampling_steps``, 0 in all its reported results)."""


@dataclass
class PretrainConfig:
    lr: float = 1e-3
    """AdamW learning rate at the start."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 400
    """Users per batch."""
    max_epochs: int = 300
    """Hard cap on epochs."""
    eval_every: int = 5
    """Validate every this many epochs."""
    min_epochs: int = 20
    """Never stop before this many epochs."""
    plateau_patience: int = 2
    """Evaluations without a new best validation score before the learning rate decays (and,
    after the last decay, before training stops)."""
    lr_decay: float = 0.1
    """Factor applied to the learning rate on a plateau."""
    max_lr_decays: int = 2
    """Number of decays before a plateau stops training (1e-3 -> 1e-4 -> 1e-5)."""
    restore_best_on_decay: bool = True
    """On a plateau, go back to the best-validation weights before decaying the learning rate
    (DiffRec's checkpoint continued at a lower rate); False continues from the current weights."""
    min_delta: float = 0.0
    """A validation score must beat the best by more than this to count as an improvement."""
    select_metric: str = "recall@20"
    """Validation metric that selects the checkpoint."""
    time_budget_s: Optional[float] = None
    """Stop (keeping the best checkpoint) after this many seconds of wall time."""


@dataclass
class EvaluationConfig:
    ks: list[int] = field(default_factory=lambda: [10, 20, 50, 100])
    """Cut-offs of the ranking metrics."""
    batch_size: int = 1024
    """Users per evaluation batch."""
    protocol: Optional[str] = None
    """``cf`` (train history in, seen items masked; recall / ndcg / precision / mrr) or
    ``sequential`` (leave-one-out; hr / ndcg); default: the base model's own."""
    mask_history: Optional[bool] = None
    """Exclude items seen before the split from the ranking; default: True for ``cf``, False for
    ``sequential`` (DiffuRec ranks history items too)."""
    precision: str = "fp32"
    """``fp32`` or ``bf16`` (autocast of the scoring chain's matrix products; see docs/devices.md)."""


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    """A name for logs and results."""
    seed: int = 0
    """Seed of every random draw (data order, init, noise)."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``..."""
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = field(default_factory=lambda: _model_section({"name": "diffrec"}),
                       metadata={"build": _model_section})
    """The base model: ``name`` and that model's own fields (``refit_gym.models``; unknown keys
    are refused with the valid ones listed)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    env: dict[str, Any] = field(default_factory=dict)
    """Environment options (see ``refit_gym.envs``)."""
    finetune: dict[str, Any] = field(default_factory=dict)
    """Fine-tuning options (see ``agents``)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` (no dot) as a float, as YAML 1.2 does
    (PyYAML follows YAML 1.1, where it is a string)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """Parse YAML text (safe: plain data only); ``ConfigError`` when it is not valid YAML."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"not valid YAML: {error}") from None


def check_field_type(where: str, field_: dataclasses.Field, value: Any) -> None:
    """Raise ``ConfigError`` when a field whose default is a bool or number gets another type
    (an int is accepted for a float field, ``None`` for an ``Optional`` one)."""
    default = field_.default
    if value is None and "Optional" in str(field_.type):
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        return
    if not ok:
        kind = {"bool": "a bool", "int": "an int", "float": "a number"}[type(default).__name__]
        raise ConfigError(f"{where} must be {kind}, got {value!r} ({type(value).__name__})")


def build_section(cls, values: Any, where: str):
    """An instance of the config dataclass ``cls`` from a mapping (nested sections recursively).

    Raises:
        ConfigError: unknown keys (the known ones are listed) or a value of the wrong type.
    """
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"config section {where!r} must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in config section {where!r}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        builder = known[name].metadata.get("build")
        if builder is not None:
            kwargs[name] = builder(value)
            continue
        default = known[name].default_factory() if known[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = build_section(type(default), value, f"{where}.{name}" if where else name)
        else:
            check_field_type(f"{where}.{name}" if where else name, known[name], value)
            kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from a nested mapping (unknown keys raise ``ConfigError``)."""
    return build_section(ExperimentConfig, values, "")


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
"""The YAML configs shipped with the package (``configs/`` at the repository root links here)."""


def packaged_config(name: str) -> Path:
    """The path of a config shipped with refit-gym, by file name (``"ml1m_diffrec.yaml"``) or stem."""
    path = PACKAGED_CONFIGS / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not path.is_file():
        shipped = sorted(p.name for p in PACKAGED_CONFIGS.glob("*.yaml"))
        raise ConfigError(f"no shipped config named {name!r}; shipped: {shipped}")
    return path


def load_config(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> ExperimentConfig:
    """Read a YAML experiment config, then apply dotted ``overrides`` (``{"pretrain.lr": 1e-4}``).

    ``path`` is a file, or the name of a config shipped with the package (``ml1m_diffrec``).
    """
    path = Path(path)
    if not path.is_file() and path.parent == Path(".") and (PACKAGED_CONFIGS / f"{path.stem}.yaml").is_file():
        path = PACKAGED_CONFIGS / f"{path.stem}.yaml"
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = read_yaml(path.read_text()) or {}
    except ConfigError as error:
        raise ConfigError(f"config file {path} is {error}") from None
    for dotted, value in (overrides or {}).items():
        node = values
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {dotted!r}: {key!r} is not a section")
        node[leaf] = value
    try:
        return config_from_dict(values)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def resolve_device(name: str = "auto"):
    """A ``torch.device`` from a config string (``auto`` = CUDA when available)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"unknown device {name!r}: {error}") from None
