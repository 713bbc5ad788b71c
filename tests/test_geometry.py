"""Tests for qzoom_ray.geometry: Qwen resize parity, RoI map -> box, crops (splicing and positions: test_splice_positions.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qzoom_ray import geometry as g

# ---------------------------------------------------------------- smart_resize parity


@settings(max_examples=400, deadline=None)
@given(
    h=st.integers(1, 20000),
    w=st.integers(1, 20000),
    min_tokens=st.integers(1, 1024),
    extra_tokens=st.integers(0, 16384),
    factor=st.sampled_from([28, 32, 14]),
)
def test_smart_resize_matches_transformers(
    h: int, w: int, min_tokens: int, extra_tokens: int, factor: int
) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_resize

    min_px = min_tokens * factor * factor
    max_px = (min_tokens + extra_tokens) * factor * factor
    try:
        expected: tuple[int, int] | None = hf_resize(
            h, w, factor=factor, min_pixels=min_px, max_pixels=max_px
        )
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(ValueError, match="aspect ratio"):
            g.smart_resize(h, w, factor, min_px, max_px)
        assert not g.crop_is_encodable((0, 0, w, h), factor, min_px, max_px)
    else:
        assert g.smart_resize(h, w, factor, min_px, max_px) == expected
        assert g.crop_is_encodable((5, 7, 5 + w, 7 + h), factor, min_px, max_px)
        assert g.visual_token_count(h, w, factor, min_px, max_px) == (expected[0] // factor) * (
            expected[1] // factor
        )


def test_smart_resize_known_values_and_errors() -> None:
    assert g.smart_resize(800, 800) == (812, 812)
    assert g.smart_resize(1000, 1000) == (980, 980)  # 1008x1008 would exceed max_pixels
    assert g.smart_resize(42, 42) == (56, 56)  # upscaled to min_pixels
    assert g.smart_resize(70, 70, min_pixels=1) == (56, 56)  # round(2.5) == 2 (banker's rounding)
    with pytest.raises(ValueError, match="aspect ratio"):
        g.smart_resize(1, 201)
    with pytest.raises(ValueError, match="aspect ratio"):
        g.smart_resize(10, 60, max_aspect_ratio=5.0)
    with pytest.raises(ValueError, match=">= 1"):
        g.smart_resize(0, 10)
    assert g.visual_token_count(1000, 1000, 28, 56 * 56, 28 * 28 * 1280) == 35 * 35


# ---------------------------------------------------------------- sink mask, blur, sigmoid


def test_sink_mask_20x20() -> None:
    m = g.qwen25_sink_mask(20, 20)
    expected = np.ones((20, 20), dtype=bool)
    expected[:5, 0] = False
    expected[0, :5] = False
    assert m.dtype == bool and np.array_equal(m, expected)
    assert (~m).sum() == 9


def test_sink_mask_non_square() -> None:
    m = g.qwen25_sink_mask(10, 40)
    assert np.array_equal(np.nonzero(~m[:, 0])[0], np.arange(2))
    assert np.array_equal(np.nonzero(~m[0])[0], np.arange(10))


@given(gh=st.integers(1, 64), gw=st.integers(1, 64))
def test_small_grids_untouched(gh: int, gw: int) -> None:
    m = g.qwen25_sink_mask(gh, gw)
    assert m.shape == (gh, gw)
    if gh * gw <= 256:
        assert m.all()
    else:
        assert not m[0, 0] and m[1:, 1:].all()


@given(gh=st.integers(1, 12), gw=st.integers(1, 12), value=st.floats(-1e6, 1e6))
def test_blur_preserves_constant(gh: int, gw: int, value: float) -> None:
    out = g.gaussian_blur3x3(np.full((gh, gw), value, dtype=np.float64))
    assert out.dtype == np.float64 and out.shape == (gh, gw)
    np.testing.assert_allclose(out, value, rtol=1e-12, atol=1e-9)


def test_blur_impulse_weights_and_mass() -> None:
    arr = np.zeros((7, 9))
    arr[3, 4] = 1.0
    out = g.gaussian_blur3x3(arr)
    k = np.exp(-np.array([1.0, 0.0, 1.0]) / 2.0)
    k /= k.sum()
    np.testing.assert_allclose(out[2:5, 3:6], np.outer(k, k))
    assert out.sum() == pytest.approx(1.0)
    # Reflect padding (mirror without repeating the edge): an edge impulse leaks back in from the mirror.
    edge = np.zeros((1, 5))
    edge[0, 1] = 1.0
    row = g.gaussian_blur3x3(edge)[0]
    np.testing.assert_allclose(row[:3], [2 * k[0], k[1], k[0]])


@given(arr=st.lists(st.floats(0, 1), min_size=30, max_size=30))
def test_blur_roughly_preserves_sum(arr: list[float]) -> None:
    a = np.array(arr).reshape(5, 6)
    out = g.gaussian_blur3x3(a)
    assert out.sum() == pytest.approx(a.sum(), abs=0.5 * a.size * 0.2 + 1e-9)
    assert out.min() >= a.min() - 1e-12 and out.max() <= a.max() + 1e-12


def test_prob_map_extreme_logits() -> None:
    logits = np.array([[1e308, -1e308, 0.0], [800.0, -800.0, 5.0]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        p = g.roi_prob_map(logits, None)
    assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    raw = g.gaussian_blur3x3(np.array([[1.0, 0.0, 0.5], [1.0, 0.0, 1 / (1 + math.exp(-5))]]))
    np.testing.assert_allclose(p, raw)


def test_prob_map_applies_mask() -> None:
    logits = np.full((20, 20), 50.0)
    mask = g.qwen25_sink_mask(20, 20)
    p = g.roi_prob_map(logits, mask)
    assert p[0, 0] < 0.5 and p[10, 10] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        g.roi_prob_map(logits, np.ones((3, 3), dtype=bool))


# ---------------------------------------------------------------- map -> box


maps = st.integers(1, 12).flatmap(
    lambda h: st.integers(1, 12).flatmap(
        lambda w: st.lists(st.floats(0, 1), min_size=h * w, max_size=h * w).map(
            lambda v: np.array(v).reshape(h, w)
        )
    )
)


@given(m=maps, thresh=st.floats(0, 1))
def test_box_contains_all_hot_cells(m: np.ndarray, thresh: float) -> None:
    box = g.roi_box_from_map(m, thresh)
    hot = m > thresh
    if not hot.any():
        assert box is None
        return
    assert box is not None
    x0, y0, x1, y1 = box
    assert all(isinstance(v, int) for v in box)
    assert 0 <= x0 < x1 <= m.shape[1] and 0 <= y0 < y1 <= m.shape[0]
    inside = np.zeros_like(hot)
    inside[y0:y1, x0:x1] = True
    assert not (hot & ~inside).any()
    # Tight: every edge row/column of the box holds a hot cell.
    assert hot[y0].any() and hot[y1 - 1].any() and hot[:, x0].any() and hot[:, x1 - 1].any()


@given(m=maps, t1=st.floats(0, 1), t2=st.floats(0, 1))
def test_higher_threshold_nests(m: np.ndarray, t1: float, t2: float) -> None:
    lo, hi = sorted((t1, t2))
    big = g.roi_box_from_map(m, lo)
    small = g.roi_box_from_map(m, hi)
    if small is None:
        return
    assert big is not None
    assert big[0] <= small[0] and big[1] <= small[1] and big[2] >= small[2] and big[3] >= small[3]


def test_threshold_is_strict() -> None:
    m = np.zeros((4, 4))
    m[1, 2] = 0.1
    assert g.roi_box_from_map(m, 0.1) is None
    assert g.roi_box_from_map(m, 0.09) == (2, 1, 3, 2)


@given(m=maps, frac=st.floats(0.01, 1))
def test_peak_relative_box_is_the_absolute_box_at_that_share_of_the_peak(m: np.ndarray, frac: float) -> None:
    box = g.roi_box_from_map(m, frac, relative=True)
    peak = float(m.max())
    if peak <= 0:
        assert box is None
        return
    assert box is not None
    x0, y0, x1, y1 = box
    py, px = np.unravel_index(int(m.argmax()), m.shape)
    assert x0 <= px < x1 and y0 <= py < y1  # never empty: the peak is always inside
    hot = m >= frac * peak
    inside = np.zeros_like(hot)
    inside[y0:y1, x0:x1] = True
    assert not (hot & ~inside).any()
    assert hot[y0].any() and hot[y1 - 1].any() and hot[:, x0].any() and hot[:, x1 - 1].any()


def test_peak_relative_box_ignores_the_maps_scale() -> None:
    m = np.zeros((6, 6))
    m[2, 1], m[2, 2], m[4, 4] = 0.9, 0.8, 0.5
    # Same shape, ten times less confident: the absolute rule loses the box, the relative one keeps it.
    assert g.roi_box_from_map(m, 0.7, relative=True) == g.roi_box_from_map(m / 10, 0.7, relative=True) == (1, 2, 3, 3)
    assert g.roi_box_from_map(m / 10, 0.7) is None
    assert g.roi_box_from_map(m, 0.5, relative=True) == (1, 2, 5, 5)
    assert g.roi_box_from_map(np.zeros((3, 3)), 0.5, relative=True) is None


def test_grid_box_to_pixels() -> None:
    assert g.grid_box_to_pixels((6, 3, 12, 9), (24, 32), (640, 480)) == (120.0, 60.0, 240.0, 180.0)


# ---------------------------------------------------------------- min-size growth


@st.composite
def boxes_in_images(draw: st.DrawFn) -> tuple[tuple[float, float, float, float], tuple[int, int], int]:
    w = draw(st.integers(1, 3000))
    h = draw(st.integers(1, 3000))
    xa, xb = sorted(draw(st.tuples(st.floats(0, w), st.floats(0, w))))
    ya, yb = sorted(draw(st.tuples(st.floats(0, h), st.floats(0, h))))
    return (xa, ya, xb, yb), (w, h), draw(st.integers(1, 64))


@given(case=boxes_in_images())
def test_grown_box_inside_and_big_enough(
    case: tuple[tuple[float, float, float, float], tuple[int, int], int],
) -> None:
    box, (w, h), min_side = case
    x0, y0, x1, y1 = g.grow_box_to_min_size(box, (w, h), min_side)
    assert all(isinstance(v, int) for v in (x0, y0, x1, y1))
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert x1 - x0 >= min(min_side, w) and y1 - y0 >= min(min_side, h)
    # Never loses more than the sub-pixel truncation of the original box.
    assert x0 <= box[0] + 1e-6 or x1 - x0 >= min_side
    assert x1 >= math.floor(box[2] + 1e-6) or x1 - x0 >= min_side


def test_grow_examples() -> None:
    # Centred growth: 10 px wide box at x=100..110 -> centre 105 -> 91..119.
    assert g.grow_box_to_min_size((100.0, 50.0, 110.0, 90.0), (640, 480)) == (91, 50, 119, 90)
    # Slides back inside at the left/top border, and at the right/bottom border.
    assert g.grow_box_to_min_size((0.0, 0.0, 4.0, 4.0), (640, 480)) == (0, 0, 28, 28)
    assert g.grow_box_to_min_size((636.0, 476.0, 640.0, 480.0), (640, 480)) == (612, 452, 640, 480)
    # Images smaller than min_side: the box becomes the full side.
    assert g.grow_box_to_min_size((3.0, 1.0, 5.0, 2.0), (10, 20)) == (0, 0, 10, 20)
    # Float noise just above an integer does not move the edge.
    assert g.grow_box_to_min_size((250.00000000000003, 0.0, 500.0, 100.0), (1000, 100)) == (250, 0, 500, 100)
    # Large boxes are only truncated.
    assert g.grow_box_to_min_size((10.7, 20.2, 200.9, 300.5), (640, 480)) == (10, 20, 200, 300)


def test_normalise_box() -> None:
    assert g.normalise_box((160, 120, 320, 480), (640, 480)) == (0.25, 0.25, 0.5, 1.0)


def test_crop_is_encodable_aspect() -> None:
    assert not g.crop_is_encodable((0, 0, 6000, 28), 28, 56 * 56, 28 * 28 * 1280)
    assert g.crop_is_encodable((0, 0, 5600, 28), 28, 56 * 56, 28 * 28 * 1280)


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_margin_box_holds_the_box_and_its_grid_cover_holds_the_margin_box(data):
    x0 = data.draw(st.floats(0.0, 0.98))
    y0 = data.draw(st.floats(0.0, 0.98))
    x1 = data.draw(st.floats(x0 + 0.01, 1.0))
    y1 = data.draw(st.floats(y0 + 0.01, 1.0))
    margin = data.draw(st.floats(0.0, 0.49))
    gx0, gy0, gx1, gy1 = grown = g.grow_box_by_margin((x0, y0, x1, y1), margin)
    assert 0.0 <= gx0 <= x0 and 0.0 <= gy0 <= y0 and x1 <= gx1 <= 1.0 and y1 <= gy1 <= 1.0
    assert gx0 == pytest.approx(max(0.0, x0 - margin)) and gx1 == pytest.approx(min(1.0, x1 + margin))
    gh, gw = data.draw(st.integers(1, 80)), data.draw(st.integers(1, 80))
    cx0, cy0, cx1, cy1 = g.norm_box_to_grid(grown, (gh, gw))
    assert 0 <= cx0 < cx1 <= gw and 0 <= cy0 < cy1 <= gh
    assert cx0 / gw <= gx0 + 1e-12 and cx1 / gw >= gx1 - 1e-12
    assert cy0 / gh <= gy0 + 1e-12 and cy1 / gh >= gy1 - 1e-12


def test_margin_and_grid_cover_reject_bad_boxes():
    with pytest.raises(ValueError, match="margin"):
        g.grow_box_by_margin((0.1, 0.1, 0.2, 0.2), 1.0)
    with pytest.raises(ValueError, match="normalised"):
        g.norm_box_to_grid((0.5, 0.1, 0.4, 0.2), (10, 10))
