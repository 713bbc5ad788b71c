"""The RoI path inside a padded batch: the right map cells per row, boxes in original pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import engine_config, make_image_bytes

from qzoom_ray import geometry
from qzoom_ray.model.engine import QZoomEngine
from qzoom_ray.model.state import ROUTE_EMPTY_MAP, ROUTE_ZOOM, EngineRecord, EngineResult, ZoomRequest

# Per record: (width, height, hot block on the merged grid as (x0, y0, x1, y1)).
CASES = {"wide": (900, 300, (3, 1, 6, 3)), "tall": (300, 700, (0, 4, 2, 9)), "small": (224, 224, (1, 1, 3, 3))}


def zoom_request_for_map(engine: QZoomEngine, record: EngineRecord, logit_block, monkeypatch) -> ZoomRequest:
    """The coarse pass on one record with the twig's logits replaced by ``logit_block(grid_h, grid_w)``."""
    prep = engine.prepare(record)
    gh, gw = prep.merged_grid

    def fixed_roi_logits(score_layer, hidden, pos_emb):
        out = torch.full(hidden.shape[:2], -20.0)
        out[0, prep.image_start : prep.image_start + gh * gw] = torch.from_numpy(logit_block(gh, gw).reshape(-1))
        return out, None

    monkeypatch.setattr(engine.adapter, "roi_logits", fixed_roi_logits)
    req = engine.coarse([prep], keep_prefix=True)[0]
    assert isinstance(req, ZoomRequest)
    return req


def test_boxes_follow_each_rows_map_under_left_padding(tiny_model_dir, monkeypatch):
    engine = QZoomEngine(engine_config(tiny_model_dir, zoom={"sink_mask": False, "roi_thresh": 0.5}))
    records = [
        EngineRecord(name, make_image_bytes(w, h, i), "Which code?" + " really?" * i, gate_thresh=0.0)
        for i, (name, (w, h, _)) in enumerate(CASES.items())
    ]
    grids = {}

    def fake_roi_logits(score_layer, hidden, pos_emb):
        # A hot block per row, written at that row's image-token columns in the padded batch.
        out = torch.full(hidden.shape[:2], -20.0)
        for b, name in enumerate(order):
            gh, gw = grids[name]
            block = np.full((gh, gw), -20.0)
            x0, y0, x1, y1 = CASES[name][2]
            block[y0:y1, x0:x1] = 20.0
            start = cols[name]
            out[b, start : start + gh * gw] = torch.from_numpy(block.reshape(-1))
        return out, None

    preps = [engine.prepare(r) for r in records]
    order = [p.record.id for p in preps]
    width = max(len(p.input_ids) for p in preps)
    cols = {p.record.id: width - len(p.input_ids) + p.image_start for p in preps}
    grids.update({p.record.id: p.merged_grid for p in preps})
    monkeypatch.setattr(engine.adapter, "roi_logits", fake_roi_logits)
    outs = engine.coarse(preps, keep_prefix=True)
    for p, req in zip(preps, outs, strict=True):
        w, h, (x0, y0, x1, y1) = CASES[p.record.id]
        gh, gw = p.merged_grid
        block_logits = np.full((gh, gw), -20.0)
        block_logits[y0:y1, x0:x1] = 20.0
        # The blur (reflect padding) may pull a border row/column in; the box must be this row's own.
        block = geometry.roi_box_from_map(geometry.roi_prob_map(block_logits, None), 0.5)
        assert req.box_grid == block
        assert block[0] <= x0 and block[1] <= y0 and block[2] >= x1 and block[3] >= y1
        assert block[2] - block[0] <= x1 - x0 + 2 and block[3] - block[1] <= y1 - y0 + 2
        expected = geometry.grow_box_to_min_size(geometry.grid_box_to_pixels(block, (gh, gw), (w, h)), (w, h), 28)
        assert req.box_px == expected
        roi = engine.prepare_roi(req)
        result = engine.zoom([(req, roi)])[0]
        assert result.route == ROUTE_ZOOM and result.roi_box_px == expected
        # The crop is re-encoded at the global view's budget: small crops are magnified.
        assert roi.num_tokens >= 64


def test_peak_relative_mode_boxes_a_timid_map(tiny_model_dir, monkeypatch):
    """A map that never reaches tau_roi has no absolute box; read relative to its peak it has a tight one."""
    w, h, (x0, y0, x1, y1) = CASES["wide"]
    record = EngineRecord("wide", make_image_bytes(w, h, 0), "Which code?", gate_thresh=0.0)

    def run(mode: str):
        engine = QZoomEngine(engine_config(tiny_model_dir, zoom={"sink_mask": False, "roi_thresh": 0.5,
                                                                  "roi_thresh_mode": mode}))
        prep = engine.prepare(record)
        gh, gw = prep.merged_grid
        block = np.full((gh, gw), -6.0)
        block[y0:y1, x0:x1] = -1.0  # sigmoid 0.27 inside, 0.0025 outside: below tau_roi everywhere

        def timid_roi_logits(score_layer, hidden, pos_emb):
            out = torch.full(hidden.shape[:2], -20.0)
            out[0, prep.image_start : prep.image_start + gh * gw] = torch.from_numpy(block.reshape(-1))
            return out, None

        monkeypatch.setattr(engine.adapter, "roi_logits", timid_roi_logits)
        return engine.coarse([prep], keep_prefix=True)[0], geometry.roi_prob_map(block, None)

    absolute, _ = run("absolute")
    assert isinstance(absolute, EngineResult) and absolute.route == ROUTE_EMPTY_MAP
    relative, prob = run("peak_relative")
    assert isinstance(relative, ZoomRequest)
    assert relative.box_grid == geometry.roi_box_from_map(prob, 0.5, relative=True)
    bx0, by0, bx1, by1 = relative.box_grid
    assert bx0 <= x0 and by0 <= y0 and bx1 >= x1 and by1 >= y1
    assert (bx1 - bx0) * (by1 - by0) <= (x1 - x0 + 2) * (y1 - y0 + 2) < prob.size


def test_roi_margin_grows_the_crop_and_its_positions_together(tiny_model_dir, monkeypatch):
    w, h, (x0, y0, x1, y1) = CASES["wide"]
    record = EngineRecord("wide", make_image_bytes(w, h, 0), "Which code?", gate_thresh=0.0)

    def run(margin: float) -> ZoomRequest:
        def hot_block(gh: int, gw: int) -> np.ndarray:
            block = np.full((gh, gw), -20.0)
            block[y0:y1, x0:x1] = 20.0
            return block

        engine = QZoomEngine(engine_config(tiny_model_dir, zoom={"sink_mask": False, "roi_thresh": 0.5,
                                                                  "roi_margin": margin}))
        return zoom_request_for_map(engine, record, hot_block, monkeypatch)

    tight, padded = run(0.0), run(0.1)
    gh, gw = tight.prepared.merged_grid
    tx0, ty0, tx1, ty1 = tight.box_px
    px0, py0, px1, py1 = padded.box_px
    # 0.1 of the image side on every side of the paper's box, clamped to the image.
    assert (px0, py0) == (max(0, round(tx0 - 0.1 * w)), max(0, round(ty0 - 0.1 * h)))
    assert (px1, py1) == (min(w, round(tx1 + 0.1 * w)), min(h, round(ty1 + 0.1 * h)))
    # The RoI position ids cover the grown crop: its grid box holds every cell the crop touches.
    assert padded.box_grid == geometry.norm_box_to_grid((px0 / w, py0 / h, px1 / w, py1 / h), (gh, gw))
    assert padded.box_grid[0] <= tight.box_grid[0] and padded.box_grid[2] >= tight.box_grid[2]


def test_a_pair_calibrated_for_the_records_budget_overrides_the_global_pair(tiny_model_dir):
    engine = QZoomEngine(engine_config(tiny_model_dir, zoom={
        "gate_thresh": 0.4, "roi_thresh": 0.3, "thresholds_by_budget": {256: {"gate_thresh": 0.01, "roi_thresh": 0.5}}}))
    px = engine.adapter.token_px**2
    image = make_image_bytes(300, 200, 0)

    def pair(**kw) -> tuple[float, float]:
        prep = engine.prepare(EngineRecord("r", image, "Which code?", min_pixels=16 * px, **kw))
        return prep.gate_thresh, prep.roi_thresh

    assert pair(max_pixels=256 * px) == (0.01, 0.5)
    assert pair(max_pixels=128 * px) == (0.4, 0.3)  # no entry for Max-128: the global pair
    assert pair(max_pixels=256 * px, gate_thresh=0.9) == (0.9, 0.5)  # a record's own value still wins


def test_roi_max_downscale_caps_a_page_wide_box_around_the_hot_spot(tiny_model_dir, monkeypatch):
    w, h = 1400, 1000  # 1.4 MP, far above the crop's 256-token budget
    record = EngineRecord("page", make_image_bytes(w, h, 0), "Which code?", gate_thresh=0.0)

    def run(cap: float | None) -> ZoomRequest:
        def plateau_with_a_hot_cell(gh: int, gw: int) -> np.ndarray:
            # Every cell is above 0.1 of the peak (a page-wide box); the peak is near the bottom-right corner.
            block = np.zeros((gh, gw))
            block[gh - 2, gw - 2] = 6.0
            return block

        engine = QZoomEngine(engine_config(tiny_model_dir, zoom={
            "sink_mask": False, "roi_thresh": 0.1, "roi_thresh_mode": "peak_relative", "roi_max_downscale": cap}))
        return zoom_request_for_map(engine, record, plateau_with_a_hot_cell, monkeypatch)

    page, capped = run(None), run(1.0)
    gh, gw = capped.prepared.merged_grid
    assert page.box_px == (0, 0, w, h)
    x0, y0, x1, y1 = capped.box_px
    hi = capped.prepared.max_pixels
    # At most the crop's pixel budget (1.0**2 times it) plus the integer rounding of the edges, so the crop is
    # read at source resolution, with the page's aspect, over the hot cell.
    assert (x1 - x0) * (y1 - y0) <= hi + (x1 - x0) + (y1 - y0) + 1
    assert (x1 - x0) / (y1 - y0) == pytest.approx(w / h, rel=0.02)
    hot_x, hot_y = (gw - 1.5) * w / gw, (gh - 1.5) * h / gh
    assert x0 <= hot_x <= x1 and y0 <= hot_y <= y1
    # The RoI position ids follow the capped crop.
    assert capped.box_grid == geometry.norm_box_to_grid((x0 / w, y0 / h, x1 / w, y1 / h), (gh, gw))


def test_roi_min_downscale_reads_a_small_crop_below_source_resolution(tiny_model_dir):
    """ZoomConfig.roi_min_downscale: the zoom pass's crop of a box under the budget gets fewer tokens."""
    px = 28 * 28
    record = EngineRecord("small", make_image_bytes(336, 252, 1), "Which code?", min_pixels=4 * px,
                          max_pixels=256 * px, gate_thresh=0.0, roi_thresh=0.0)  # the whole-map box: 108 tokens
    plain = QZoomEngine(engine_config(tiny_model_dir))
    (source,) = plain.generate([record])
    floored = QZoomEngine(engine_config(tiny_model_dir, zoom={"roi_min_downscale": 2.0}), loaded=plain.loaded)
    (half,) = floored.generate([record])
    assert source.route == half.route == ROUTE_ZOOM and source.roi_box_px == half.roi_box_px
    x0, y0, x1, y1 = source.roi_box_px
    assert source.roi_visual_tokens * px >= 0.8 * (x1 - x0) * (y1 - y0)  # at source resolution, give or take
    assert half.roi_visual_tokens * px <= (x1 - x0) * (y1 - y0) / 4  # at half of it, or less
    assert half.coarse_visual_tokens == source.coarse_visual_tokens  # the global view is untouched
