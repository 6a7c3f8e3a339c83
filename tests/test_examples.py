"""The bring-your-own-algorithm example trains over the public API and improves its reward."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "byo_reinforce.py"

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def load_example():
    spec = importlib.util.spec_from_file_location("byo_reinforce", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_example_improves_its_reward_through_both_fronts():
    example = load_example()
    gym_curve = example.train(example.Args(front="gym", updates=20))
    torchrl_curve = example.train(example.Args(front="torchrl", updates=20))
    (_, before), (_, after) = gym_curve[0], gym_curve[-1]
    assert after > before, gym_curve  # the deterministic return on fixed users rises
    # the same seeds and the same maths through the Gymnasium and the TorchRL fronts
    assert [u for u, _ in gym_curve] == [u for u, _ in torchrl_curve]
    assert [r for _, r in gym_curve] == pytest.approx([r for _, r in torchrl_curve], abs=1e-5)
