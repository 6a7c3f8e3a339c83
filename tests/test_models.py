"""The base-model interface: histories, the three models, leakage, checkpoints and a model of your own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import gymnasium as gym
import numpy as np
import pytest
import torch

import refit_gym
from refit_gym.checkpoint import load_checkpoint, save_checkpoint
from refit_gym.data import make_synthetic
from refit_gym.data.history import SequenceTable
from refit_gym.data.interactions import InteractionData, UserSequences, pairs_to_csr
from refit_gym.envs.factory import build_env_parts
from refit_gym.envs.registration import list_envs
from refit_gym.envs.scenarios import scenario_for
from refit_gym.errors import ConfigError
from refit_gym.models import BaseModel, build_model, model_class
from refit_gym.training.cache import fresh_model

DATASET = "synthetic:n_users=40,n_items=30,seed=0"
ENV_IDS = [env_id for env_id, _ in list_envs()]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ------------------------------------------------------------------ histories
def test_history_batch_matches_a_plain_python_reference():
    sequences = UserSequences.from_lists([[4, 1, 3, 1], [2], [], [0, 1, 2, 3, 4, 5]])
    table = SequenceTable(sequences, n_items=6)
    batch = table.batch([3, 0, 2, 1])
    hidden = torch.zeros_like(batch.visible)
    hidden[0, 5] = hidden[1, 0] = True  # the newest of user 3, the oldest of user 0
    shown = batch.hide(hidden)
    visible_lists = [[0, 1, 2, 3, 4], [1, 3, 1], [], [2]]
    for row, items in enumerate(visible_lists):
        assert shown.items[row][shown.visible[row]].tolist() == items
        expected = np.zeros(6)
        expected[items] = 1.0
        np.testing.assert_array_equal(shown.rows()[row].numpy(), expected)
        weights = np.linspace(0.1, 1.0, len(items))
        expected_weighted = np.zeros(6)
        for item, weight in zip(items, weights):
            expected_weighted[item] = max(expected_weighted[item], weight)
        np.testing.assert_allclose(shown.rows(shown.recency_weights(0.1, 1.0))[row].numpy(), expected_weighted,
                                   rtol=1e-6)
        recent = shown.recent(3)[row].tolist()
        assert recent == [6] * (3 - len(items[-3:])) + items[-3:]
    assert shown.item_mask(hidden).tolist()[0] == [False] * 5 + [True]
    assert batch.lengths().tolist() == [6, 4, 0, 1]
    assert table.batch([0], max_len=2).items.tolist() == [[3, 1]]


def test_sequences_extended_by_a_split_append_its_items():
    sequences = UserSequences.from_lists([[3, 1], [], [2]])
    extra = pairs_to_csr(np.array([0, 1, 2, 2]), np.array([4, 0, 1, 3]), 3, 5)
    extended = sequences.extended(extra)
    assert [extended[u].tolist() for u in range(3)] == [[3, 1, 4], [0], [2, 1, 3]]


# ------------------------------------------------------------------ the models
def test_tdiffrec_input_is_the_recency_weighted_row():
    data = make_synthetic(n_users=20, n_items=30, seed=1)
    config = scenario_for("ReFiT-ML1M-TDiffRec-v0").experiment({"data.dataset": "synthetic"})
    model = build_model(config.model, config.diffusion, data)
    batch = SequenceTable(data.train_sequences, data.n_items).batch(torch.arange(20))
    start = model.encode(batch).start
    for user in range(20):
        items = data.train_sequences[user]
        expected = np.zeros(data.n_items, dtype=np.float32)
        for item, weight in zip(items, np.linspace(0.1, 1.0, len(items))):
            expected[item] = max(expected[item], weight)
        np.testing.assert_allclose(start[user].numpy(), expected, rtol=1e-6)
    with pytest.raises(ConfigError, match="w_min"):
        build_model(model_class("tdiffrec").Config(w_min=0.8, w_max=0.5), config.diffusion, data)


def test_cfdiff_hop_rows_match_a_dense_reference():
    data = make_synthetic(n_users=25, n_items=30, seed=2)
    config = scenario_for("ReFiT-ML1M-CFDiff-v0").experiment({"data.dataset": "synthetic"})
    model = build_model(config.model, config.diffusion, data)
    users = torch.tensor([3, 0, 24])
    batch = SequenceTable(data.train_sequences, data.n_items).batch(users)
    hops = model.encode(batch).condition["hops"].numpy()
    x = data.train.toarray()
    popularity = x.sum(0) / data.n_users
    for row, user in enumerate(users.tolist()):
        own = x[user]
        np.testing.assert_allclose(hops[row, : data.n_items], own * popularity, rtol=1e-6)
        shared = x @ own
        shared[user] = 0.0  # the user's own row never enters
        third = x.T @ shared
        np.testing.assert_allclose(hops[row, data.n_items :], third / third.max(), rtol=1e-5)
    assert model.condition_spec()["hops"].shape == (2 * data.n_items,)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_a_checkpoint_restores_the_whole_model(tmp_path, env_id):
    data = make_synthetic(n_users=30, n_items=30, seed=0)
    config = scenario_for(env_id).experiment({"data.dataset": "synthetic"})
    model = fresh_model(config, data)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    save_checkpoint(tmp_path, model, config, data)
    loaded, _ = load_checkpoint(tmp_path, data)
    assert type(loaded) is type(model) and loaded.config == model.config
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    histories = SequenceTable(data.train_sequences, data.n_items).batch(torch.arange(30))
    model.eval()
    assert torch.equal(model.score(histories), loaded.score(histories))


def test_the_model_section_is_typed_per_model():
    from refit_gym.config import config_from_dict

    config = config_from_dict({"model": {"name": "cfdiff", "d_model": 8}})
    assert type(config.model).__name__ == "CFDiffConfig" and config.model.d_model == 8
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['dims'\] in config section 'model'; known: .*d_model"):
        config_from_dict({"model": {"name": "cfdiff", "dims": [8]}})
    with pytest.raises(ConfigError, match="unknown base model 'dreamrec2'"):
        config_from_dict({"model": {"name": "dreamrec2"}})
    with pytest.raises(ConfigError, match="model.d_model must be an int"):
        config_from_dict({"model": {"name": "cfdiff", "d_model": "wide"}})


# ------------------------------------------------------------------ no held-out item reaches a model
def _without(data: InteractionData, hidden: dict[int, set[int]]) -> InteractionData:
    """``data`` with the given training items of the given users removed from train (and the sequences)."""
    lists = [[item for item in data.train_sequences[u].tolist() if item not in hidden.get(u, ())]
             for u in range(data.n_users)]
    sequences = UserSequences.from_lists(lists)
    users = np.repeat(np.arange(data.n_users), sequences.lengths)
    train = pairs_to_csr(users, sequences.items, data.n_users, data.n_items)
    return InteractionData(name=data.name, train=train, valid=data.valid, test=data.test, train_sequences=sequences)


@pytest.mark.parametrize("holdout", ["recent", "random"])
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_no_held_out_item_reaches_the_input_or_the_conditioning(env_id, holdout):
    """A user's start state and conditioning with items held out are exactly those of the same
    model on data in which that user never had those items: nothing about them leaks (other
    users' training rows may enter, as at evaluation)."""
    data = make_synthetic(n_users=40, n_items=30, seed=0)
    config = scenario_for(env_id).experiment({"data.dataset": "synthetic"})
    model = fresh_model(config, data)
    users = np.arange(6)
    steps = config.diffusion.steps
    for exposed in sorted({steps, 1}):  # the start itself, and after the frozen model's prefix
        core = build_env_parts(env_id, data=data, model=model, batch_size=len(users), holdout=holdout,
                               exposed_steps=exposed).core
        observation = core.reset(np.random.default_rng(3), users=users)
        held_out = core.held_out.numpy()
        assert held_out.any(1).all()  # every user hides something
        assert not (core.visible.numpy() * held_out).any()
        for row, user in enumerate(users.tolist()):
            reduced = _without(data, {user: set(np.flatnonzero(held_out[row]).tolist())})
            reduced_model = build_model(config.model, config.diffusion, reduced)
            reduced_model.load_state_dict(model.state_dict())
            reference = build_env_parts(env_id, data=reduced, model=reduced_model, batch_size=len(users),
                                        holdout="none", exposed_steps=exposed).core
            expected = reference.reset(np.random.default_rng(3), users=users)
            assert set(observation) == set(expected)
            for name in observation:
                torch.testing.assert_close(observation[name][row], expected[name][row], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{name} of user {user} (exposed {exposed}): {m}")


# ------------------------------------------------------------------ a model of your own
TOY_MODEL = '''
from dataclasses import dataclass

import torch
import torch.nn as nn

from refit_gym.models import BaseModel, ChainInputs, ConditionSpec, ModelConfig


@dataclass
class ToyConfig(ModelConfig):
    name: str = "toy_model:ToyModel"
    hidden: int = 16


class ToyModel(BaseModel):
    """An MLP denoiser conditioned on the number of visible items."""

    name = "toy"
    Config = ToyConfig

    def __init__(self, config, diffusion, train, noise_steps=0):
        super().__init__(config, diffusion, train, noise_steps)
        self.net = nn.Sequential(nn.Linear(self.n_items + 2, config.hidden), nn.Tanh(),
                                 nn.Linear(config.hidden, self.n_items))

    @property
    def state_dim(self):
        return self.n_items

    def encode(self, history):
        return ChainInputs(start=history.rows(), condition={"size": history.lengths().float().unsqueeze(1)})

    def condition_spec(self):
        return {"size": ConditionSpec((1,), torch.float32, 0.0, 1e6)}

    def denoise(self, x_t, t, size):
        return self.net(torch.cat([x_t, t.float().unsqueeze(1), size], dim=1))

    def item_scores(self, x0):
        return x0
'''

TOY_SCENARIO = '''
name: toy
env:
  id: Toy-Synthetic-v0
  description: a toy base model of a user's own, on synthetic data
  versions: ["v0: the toy model"]
  holdout: recent
data:
  dataset: "synthetic:n_users=40,n_items=30,seed=0"
model:
  name: "toy_model:ToyModel"
  hidden: 8
diffusion:
  steps: 3
pretrain: {batch_size: 20, max_epochs: 4, eval_every: 2, min_epochs: 2}
evaluation: {ks: [10, 20]}
finetune: {agent: refit, users_per_batch: 8, rollouts_per_user: 2}
'''


def test_a_model_and_a_scenario_of_your_own_run_without_editing_the_library(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "toy_model.py").write_text(TOY_MODEL)
    (tmp_path / "toy.yaml").write_text(TOY_SCENARIO)

    env_id = refit_gym.register_scenario(tmp_path / "toy.yaml")
    assert env_id == "Toy-Synthetic-v0" and env_id in gym.registry
    env = gym.make(env_id)  # pretrains the toy model on first use, into the (temporary) cache
    from gymnasium.utils.env_checker import check_env

    with pytest.warns(UserWarning):
        check_env(env.unwrapped)
    assert type(env.unwrapped.base_model).__name__ == "ToyModel"
    assert list((tmp_path / "cache" / "refit_gym" / "checkpoints").glob("*-toy_model.ToyModel-*/model.safetensors"))

    from agents.config import finetune_config
    from agents.trainer import build_learner

    scenario = scenario_for(env_id)
    settings = finetune_config(scenario.experiment().finetune)
    agent = build_learner(settings, env.unwrapped.base_model, env.unwrapped.data)
    before = [p.detach().clone() for p in agent.policy.model.parameters()]
    out = agent.update(np.arange(8), np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert np.isfinite(out["loss"])
    assert any(not torch.equal(p, b) for p, b in zip(agent.policy.model.parameters(), before))


# ------------------------------------------------------------------ import hygiene
def test_making_an_env_imports_neither_the_agents_nor_the_pretraining_code(tmp_path):
    """With the base model in the cache, ``gym.make`` loads it; nothing else comes along."""
    script = textwrap.dedent(f"""
        import sys
        import gymnasium as gym
        import refit_gym
        from refit_gym.envs.registration import list_envs
        for env_id, _ in list_envs():
            kwargs = {{"dataset": "{DATASET}"}}
            if env_id == "ReFiT-Synthetic-v0":
                gym.make(env_id)  # pretrained on first use (below: already cached)
            else:
                gym.make(env_id, pretrained=False, **kwargs)
        print(sorted(m for m in sys.modules if m == "agents" or m.startswith("agents.")
                     or m == "refit_gym.training.pretrain"))
    """)
    env = {"XDG_CACHE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
           **{key: os.environ[key] for key in ("PYTHONPATH",) if key in os.environ}}  # a from-source install
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "['refit_gym.training.pretrain']"  # the cache was empty: it pretrained
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "[]"


def test_the_library_never_imports_the_agents_package():
    import pathlib

    root = pathlib.Path(refit_gym.__file__).parent
    offenders = [str(path.relative_to(root)) for path in root.rglob("*.py")
                 if any(line.strip().startswith(("import agents", "from agents"))
                        for line in path.read_text().splitlines())
                 and path.name != "cli.py"]  # the command line sits above both packages
    assert offenders == []


def test_base_model_subclasses_must_define_the_interface():
    data = make_synthetic(n_users=10, n_items=30, seed=0)

    class Incomplete(BaseModel):
        name = "incomplete"

    config = scenario_for("ReFiT-Synthetic-v0").experiment()
    model = Incomplete(model_class("diffrec").Config(), build_model(config.model, config.diffusion, data).diffusion,
                       refit_gym.data.interactions.TrainingInteractions.from_data(data))
    with pytest.raises(NotImplementedError):
        model.state_dim
    with pytest.raises(ConfigError, match="not a refit_gym.models.BaseModel"):
        model_class("refit_gym.data.history:HistoryBatch")
