"""Dense per-token labels for the vision tower and its pretraining step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qzoom_ray.synth.common import SynthRecord
from qzoom_ray.synth.vocab import COLOURS, FIELDS
from qzoom_ray.train.base_config import TinyArch, TrainBaseConfig, TrainPhase, build_untrained
from qzoom_ray.train.vision_pretrain import VisionPretrainer, collate_dense, encode_dense_view
from qzoom_ray.train.vision_source import (
    GLYPHS,
    HEAD_CLASSES,
    IGNORE,
    OBJECTS,
    dense_labels,
    make_dense_view_fn,
    render_canvas,
)


def _record(texts, objects, size=(280, 280)) -> SynthRecord:
    image = Image.new("RGB", size, (255, 255, 255))
    return SynthRecord(image, "", "", [], "fine", "scene", "ordinary", "", "scene", (0, 0, *size), "exact_match",
                       texts=texts, objects=objects)


def test_glyph_labels_cover_tokens_holding_a_quarter_of_the_glyph():
    # A 20x20 glyph box from (50, 60): x spans tokens 1 (50-56, 6 px) and 2 (56-70, 14 px); y spans
    # token 2 only (60-80). Token (2, 2) holds 70% of it, token (2, 1) 30%: both targets.
    rec = _record([("7", (50, 60, 70, 80))], [])
    labels = dense_labels(rec, (0, 0, 280, 280), 1.0, (10, 10))
    g = labels["glyph"]
    cls = 1 + GLYPHS.index("7")
    assert g[2, 2] == cls and g[2, 1] == cls
    assert (g == cls).sum() == 2 and (g == IGNORE).sum() == 0 and (g == 0).sum() == 98
    # Shifted by 2 px: token (2, 1) keeps 4 of 20 columns (20%), a sliver, ignored rather than labelled.
    rec = _record([("7", (52, 60, 72, 80))], [])
    g = dense_labels(rec, (0, 0, 280, 280), 1.0, (10, 10))["glyph"]
    assert g[2, 2] == cls and g[2, 1] == IGNORE


def test_small_glyphs_and_multi_glyph_text_are_ignored_and_keys_labelled():
    rec = _record([("7", (10, 10, 16, 18)), ("AB", (100, 100, 140, 120)), ("Total", (150, 200, 250, 230))], [])
    labels = dense_labels(rec, (0, 0, 280, 280), 1.0, (10, 10))
    assert labels["glyph"][0, 0] == IGNORE  # 8 px tall: too small to be a target
    assert (labels["glyph"][3:5, 3:5] == IGNORE).all()  # a code of two glyphs is not a one-glyph target
    assert (labels["glyph"] > 0).sum() == 0
    assert (labels["key"][7:9, 5:9] == 1 + FIELDS.index("Total")).all() and labels["key"][0, 0] == 0


def test_objects_and_colours_are_rasterised_under_token_centres_with_the_window_and_scale():
    shape = {"kind": "square", "colour": "red", "centre": (140.0, 140.0), "radius": 60.0}
    header = {"kind": "header", "colour": "blue", "box": (0, 0, 280, 30)}
    # Window from (28, 0) at scale 0.5: the square's centre (140, 140) lands at (56, 70) px = token (2, 2).
    labels = dense_labels(_record([], [shape, header]), (28, 0, 308, 280), 0.5, (5, 5))
    assert labels["object"][2, 2] == 1 + OBJECTS.index("square") and labels["colour"][2, 2] == 1 + list(COLOURS).index("red")
    assert labels["object"][0, 2] == 1 + OBJECTS.index("header") and labels["colour"][0, 2] == 1 + list(COLOURS).index("blue")
    assert labels["object"][4, 4] == 0 and labels["colour"][4, 4] == 0


def test_canvas_and_benchmark_views_encode_on_the_merged_token_grid():
    cfg = TrainBaseConfig(out_dir="unused", vocab_size=320, arch=TinyArch(hidden_size=64, intermediate_size=128,
                          num_layers=1, num_heads=2, num_kv_heads=1, vision_depth=1, vision_hidden=32))
    _, processor, _ = build_untrained(cfg)
    rng = np.random.default_rng(0)
    canvas = render_canvas(rng)
    assert (canvas.labels["glyph"] > 0).sum() >= 5  # a primer page is dense in targets
    view_fn = make_dense_view_fn(canvas_prob=0.0)
    for view in [canvas, *(view_fn(rng) for _ in range(6))]:
        enc = encode_dense_view(processor, view)
        rows, cols = view.labels["glyph"].shape
        assert enc["image_grid_thw"].tolist() == [1, 2 * rows, 2 * cols]
        for head, n in HEAD_CLASSES.items():
            y = enc[f"labels_{head}"]
            assert y.shape == (rows * cols,) and ((y == IGNORE) | ((y >= 0) & (y < n))).all()


def test_vision_pretraining_fits_a_batch_and_touches_only_the_tower():
    cfg = TrainBaseConfig(out_dir="unused", vocab_size=320, arch=TinyArch(hidden_size=64, intermediate_size=128,
                          num_layers=1, num_heads=2, num_kv_heads=1, vision_depth=1, vision_hidden=32))
    _, processor, model = build_untrained(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(1)
    batch = collate_dense([encode_dense_view(processor, render_canvas(rng, grid_tokens=(6, 8))) for _ in range(4)])
    pre = VisionPretrainer(model.model.visual, model.config.text_config.hidden_size)
    opt = torch.optim.AdamW(pre.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = pre(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    assert set(pre.last_accuracy) <= set(HEAD_CLASSES)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.visual.") for k in changed), sorted(changed)[:5]


def test_vision_phases_must_come_before_chat_phases():
    TrainBaseConfig(out_dir="x", phases=[TrainPhase(name="v", kind="vision", minutes=1), TrainPhase(name="c", minutes=1)])
    with pytest.raises(ValueError, match="before every chat phase"):
        TrainBaseConfig(out_dir="x", phases=[TrainPhase(name="c", minutes=1), TrainPhase(name="v", kind="vision", minutes=1)])
