"""The engine on a CUDA device against the same engine on the CPU (run on a GPU machine, see tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import engine_config, make_image_bytes

from qzoom_ray.model.engine import QZoomEngine
from qzoom_ray.model.state import EngineRecord

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (QZOOM_GPU_TESTS=1)"),
]


def _records() -> list[EngineRecord]:
    sizes = [(640, 480), (300, 900), (1200, 400), (512, 512)]
    return [EngineRecord(f"r{i}", make_image_bytes(w, h, seed=i), "What is written here?")
            for i, (w, h) in enumerate(sizes)]


def _engine(model_dir: str, device: str, dtype: str, gate_thresh: float) -> QZoomEngine:
    return QZoomEngine(engine_config(model_dir, model={"device": device, "dtype": dtype},
                                     zoom={"gate_thresh": gate_thresh, "roi_thresh": 0.5,
                                           "roi_thresh_mode": "peak_relative"}))


@pytest.mark.parametrize("gate_thresh", [0.0, 2.0], ids=["zoom", "direct"])
def test_float32_on_cuda_gives_the_cpu_logits_routes_and_boxes(tiny_model_dir, gate_thresh):
    # Not whole answers: the random test model's logits are near-ties, and CUDA's float32 reductions differ from
    # the CPU's in the last bits, so greedy decoding can part a few tokens in (seen on an H100).
    cpu = _engine(tiny_model_dir, "cpu", "float32", gate_thresh).generate(_records(), return_logits=True)
    gpu = _engine(tiny_model_dir, "cuda", "float32", gate_thresh).generate(_records(), return_logits=True)
    for c, g in zip(cpu, gpu, strict=True):
        assert g.error is None and c.error is None
        assert (g.route, g.roi_box_px) == (c.route, c.roi_box_px)
        assert g.gate_score == pytest.approx(c.gate_score, abs=1e-4)
        torch.testing.assert_close(g.first_logits.float().cpu(), c.first_logits.float().cpu(), atol=1e-3, rtol=1e-3)


def test_bfloat16_on_cuda_answers_every_record_through_both_routes(tiny_model_dir):
    cpu = _engine(tiny_model_dir, "cpu", "float32", 0.0).generate(_records())
    engine = _engine(tiny_model_dir, "cuda", "auto", 0.0)
    assert next(engine.loaded.adapter.model.parameters()).dtype == torch.bfloat16
    gpu = engine.generate(_records())
    assert all(r.error is None and r.answer is not None for r in gpu)
    assert [r.route for r in gpu] == [r.route for r in cpu]
    for c, g in zip(cpu, gpu, strict=True):
        assert g.gate_score == pytest.approx(c.gate_score, abs=0.05)
