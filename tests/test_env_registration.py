"""Registration, the "module:id" form, the pretrained-base cache and the ML-1M env on real data."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml

import refit_gym
from refit_gym.envs import factory
from refit_gym.envs.gym_env import DenoisingEnv
from refit_gym.envs.registration import list_envs, register_envs
from refit_gym.envs.scenarios import scenario_for
from refit_gym.envs.vector_env import DenoisingVectorEnv
from refit_gym.errors import ConfigError

IDS = ("ReFiT-ML1M-v0", "ReFiT-ML1M-CFDiff-v0", "ReFiT-ML1M-TDiffRec-v0", "ReFiT-Synthetic-v0", "ReFiT-Beauty-Seq-v0",
       "ReFiT-ML1M-Seq-v0", "ReFiT-Beauty-DreamRec-v0", "ReFiT-Beauty-DreamRec-v1",
       "ReFiT-ML1M-DreamRec-v0")
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_ids_are_registered_with_both_entry_points():
    for env_id in IDS:
        spec = gym.spec(env_id)
        assert spec.entry_point == "refit_gym.envs.gym_env:DenoisingEnv"
        assert spec.vector_entry_point == "refit_gym.envs.vector_env:DenoisingVectorEnv"
        assert spec.max_episode_steps is None
    assert sorted(env_id for env_id, _ in list_envs()) == sorted(IDS)
    assert all(isinstance(text, str) and text and "\n" not in text for _, text in list_envs())


def test_registering_again_or_reimporting_never_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert register_envs() == []
        importlib.reload(refit_gym)
        refit_gym.register_envs()


def test_module_prefixed_ids_and_make_vec():
    small = {"pretrained": False, "dataset": "synthetic:n_users=60,n_items=40,seed=0"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = gym.make("refit_gym:ReFiT-Synthetic-v0", **small)
        venv = gym.make_vec("refit_gym:ReFiT-Synthetic-v0", num_envs=3, **small)
    assert isinstance(env.unwrapped, DenoisingEnv)
    assert isinstance(venv, DenoisingVectorEnv) and venv.num_envs == 3
    torchrl_env = refit_gym.make_torchrl_env("refit_gym:ReFiT-Synthetic-v0", num_envs=2, **small)
    assert torchrl_env.batch_size == torch.Size([2])
    with pytest.raises(ConfigError, match="unknown environment"):
        refit_gym.make_torchrl_env("ReFiT-Nope-v0")
    with pytest.raises(ConfigError, match="n_users"):
        gym.make("ReFiT-ML1M-v0", n_users=10)  # the dataset is chosen with dataset="synthetic:n_users=..."


def test_synthetic_base_is_pretrained_once_and_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    factory.clear_caches()
    try:
        env = gym.make("ReFiT-Synthetic-v0")  # the default: pretrained base, built on first use
        checkpoints = [p for p in (tmp_path / "refit_gym" / "checkpoints").iterdir() if p.name != ".locks"]
        assert len(checkpoints) == 1 and checkpoints[0].name.startswith("synthetic-diffrec-")
        assert (checkpoints[0] / "model.safetensors").is_file()
        again = gym.make("ReFiT-Synthetic-v0")
        assert again.unwrapped.base_model is env.unwrapped.base_model  # in-process cache
        factory.clear_caches()
        reloaded = gym.make("ReFiT-Synthetic-v0")  # from the disk cache, no retraining
        for (name, a), b in zip(env.unwrapped.base_model.denoiser.state_dict().items(),
                                reloaded.unwrapped.base_model.denoiser.state_dict().values()):
            assert torch.equal(a, b), name
        # the pretrained base recommends better than a random one on the held-out items
        fresh = gym.make("ReFiT-Synthetic-v0", pretrained=False)
        assert _base_policy_return(env) > _base_policy_return(fresh)
    finally:
        factory.clear_caches()


def _base_policy_return(env) -> float:
    from refit_gym.envs.policies import denoiser_action

    core = env.unwrapped.core
    total = 0.0
    for user in range(0, core.n_users, 5):
        obs, _ = env.reset(seed=user, options={"users": user})
        terminated = False
        while not terminated:
            action = denoiser_action(core.model.denoise, core.model.diffusion, torch.from_numpy(obs["x_t"])[None],
                                     torch.from_numpy(obs["t"])[None])[0].numpy()
            obs, reward, terminated, _, _ = env.step(action)
        total += reward
    return total


@pytest.mark.parametrize("env_id", IDS)
def test_each_id_is_the_shipped_yaml_that_names_it(env_id):
    scenario = scenario_for(env_id)
    written = yaml.safe_load(scenario.path.read_text())
    assert scenario.path.parent == REPO / "refit_gym" / "configs" and written["env"]["id"] == env_id
    ours = scenario.experiment().to_dict()
    for section in ("model", "diffusion", "pretrain"):
        for key, value in written.get(section, {}).items():
            assert ours[section][key] == value, f"{section}.{key}"
    assert scenario.versions and all(line.startswith("v") for line in scenario.versions)


def test_a_new_version_keeps_the_older_ones_and_records_each():
    """Gymnasium's convention: a scenario that changes gets a new id version, and every older version
    stays registered and builds what it always built; each YAML lists its id's history up to itself."""
    ids = [env_id for env_id, _ in list_envs()]
    for env_id in ids:
        name, version = env_id.rsplit("-v", 1)
        assert [line.split(":")[0] for line in scenario_for(env_id).versions] == [f"v{n}" for n in range(int(version) + 1)]
        assert all(f"{name}-v{n}" in ids for n in range(int(version))), env_id
    small = {"pretrained": False, "dataset": "synthetic:n_users=40,n_items=30,seed=0"}
    v0 = gym.make("ReFiT-Beauty-DreamRec-v0", **small).unwrapped.base_model.config
    v1 = gym.make("ReFiT-Beauty-DreamRec-v1", **small).unwrapped.base_model.config
    assert (v0.target_gradient, v0.hidden) == (True, 64)  # DreamRec's own objective (docs/sequential.md)
    assert (v1.target_gradient, v1.hidden) == (False, 256)


@pytest.mark.real_data
def test_ml1m_env_with_a_fresh_base_on_real_data(real_data_dir):
    env = DenoisingVectorEnv("ReFiT-ML1M-v0", num_envs=4, data_dir=real_data_dir, checkpoint=None, pretrained=False)
    obs, _ = env.reset(seed=0)
    assert obs["x_t"].shape == (4, 2810) and obs["t"].ravel().tolist() == [40] * 4
    assert env.core.n_users == 5949
    obs, reward, terminated, truncated, info = env.step(obs["x_t"])
    assert obs["t"].ravel().tolist() == [39] * 4 and not terminated.any()
    assert np.array_equal(reward, np.zeros(4, np.float32))


def test_the_generated_specification_in_the_docs_is_up_to_date():
    from refit_gym.envs import spec

    document = (REPO / "docs" / "environment.md").read_text()
    assert spec.updated(document) == document, "run `python -m refit_gym.envs.spec` to regenerate docs/environment.md"
    assert "### Action space" in document and "`ReFiT-ML1M-CFDiff-v0`" in document
