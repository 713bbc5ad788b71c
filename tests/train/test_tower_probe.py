"""Linear probes on visual tokens (qzoom_ray.train.tower_probe): labels, the probe itself, end to end."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qzoom_ray.train.tower_probe import PROBE_HEADS, fit_linear_probe, half_labels, probe_targets, probe_tower
from qzoom_ray.train.vision_source import IGNORE, DenseView


def test_half_labels_split_object_tokens_by_the_side_of_their_centre():
    objects = np.array([[1, 0, 3, 2, 2], [0, 4, 4, 0, 5]])
    assert half_labels(objects).tolist() == [[1, IGNORE, IGNORE, 2, 2], [IGNORE, 1, IGNORE, IGNORE, 2]]
    even = half_labels(np.ones((1, 4), dtype=np.int64))
    assert even.tolist() == [[1, 1, 2, 2]]  # no middle column on an even grid


def test_probe_targets_ignore_background_and_uncoloured_tokens():
    labels = {"object": np.array([[0, 2], [7, 1]]), "colour": np.array([[3, 4], [0, 5]]),
              "glyph": np.zeros((2, 2), np.int64), "key": np.zeros((2, 2), np.int64)}
    t = probe_targets(DenseView(Image.new("RGB", (56, 56)), labels))
    assert t["object"].tolist() == [[IGNORE, 2], [7, 1]]
    assert t["colour"].tolist() == [[IGNORE, 4], [IGNORE, 5]]  # colour 0 on an object: nothing to probe
    assert set(t) == set(PROBE_HEADS)


def test_linear_probe_finds_a_linear_fact_and_not_a_random_one():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (4, 16))
    y = rng.integers(0, 4, 600)
    x = centres[y] + rng.normal(0, 1, (600, 16))
    found = fit_linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert found.test_accuracy > 0.95 and found.n_train == 400 and found.n_test == 200
    shuffled = rng.permutation(y)
    noise = fit_linear_probe(x[:400], shuffled[:400], x[400:], shuffled[400:])
    assert noise.test_accuracy < noise.majority_accuracy + 0.15
    with pytest.raises(ValueError, match="both"):
        fit_linear_probe(x[:0], y[:0], x, y)


def test_probe_tower_end_to_end_on_the_tiny_model(tiny_model_dir):
    from qzoom_ray.config import ModelConfig
    from qzoom_ray.model.loader import load_model

    loaded = load_model(ModelConfig(path=tiny_model_dir, require_heads=False, device="cpu", dtype="float32"))
    results = probe_tower(loaded.adapter.model, loaded.processor, n_images=4, budget=64, seed=3, decoder=True)
    layers = loaded.adapter.model.config.text_config.num_hidden_layers
    assert list(results) == ["merger"] + [f"decoder {k}" for k in range(1, layers + 1)]
    for probes in results.values():
        assert set(probes) == set(PROBE_HEADS)
        for r in probes.values():
            assert r.n_train > 0 and r.n_test > 0
            assert 0.0 <= r.test_accuracy <= 1.0 and 0.0 <= r.majority_accuracy <= 1.0
    tower_only = probe_tower(loaded.adapter.model, loaded.processor, n_images=4, budget=64, seed=3)
    assert list(tower_only) == ["merger"]
    # The decoder's input at the image tokens is the merger's output: the same tokens, the same probe.
    assert tower_only["merger"]["colour"] == results["merger"]["colour"]
    with pytest.raises(ValueError, match="two images"):
        probe_tower(loaded.adapter.model, loaded.processor, n_images=1)
