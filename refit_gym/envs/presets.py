"""The registered environments' names, ids and descriptions (no torch import: registration stays light)."""

from __future__ import annotations

from dataclasses import dataclass

from refit_gym.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """A registered environment: its id, one-line description and how its data is made."""

    name: str
    env_id: str
    description: str
    extra_kwargs: tuple[str, ...]
    """Preset-specific keyword arguments (besides :data:`COMMON_KWARGS` and :data:`CHAIN_KWARGS`)."""


PRESETS: dict[str, Preset] = {
    "synthetic": Preset(
        "synthetic",
        "ReFiT-Synthetic-v0",
        "offline: DiffRec (T=10) on seeded synthetic data (500 users x 300 items), pretrained in seconds on first use",
        ("n_users", "n_items", "data_seed"),
    ),
    "ml1m": Preset(
        "ml1m",
        "ReFiT-ML1M-v0",
        "DiffRec (T=40) on MovieLens-1M (diffrec_ml-1m_clean from data_dir / $REFIT_GYM_DATA)",
        (),
    ),
}


def preset_for(env_id_or_preset: str) -> Preset:
    """The preset of a preset name or an env id (``"ReFiT-ML1M-v0"``, ``"refit_gym:ReFiT-ML1M-v0"``)."""
    if not isinstance(env_id_or_preset, str):
        raise ConfigError(f"an environment is named by a string, got {env_id_or_preset!r}")
    key = env_id_or_preset.split(":", 1)[-1]
    for preset in PRESETS.values():
        if key in (preset.name, preset.env_id):
            return preset
    known = [p.env_id for p in PRESETS.values()]
    raise ConfigError(f"unknown environment {env_id_or_preset!r}; known: {known}")
