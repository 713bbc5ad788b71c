"""The models that ship with the package resolve and load, and say what they are."""

from __future__ import annotations

import json

import pytest

from qzoom_ray.config import ModelConfig
from qzoom_ray.model.embedded import ASSETS, embedded_checkpoint_dir
from qzoom_ray.model.loader import load_model, resolve_checkpoint_dir


def test_the_trained_tiny_qzoom_model_ships_with_heads_and_a_model_card():
    folder = resolve_checkpoint_dir("embedded:tiny")
    assert folder == ASSETS / "tiny-qzoom"
    loaded = load_model(ModelConfig(path="embedded:tiny"))
    assert loaded.heads is not None and loaded.spec is not None
    card = (folder / "README.md").read_text()
    history = json.loads((folder / "qzoom_training.json").read_text())
    stages = [h["stage"] for h in history]
    assert stages[:1] == ["rpn"] and "gate" in stages and "gate" in card


def test_the_tiny_base_model_ships_without_heads_with_its_recipe():
    folder = resolve_checkpoint_dir("embedded:tiny-base")
    loaded = load_model(ModelConfig(path="embedded:tiny-base", require_heads=False))
    assert loaded.heads is None
    recipe = json.loads((folder / "recipe.json").read_text())
    assert recipe["finished"] is True and recipe["steps_done"] > 0


def test_unknown_embedded_names_list_the_available_ones():
    with pytest.raises(ValueError, match="tiny-base"):
        embedded_checkpoint_dir("tiny-large")
