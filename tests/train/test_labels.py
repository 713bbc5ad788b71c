"""Stage-1 label denoising on hand-made attention maps (spec §1.6), and the tiles of the large-image fallback."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qzoom_ray.train.labels import (
    IGNORE,
    LabelParams,
    evidence_cells,
    label_tiles,
    make_pseudo_label,
    padding_cells,
    spread_tile_map,
)


def _map(h: int = 10, w: int = 10, base: float = 1e-4) -> np.ndarray:
    return np.full((h, w), base)


def test_foreground_box_background_and_ignore():
    a = _map()
    a[4, 4], a[4, 5], a[5, 4] = 0.10, 0.08, 0.02  # 0.02 < 0.25 * 0.10: inside the box but not foreground
    a[0, 9] = 0.02  # moderate attention far away: ambiguous, not background
    lab = make_pseudo_label(a)
    assert lab.valid and lab.reason == "ok"
    assert lab.fg_box == (3, 3, 7, 6)  # FG cells (row 4, cols 4..5) dilated by one cell by the blur
    assert lab.labels[4, 4] == 1 and lab.labels[4, 5] == 1
    assert lab.labels[5, 4] == IGNORE and lab.labels[3, 3] == IGNORE  # in the box, below the FG threshold
    assert lab.labels[0, 9] == IGNORE  # 0.02 >= 0.05 * 0.10
    assert lab.labels[9, 0] == 0 and lab.labels[0, 0] == 0
    assert set(np.unique(lab.labels)) == {1, 0, IGNORE}


def test_sink_cells_are_removed_before_the_maximum_and_ignored():
    a = _map()
    a[0, 0] = 0.9  # a sink would dominate the max and wipe out the real evidence
    a[6, 6] = 0.05
    sink = np.zeros_like(a)
    sink[0, 0] = 0.5
    lab = make_pseudo_label(a, sink)
    assert lab.valid and lab.peak == 0.05
    assert lab.labels[6, 6] == 1 and lab.labels[0, 0] == IGNORE
    no_sink = make_pseudo_label(a)
    assert no_sink.labels[0, 0] == 1 and no_sink.labels[6, 6] == IGNORE


def test_padding_cells_are_background_and_never_foreground():
    a = _map(8, 8)
    a[0, :] = 0.5  # attention on the gray padding row (content is a landscape strip)
    a[4, 3] = 0.05
    pad = padding_cells((8, 8), (200, 100), 200)
    assert pad[0].all() and pad[-1].all() and not pad[4].any()
    lab = make_pseudo_label(a, padding=pad)
    assert lab.labels[4, 3] == 1
    assert (lab.labels[pad] == 0).all()


def test_validity_filter_weak_and_too_large():
    weak = _map()
    weak[2, 2] = 4e-3
    lab = make_pseudo_label(weak)
    assert not lab.valid and lab.reason == "weak" and (lab.labels == IGNORE).all()

    spread = np.full((6, 6), 0.03)  # everything is foreground: the box covers the whole map
    lab = make_pseudo_label(spread)
    assert not lab.valid and lab.reason == "too_large" and (lab.labels == IGNORE).all()
    assert make_pseudo_label(spread, params=LabelParams(max_area_ratio=1.1)).valid

    assert make_pseudo_label(np.zeros((4, 4))).reason == "empty"


def test_evidence_cells_cover_the_box():
    cells = evidence_cells((50, 0, 150, 40), (200, 100), (5, 4))
    assert cells.shape == (5, 4)
    assert cells[0:2, 1:3].all() and cells.sum() == 4


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 6000), h=st.integers(1, 6000), max_px=st.integers(100_000, 3_000_000),
       overlap=st.floats(0.0, 0.5))
def test_label_tiles_cover_the_image_within_the_pixel_cap(w, h, max_px, overlap):
    tiles = label_tiles((w, h), max_px, overlap)
    covered = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in tiles:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert (x1 - x0) * (y1 - y0) <= max_px
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    if w * h <= max_px:
        assert tiles == [(0, 0, w, h)]


def test_label_tiles_refuse_a_cap_no_layout_meets():
    with pytest.raises(ValueError, match="no tiling"):
        label_tiles((6000, 6000), 100 * 100)  # 32 x 32 tiles of 6000 px are still 188 px a side


def test_label_tiles_of_an_ultra_hr_page_overlap_and_stay_close_to_square():
    tiles = label_tiles((4500, 3000), 1_500_000, 0.15)
    assert len(tiles) == 12  # 4 x 3
    x0, y0, x1, y1 = tiles[0]
    assert 1.0 <= (x1 - x0) / (y1 - y0) <= 2.0
    assert tiles[1][0] < x1  # neighbours overlap, so text cut by one seam is whole in the next tile


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_spread_tile_map_keeps_mass_inside_the_tile(data):
    w, h = data.draw(st.integers(20, 5000)), data.draw(st.integers(20, 5000))
    x0, y0 = data.draw(st.integers(0, w - 2)), data.draw(st.integers(0, h - 2))
    x1, y1 = data.draw(st.integers(x0 + 1, w)), data.draw(st.integers(y0 + 1, h))
    th, tw, gh, gw = (data.draw(st.integers(1, 40)) for _ in range(4))
    tile = np.random.default_rng(data.draw(st.integers(0, 99))).random((th, tw))
    canvas = spread_tile_map(tile, (x0, y0, x1, y1), (w, h), (gh, gw))
    assert canvas.shape == (gh, gw)
    np.testing.assert_allclose(canvas.sum(), tile.sum(), rtol=1e-9)
    outside = ~evidence_cells((x0, y0, x1, y1), (w, h), (gh, gw))
    assert np.all(canvas[outside] == 0.0)


def test_spread_tile_map_puts_a_tile_cell_where_it_lies_on_the_page():
    tile = np.zeros((4, 4))
    tile[1, 2] = 1.0  # pixels x 200..300, y 100..200 of a 400 x 400 tile at (1000, 2000)
    canvas = spread_tile_map(tile, (1000, 2000, 1400, 2400), (4000, 3000), (30, 40))  # cells of 100 x 100 px
    assert canvas[21, 12] == 1.0 and canvas.sum() == 1.0
