"""Scenarios: an environment id is one YAML file (dataset, base model, hold-out, protocol, reward).

A scenario is an experiment config (``refit_gym/config.py``: ``data``, ``model``, ``diffusion``,
``pretrain``, ``evaluation``, ``finetune``) whose ``env`` section names an environment::

    env:
      id: ReFiT-ML1M-v0                      # the Gymnasium id
      description: DiffRec (T=40) on MovieLens-1M ...
      versions:                              # the version history of this id, newest last
        - "v0: ..."
      reward: {loglik: {weight: 1.0}}        # default reward (refit_gym.rewards.build_reward)
      holdout: recent                        # any DenoisingMDP keyword (see EnvConfig)

Every YAML shipped in ``refit_gym/configs/`` with an ``env.id`` is registered when
``refit_gym`` is imported; :func:`register_scenario` registers a YAML of your own (with, e.g.,
``model: {name: "my_package.my_model:MyModel"}``) without editing the library. Registration
reads only the ``env`` section (no torch import); the rest is validated when the env is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from refit_gym.config import PACKAGED_CONFIGS, build_section, read_yaml
from refit_gym.errors import ConfigError


@dataclass
class EnvConfig:
    """The ``env`` section of a scenario YAML (a chain keyword left ``None`` keeps the core's default)."""

    id: Optional[str] = None
    """The Gymnasium id (``ReFiT-<Dataset>[-<Model>]-v<N>``); a config without one is not an env."""
    description: str = ""
    """One line for ``refit-gym envs``."""
    versions: list[str] = field(default_factory=list)
    """The version history of the id, one line per version (what changed)."""
    reward: Any = None
    """Default terminal reward (``refit_gym.rewards.build_reward`` spec); None = the held-out log-likelihood."""
    shaping: Any = None
    """Default potential-based shaping (``refit_gym.rewards.build_shaping`` spec); None = off."""
    action_mode: Optional[str] = None
    """``x0`` or ``x_prev`` (see ``DenoisingMDP``)."""
    exposed_steps: Optional[int] = None
    """How many of the T reverse steps the agent takes."""
    stochastic_prefix: Optional[bool] = None
    """Run the hidden prefix with the schedule's noise."""
    transition_std: Optional[float] = None
    """Std of the ``x0``-mode transition noise (None: the schedule's)."""
    holdout: Optional[str] = None
    """``recent``, ``random`` or ``none``: which training items are hidden and scored."""
    holdout_fraction: Optional[float] = None
    """Fraction of each user's training items hidden."""
    holdout_count: Optional[int] = None
    """Hide exactly this many of each user's training items instead (sequential scenarios: 1)."""
    noise_steps: Optional[int] = None
    """Forward-noise the start vector to this step first (None: the model's own)."""
    action_bound: Optional[float] = None
    """Actions and states are clipped to +- this."""
    precision: Optional[str] = None
    """``fp32`` or ``bf16`` (autocast of the hidden prefix and the reward's scoring)."""
    slate_size: Optional[int] = None
    """Draw a slate of this many items at the terminal step (None / 0: off; see ``DenoisingMDP``)."""
    slate_temperature: Optional[float] = None
    """Temperature of the slate's Plackett-Luce distribution (None: the core's 0.02)."""
    pretrain_threads: Optional[int] = None
    """Intra-op threads while this scenario's base model is pretrained on first use (1 is
    fastest for tiny models on a busy machine); None = torch's default."""

    def chain_kwargs(self) -> dict[str, Any]:
        """The ``DenoisingMDP`` keywords this section sets."""
        return {name: getattr(self, name) for name in CHAIN_KWARGS if getattr(self, name) is not None}


CHAIN_KWARGS = ("action_mode", "exposed_steps", "stochastic_prefix", "transition_std", "holdout",
                "holdout_fraction", "holdout_count", "noise_steps", "action_bound", "precision", "slate_size",
                "slate_temperature")
"""Keyword arguments of an env passed through to :class:`~refit_gym.envs.core.DenoisingMDP`."""


@dataclass(frozen=True)
class Scenario:
    """A registered environment: its id, description, versions and the YAML that defines it."""

    env_id: str
    description: str
    path: Path
    versions: tuple[str, ...] = ()

    def experiment(self, overrides: Optional[dict[str, Any]] = None):
        """The scenario's full :class:`~refit_gym.config.ExperimentConfig` (validated now)."""
        from refit_gym.config import load_config

        return load_config(self.path, overrides)

    def env_config(self) -> EnvConfig:
        """The validated ``env`` section."""
        return env_config(_read(self.path).get("env"), self.path)


def _read(path: Path) -> dict[str, Any]:
    try:
        values = read_yaml(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"cannot read the scenario {path}: {error}") from None
    except ConfigError as error:
        raise ConfigError(f"scenario {path} is {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"scenario {path} must hold a mapping, got {type(values).__name__}")
    return values


def env_config(values: Any, where: Any = "the config") -> EnvConfig:
    """A validated :class:`EnvConfig` from an ``env`` mapping."""
    try:
        return build_section(EnvConfig, values or {}, "env")
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def read_scenario(path: str | Path) -> Optional[Scenario]:
    """The scenario a YAML defines, or ``None`` when it has no ``env.id`` (a plain experiment)."""
    path = Path(path).expanduser().resolve()
    section = _read(path).get("env") or {}
    if not isinstance(section, dict) or not section.get("id"):
        return None
    env_id = section["id"]
    if not isinstance(env_id, str):
        raise ConfigError(f"{path}: env.id must be a string, got {env_id!r}")
    versions = section.get("versions") or []
    if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
        raise ConfigError(f"{path}: env.versions must be a list of strings")
    return Scenario(env_id, str(section.get("description", "")), path, tuple(versions))


_SCENARIOS: dict[str, Scenario] = {}


def shipped_scenarios() -> dict[str, Scenario]:
    """Every scenario shipped in ``refit_gym/configs/``, by env id (read once per process)."""
    if not _SCENARIOS:
        for path in sorted(PACKAGED_CONFIGS.glob("*.yaml")):
            scenario = read_scenario(path)
            if scenario is not None:
                if scenario.env_id in _SCENARIOS:
                    raise ConfigError(f"two shipped configs define {scenario.env_id}: "
                                      f"{_SCENARIOS[scenario.env_id].path.name} and {path.name}")
                _SCENARIOS[scenario.env_id] = scenario
    return _SCENARIOS


def add_scenario(path: str | Path) -> Scenario:
    """Read a scenario YAML and add it to the known scenarios (an id defined by another file is refused)."""
    scenario = read_scenario(path)
    if scenario is None:
        raise ConfigError(f"{path} has no env.id: it is an experiment config, not a scenario")
    known = shipped_scenarios()
    if scenario.env_id in known and known[scenario.env_id].path != scenario.path:
        raise ConfigError(f"{scenario.env_id} is already defined by {known[scenario.env_id].path}")
    known[scenario.env_id] = scenario
    return scenario


def scenario_for(name: Any) -> Scenario:
    """The scenario of an env id (``"ReFiT-ML1M-v0"``, ``"refit_gym:ReFiT-ML1M-v0"``) or a YAML path."""
    if isinstance(name, Scenario):
        return name
    if not isinstance(name, (str, Path)):
        raise ConfigError(f"an environment is named by its id or a scenario YAML path, got {name!r}")
    key = str(name).split(":", 1)[-1] if not str(name).endswith((".yaml", ".yml")) else str(name)
    scenarios = shipped_scenarios()
    if key in scenarios:
        return scenarios[key]
    if key.endswith((".yaml", ".yml")):
        return add_scenario(key)
    raise ConfigError(f"unknown environment {name!r}; known: {sorted(scenarios)}")


__all__ = ["CHAIN_KWARGS", "EnvConfig", "Scenario", "add_scenario", "env_config", "read_scenario",
           "scenario_for", "shipped_scenarios"]
