"""Per-record routing in one batch gives the same answers as running every record alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import engine_config, make_image_bytes

from qzoom_ray.model.engine import QZoomEngine
from qzoom_ray.model.state import (
    ROUTE_DIRECT,
    ROUTE_EMPTY_MAP,
    ROUTE_ERROR,
    ROUTE_ZOOM,
    EngineRecord,
)


def mixed_records() -> list[EngineRecord]:
    return [
        EngineRecord("zoom-a", make_image_bytes(300, 200, 0), "What is the value of Total?", gate_thresh=0.0),
        EngineRecord("direct-b", make_image_bytes(640, 480, 1), "How many shapes?", gate_thresh=2.0),
        EngineRecord("empty-c", make_image_bytes(448, 448, 2), "Colour?", gate_thresh=0.0, roi_thresh=1.0),
        EngineRecord("bad-d", b"\x89PNG\r\n\x1a\n not really", "Which code?"),
        EngineRecord("zoom-e", make_image_bytes(900, 300, 3), "Which code is on the red triangle?", gate_thresh=0.0),
        EngineRecord("direct-f", make_image_bytes(200, 500, 4), "Is it a form?", gate_thresh=2.0, max_new_tokens=3),
    ]


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    batched = QZoomEngine(engine_config(tiny_model_dir, max_batch_size=8, zoom={"return_roi_map": True}))
    single = QZoomEngine(engine_config(tiny_model_dir, max_batch_size=1, zoom={"return_roi_map": True}), loaded=batched.loaded)
    return batched, single


def test_mixed_batch_equals_batch_of_one(engines):
    batched, single = engines
    records = mixed_records()
    together = batched.generate(records, return_logits=True)
    alone = [single.generate([r], return_logits=True)[0] for r in records]
    assert [r.id for r in together] == [r.id for r in records]
    assert [r.route for r in together] == [ROUTE_ZOOM, ROUTE_DIRECT, ROUTE_EMPTY_MAP, ROUTE_ERROR, ROUTE_ZOOM, ROUTE_DIRECT]
    for t, s in zip(together, alone, strict=True):
        assert t.route == s.route and t.error == s.error
        if t.route == ROUTE_ERROR:
            assert "corrupt" in t.error or "truncated" in t.error
            continue
        assert t.token_ids == s.token_ids and t.answer == s.answer
        assert t.roi_box_px == s.roi_box_px and t.roi_visual_tokens == s.roi_visual_tokens
        assert t.coarse_visual_tokens == s.coarse_visual_tokens
        assert t.gate_score == pytest.approx(s.gate_score, abs=1e-5)
        torch.testing.assert_close(t.first_logits, s.first_logits, atol=1e-4, rtol=1e-4)
    assert together[5].output_tokens <= 3
    zoomed = together[0]
    assert zoomed.zoomed and zoomed.roi_visual_tokens > 0
    x0, y0, x1, y1 = zoomed.roi_box_px
    assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 200
    np.testing.assert_allclose(zoomed.roi_box_norm, (x0 / 300, y0 / 200, x1 / 300, y1 / 200))
    assert zoomed.roi_map is not None and zoomed.roi_map.shape == (zoomed.coarse_visual_tokens // zoomed.roi_map.shape[1], zoomed.roi_map.shape[1])
    assert together[2].roi_map is not None and together[2].roi_box_px is None


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (EngineRecord("q", make_image_bytes(64, 64), "   "), "empty question"),
        (EngineRecord("q", make_image_bytes(64, 64), "x" * 9000), "question too long"),
        (EngineRecord("a", make_image_bytes(2000, 8), "Which?"), "aspect ratio"),
        (EngineRecord("e", b"", "Which?"), "empty image"),
        (EngineRecord("m", "/nonexistent/file.png", "Which?"), "not found"),
        (EngineRecord("p", make_image_bytes(64, 64), "Which?", min_pixels=10_000, max_pixels=5_000), "min_pixels"),
    ],
)
def test_bad_records_get_clear_errors(engines, record, message):
    batched, _ = engines
    good = EngineRecord("good", make_image_bytes(128, 96), "What?")
    out = batched.generate([good, record])
    assert out[0].error is None and out[0].answer is not None
    assert out[1].route == ROUTE_ERROR and message in out[1].error


def test_internal_failure_is_isolated_to_its_record(engines, monkeypatch):
    batched, _ = engines
    original = batched.coarse

    def flaky(preps, **kw):
        if any(p.record.id == "boom" for p in preps):
            raise RuntimeError("simulated device failure")
        return original(preps, **kw)

    monkeypatch.setattr(batched, "coarse", flaky)
    out = batched.generate([EngineRecord("ok", make_image_bytes(128, 96), "What?"), EngineRecord("boom", make_image_bytes(96, 96), "Why?")])
    assert out[0].error is None and out[0].answer is not None
    assert out[1].route == ROUTE_ERROR and "simulated device failure" in out[1].error


def test_baseline_mode_is_a_plain_single_pass(tiny_model_dir, engines):
    batched, _ = engines
    baseline = QZoomEngine(engine_config(tiny_model_dir, zoom={"mode": "baseline"}), loaded=batched.loaded)
    gate_off = QZoomEngine(engine_config(tiny_model_dir, zoom={"gate_thresh": 2.0}), loaded=batched.loaded)
    recs = [EngineRecord("x", make_image_bytes(300, 200, 7), "What?", max_pixels=64 * 784, min_pixels=16 * 784)]
    b, g = baseline.generate(recs, return_logits=True)[0], gate_off.generate(recs, return_logits=True)[0]
    assert b.route == "baseline" and b.gate_score is None and b.coarse_visual_tokens <= 64
    assert b.token_ids == g.token_ids
    torch.testing.assert_close(b.first_logits, g.first_logits, atol=1e-4, rtol=1e-4)


def test_a_long_list_is_answered_window_by_window_with_the_same_answers(engines, monkeypatch):
    batched, _ = engines
    records = mixed_records() * 2
    records = [EngineRecord(f"{r.id}-{i}", r.image, r.question, gate_thresh=r.gate_thresh, roi_thresh=r.roi_thresh,
                            max_new_tokens=r.max_new_tokens) for i, r in enumerate(records)]
    whole = batched.generate(records)
    windowed = QZoomEngine(batched.config.model_copy(update={"generate_window": 2, "max_batch_size": 2}),
                           loaded=batched.loaded)
    held, peak = [], [0]
    real_prepare = windowed.prepare

    def counting_prepare(rec):
        held.append(rec.id)
        peak[0] = max(peak[0], len(held))
        return real_prepare(rec)

    import qzoom_ray.model.driver as driver

    real_run_once = driver._run_once

    def run_once(engine, recs, return_logits=False):
        out = real_run_once(engine, recs, return_logits)
        held.clear()  # the window is answered: its prepared records are released
        return out

    monkeypatch.setattr(windowed, "prepare", counting_prepare)
    monkeypatch.setattr(driver, "_run_once", run_once)
    out = windowed.generate(records)
    assert peak[0] == 2  # never more than one window prepared at a time
    assert [r.id for r in out] == [r.id for r in records]
    assert [(r.route, r.answer, r.error) for r in out] == [(r.route, r.answer, r.error) for r in whole]
