"""The zoom pass: KV reuse is exact, and the spliced sequence is what stock transformers would build."""

from __future__ import annotations

import numpy as np
import torch
from conftest import engine_config, make_image_bytes

from qzoom_ray import geometry
from qzoom_ray.model.engine import QZoomEngine
from qzoom_ray.model.splice import build_zoom_batch, coarse_positions
from qzoom_ray.model.state import EngineRecord, ZoomRequest

SIZES = [(300, 200), (640, 480), (224, 448)]


def zoom_requests(engine: QZoomEngine, roi_thresh: float = 0.5) -> list[tuple[ZoomRequest, object]]:
    records = [
        EngineRecord(f"r{i}", make_image_bytes(w, h, i), "What is the value of Total?" + " ?" * i, gate_thresh=0.0, roi_thresh=roi_thresh)
        for i, (w, h) in enumerate(SIZES)
    ]
    preps = [engine.prepare(r) for r in records]
    outs = engine.coarse(preps, keep_prefix=True)
    assert all(isinstance(o, ZoomRequest) for o in outs), [getattr(o, "route", "zoom") for o in outs]
    return [(req, engine.prepare_roi(req)) for req in outs]


def test_kv_reuse_equals_recompute(tiny_model_dir):
    for aligned in (True, False):
        engine = QZoomEngine(engine_config(tiny_model_dir, zoom={"reuse_src_pos": aligned}))
        items = zoom_requests(engine)
        reused = engine.zoom(items, reuse_prefix=True, return_logits=True)
        fresh = engine.zoom(items, reuse_prefix=False, return_logits=True)
        zb = build_zoom_batch(engine, items, reuse_prefix=True)
        assert zb.cached_width > 0, "the batch must actually reuse cached prefix columns"
        for a, b in zip(reused, fresh, strict=True):
            torch.testing.assert_close(a.first_logits, b.first_logits, atol=1e-4, rtol=1e-4)
            assert a.token_ids == b.token_ids
            assert a.roi_visual_tokens > 0 and a.zoomed


def test_standard_mode_zoom_equals_stock_forward_with_two_images(tiny_model_dir):
    """With reuse_src_pos=False the spliced pass is a stock two-image forward of the same sequence."""
    engine = QZoomEngine(engine_config(tiny_model_dir, zoom={"reuse_src_pos": False}))
    items = zoom_requests(engine)
    ours = engine.zoom(items, reuse_prefix=True, return_logits=True)
    model = engine.adapter.model
    for (req, roi), res in zip(items, ours, strict=True):
        p = req.prepared
        layout = geometry.splice_layout(len(p.input_ids), p.image_start, p.num_image_tokens, roi.num_tokens)
        ids = geometry.splice_token_ids(
            p.input_ids, layout, engine.vision_start_id, engine.vision_end_id, engine.image_token_id
        )
        ids_t = torch.from_numpy(ids)[None]
        out = model(
            input_ids=ids_t,
            attention_mask=torch.ones_like(ids_t),
            pixel_values=torch.from_numpy(np.concatenate([p.pixel_values, roi.pixel_values])),
            image_grid_thw=torch.tensor([p.grid_thw, roi.grid_thw]),
            mm_token_type_ids=(ids_t == engine.image_token_id).int(),
        )
        torch.testing.assert_close(res.first_logits, out.logits[0, -1].float(), atol=1e-4, rtol=1e-4)


def test_standard_positions_equal_get_rope_index_on_spliced_sequence(tiny_engine):
    engine = tiny_engine
    for req, roi in zoom_requests(engine):
        p = req.prepared
        layout = geometry.splice_layout(len(p.input_ids), p.image_start, p.num_image_tokens, roi.num_tokens)
        ids = torch.from_numpy(
            geometry.splice_token_ids(p.input_ids, layout, engine.vision_start_id, engine.vision_end_id, engine.image_token_id)
        )[None]
        stock, _ = engine.adapter.model.model.get_rope_index(
            ids,
            mm_token_type_ids=(ids == engine.image_token_id).int(),
            image_grid_thw=torch.tensor([p.grid_thw, roi.grid_thw]),
            attention_mask=torch.ones_like(ids),
        )
        ours = geometry.roi_position_ids(
            coarse_positions(engine, p), layout, p.image_start, p.merged_grid, roi.merged_grid, req.box_grid, aligned=False
        )
        np.testing.assert_array_equal(ours, stock[:, 0].numpy())
        aligned = geometry.roi_position_ids(
            coarse_positions(engine, p), layout, p.image_start, p.merged_grid, roi.merged_grid, req.box_grid, aligned=True
        )
        roi_cols = slice(layout.roi_start, layout.roi_start + roi.num_tokens)
        # Aligned mode differs only in the RoI tokens' h/w rows.
        np.testing.assert_array_equal(np.delete(aligned, np.r_[roi_cols], axis=1), np.delete(ours, np.r_[roi_cols], axis=1))
        np.testing.assert_array_equal(aligned[0, roi_cols], ours[0, roi_cols])


def test_zoom_at_the_twigs_own_box_reproduces_the_qzoom_answer(tiny_model_dir):
    """A region given as a normalised box takes the same second pass as the twig's box it came from."""
    engine = QZoomEngine(engine_config(tiny_model_dir))
    items = zoom_requests(engine)
    twig = engine.zoom(items, reuse_prefix=True, return_logits=True)
    records = [req.prepared.record for req, _ in items]
    # The twig's grid box as image fractions (its pixel box may have been grown past the cells).
    boxes = []
    for req, _ in items:
        gh, gw = req.prepared.merged_grid
        x0, y0, x1, y1 = req.box_grid
        boxes.append((x0 / gw, y0 / gh, x1 / gw, y1 / gh))
    given = engine.zoom_at(records, boxes)
    for (req, _), box, a, b in zip(items, boxes, twig, given, strict=True):
        assert engine.request_for_box(req.prepared, box).box_grid == req.box_grid
        assert b.roi_box_px == a.roi_box_px and b.zoomed and b.route == "zoom"
        assert b.token_ids == a.token_ids and b.answer == a.answer


def test_zoom_at_reports_bad_boxes_and_records_in_place(tiny_model_dir):
    engine = QZoomEngine(engine_config(tiny_model_dir, generation={"max_new_tokens": 2}))
    good = EngineRecord("good", make_image_bytes(320, 240, 1), "Where?")
    bad_box = EngineRecord("bad-box", make_image_bytes(320, 240, 2), "Where?")
    bad_image = EngineRecord("bad-image", b"not an image", "Where?")
    out = engine.zoom_at([good, bad_box, bad_image], [(0.1, 0.2, 0.5, 0.6), (0.5, 0.2, 0.4, 0.6), (0.0, 0.0, 1.0, 1.0)])
    assert [r.id for r in out] == ["good", "bad-box", "bad-image"]
    assert out[0].error is None and out[0].zoomed and out[0].roi_box_px == (32, 48, 160, 144)
    assert out[1].error and "normalised" in out[1].error
    assert out[2].error and not out[2].zoomed


def test_zoom_at_answers_a_long_list_a_window_at_a_time(tiny_model_dir, monkeypatch):
    """Like engine.generate: the same answers, and never more than a window of prepared records held at once."""
    from qzoom_ray.model import given_region

    engine = QZoomEngine(engine_config(tiny_model_dir, generation={"max_new_tokens": 2}, max_batch_size=2))
    records = [EngineRecord(f"r{i}", make_image_bytes(300 + 20 * i, 240, i), "Where?") for i in range(5)]
    boxes = [(0.1 * (i % 3), 0.2, 0.6, 0.7) for i in range(5)]
    whole = engine.zoom_at(records, boxes)
    windowed = QZoomEngine(engine.config.model_copy(update={"generate_window": 2}), loaded=engine.loaded)
    calls: list[int] = []
    real = given_region.zoom_at
    monkeypatch.setattr(given_region, "zoom_at", lambda eng, recs, bxs: calls.append(len(recs)) or real(eng, recs, bxs))
    got = windowed.zoom_at(records, boxes)
    assert calls[0] == 5 and calls[1:] == [2, 2, 1]  # the whole list, then one call per window
    assert [(r.id, r.answer, r.token_ids, r.roi_box_px) for r in got] == [
        (r.id, r.answer, r.token_ids, r.roi_box_px) for r in whole]


def test_branch_point_zero_runs_both_routes_and_reuses_exactly(tmp_path):
    """K = 0 (the branches read the embeddings; the tiny model's shipped depth): no base layer runs before the
    branches, nothing sits in the prefix KV, and a batch mixing direct and zoomed records still decodes both."""
    from qzoom_ray.model.tiny import build_tiny_qzoom

    model_dir = build_tiny_qzoom(tmp_path / "k0", seed=0, num_layers=3, twig_K=0, twig_T=2)
    engine = QZoomEngine(engine_config(str(model_dir)))
    assert engine.K == 0
    records = [
        EngineRecord(f"r{i}", make_image_bytes(w, h, i), "What is the value of Total?", gate_thresh=g, roi_thresh=0.3)
        for i, ((w, h), g) in enumerate(zip(SIZES, (0.0, 1.01, 0.0), strict=True))
    ]
    outs = engine.coarse([engine.prepare(r) for r in records], keep_prefix=True)
    assert [isinstance(o, ZoomRequest) for o in outs] == [True, False, True]
    assert outs[1].route == "direct" and outs[1].token_ids
    items = [(req, engine.prepare_roi(req)) for req in outs if isinstance(req, ZoomRequest)]
    assert all(req.prefix.kv == [] for req, _ in items)
    reused = engine.zoom(items, reuse_prefix=True, return_logits=True)
    fresh = engine.zoom(items, reuse_prefix=False, return_logits=True)
    for a, b in zip(reused, fresh, strict=True):
        torch.testing.assert_close(a.first_logits, b.first_logits, atol=1e-4, rtol=1e-4)
        assert a.token_ids == b.token_ids and a.zoomed


def test_answer_logprobs_are_those_of_the_decoded_tokens(tiny_model_dir):
    """Each token's log-probability is read from the distribution greedy decoding picked it from."""
    from qzoom_ray.model.decode import apply_repetition_penalty

    engine = QZoomEngine(engine_config(tiny_model_dir))
    items = zoom_requests(engine)
    zoomed = engine.zoom(items, return_logits=True)
    direct_engine = QZoomEngine(engine_config(tiny_model_dir, zoom={"mode": "baseline"}), loaded=engine.loaded)
    direct = direct_engine.coarse([req.prepared for req, _ in items], return_logits=True)
    penalty = engine.loaded.repetition_penalty
    for (req, _), res in zip(items + items, zoomed + direct, strict=True):
        assert len(res.token_logprobs) == len(res.token_ids) > 0
        assert all(lp <= 0.0 for lp in res.token_logprobs)
        assert res.answer_logprob == sum(res.token_logprobs)
        seen = torch.zeros_like(res.first_logits, dtype=torch.bool)
        seen[torch.from_numpy(req.prepared.input_ids)] = True
        first = apply_repetition_penalty(res.first_logits[None], seen[None], penalty)[0]
        want = torch.log_softmax(first, dim=-1)[res.token_ids[0]]
        assert abs(res.token_logprobs[0] - float(want)) < 1e-4
