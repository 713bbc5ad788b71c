"""The direct route's own decoder: records not zoomed get the other model's answers, zoomed ones the checkpoint's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import engine_config, make_image_bytes
from safetensors.torch import load_file, save_file

from qzoom_ray.model.checkpoint import CheckpointError
from qzoom_ray.model.engine import QZoomEngine
from qzoom_ray.model.state import EngineRecord

BACKBONE = "model-backbone.safetensors"


def variant(src: str, dst: Path, touch) -> str:
    """A copy of the checkpoint whose backbone tensors named by ``touch`` are perturbed."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / BACKBONE)
    g = torch.Generator().manual_seed(7)
    for name, t in tensors.items():
        if touch(name):
            tensors[name] = t + 0.5 * torch.randn(t.shape, generator=g, dtype=t.dtype)
    save_file(tensors, dst / BACKBONE, metadata={"format": "pt"})
    return str(dst)


K = 3  # the test checkpoint's twig_K: the zoom pass reuses layers 0..2, so a direct-route model shares them


def is_decoder(name: str) -> bool:
    """Decoder layers K.. and lm_head: what stage 2 may change without touching the shared prefix."""
    parts = name.split(".")
    return name == "lm_head.weight" or (name.startswith("model.layers.") and int(parts[2]) >= K)


@pytest.fixture(scope="module")
def other_decoder(tiny_model_dir, tmp_path_factory):
    return variant(tiny_model_dir, tmp_path_factory.mktemp("other") / "ckpt", is_decoder)


def records() -> list[EngineRecord]:
    # Every other record forced through the zoom pass.
    return [EngineRecord(f"r{i}", make_image_bytes(260 + 30 * i, 220, i), "What is the value of Total?",
                         gate_thresh=0.0 if i % 2 else 2.0) for i in range(6)]


def test_direct_answers_are_the_other_models_and_zoomed_ones_the_checkpoints(tiny_model_dir, other_decoder):
    split = QZoomEngine(engine_config(tiny_model_dir, model={"path": tiny_model_dir, "direct_route_path": other_decoder}))
    plain = QZoomEngine(engine_config(tiny_model_dir))
    other = QZoomEngine(engine_config(tiny_model_dir, model={"path": other_decoder}, zoom={
        **engine_config(tiny_model_dir).zoom.model_dump(), "mode": "baseline"}))
    got, mine, theirs = split.generate(records()), plain.generate(records()), other.generate(records())
    assert [r.zoomed for r in got] == [bool(i % 2) for i in range(6)]
    for g, m, t in zip(got, mine, theirs, strict=True):
        if g.zoomed:
            assert (g.token_ids, g.roi_box_px, g.gate_score) == (m.token_ids, m.roi_box_px, m.gate_score)
        else:
            assert g.token_ids == t.token_ids and g.answer_logprob == pytest.approx(t.answer_logprob, abs=1e-4)
    # The perturbed decoder really answers differently, or the test would prove nothing.
    assert any(m.token_ids != t.token_ids for m, t, g in zip(mine, theirs, got, strict=True) if not g.zoomed)


def test_baseline_mode_decodes_with_the_direct_route_decoder(tiny_model_dir, other_decoder):
    zoom = {**engine_config(tiny_model_dir).zoom.model_dump(), "mode": "baseline"}
    split = QZoomEngine(engine_config(tiny_model_dir, model={"path": tiny_model_dir, "direct_route_path": other_decoder},
                                      zoom=zoom))
    other = QZoomEngine(engine_config(tiny_model_dir, model={"path": other_decoder}, zoom=zoom))
    assert [r.token_ids for r in split.generate(records())] == [r.token_ids for r in other.generate(records())]


@pytest.mark.parametrize("part", ["visual.", "model.embed_tokens.", "model.layers.0."])
def test_a_model_that_does_not_share_the_vision_tower_embeddings_or_prefix_layers_is_refused(tiny_model_dir, tmp_path, part):
    bad = variant(tiny_model_dir, tmp_path / "bad", lambda name: name.startswith(part))
    with pytest.raises(CheckpointError, match="not the checkpoint's"):
        QZoomEngine(engine_config(tiny_model_dir, model={"path": tiny_model_dir, "direct_route_path": bad}))
