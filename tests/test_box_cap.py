"""Tests for qzoom_ray.box_cap (beyond the paper): densest_window and cap_box_area."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qzoom_ray import box_cap
from qzoom_ray import geometry as g


@st.composite
def map_region_window(draw):
    gh, gw = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    prob = np.array(draw(st.lists(st.floats(0, 1), min_size=gh * gw, max_size=gh * gw))).reshape(gh, gw)
    x0, y0 = draw(st.integers(0, gw - 1)), draw(st.integers(0, gh - 1))
    x1, y1 = draw(st.integers(x0 + 1, gw)), draw(st.integers(y0 + 1, gh))
    return prob, (x0, y0, x1, y1), (draw(st.integers(0, 10)), draw(st.integers(0, 10)))


@settings(max_examples=200, deadline=None)
@given(map_region_window())
def test_densest_window_holds_the_most_mass_of_any_window_in_the_region(case):
    prob, (x0, y0, x1, y1), (wh, ww) = case
    bx0, by0, bx1, by1 = box_cap.densest_window(prob, (x0, y0, x1, y1), (wh, ww))
    h, w = min(max(wh, 1), y1 - y0), min(max(ww, 1), x1 - x0)
    assert (bx1 - bx0, by1 - by0) == (w, h)
    assert x0 <= bx0 and bx1 <= x1 and y0 <= by0 and by1 <= y1
    best = max(prob[yy : yy + h, xx : xx + w].sum() for yy in range(y0, y1 - h + 1) for xx in range(x0, x1 - w + 1))
    assert prob[by0:by1, bx0:bx1].sum() >= best - 1e-9


def test_densest_window_rejects_a_region_off_the_map():
    with pytest.raises(ValueError, match="region"):
        box_cap.densest_window(np.ones((4, 4)), (2, 0, 5, 4), (1, 1))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(50, 5000), st.integers(50, 5000), st.integers(2, 24), st.integers(2, 24),
    st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0.01, 2.0), st.integers(0, 10_000),
)
def test_a_capped_box_keeps_the_aspect_inside_the_box_at_the_cap(w, h, gh, gw, a, b, c, d, frac, seed):
    x0, x1 = sorted((a * w, c * w))
    y0, y1 = sorted((b * h, d * h))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return
    area = (x1 - x0) * (y1 - y0)
    prob = np.random.default_rng(seed).random((gh, gw))
    cx0, cy0, cx1, cy1 = box_cap.cap_box_area((x0, y0, x1, y1), frac * area, prob, (w, h))
    if frac >= 1.0:
        assert (cx0, cy0, cx1, cy1) == pytest.approx((x0, y0, x1, y1))
        return
    assert x0 - 1e-6 <= cx0 < cx1 <= x1 + 1e-6 and y0 - 1e-6 <= cy0 < cy1 <= y1 + 1e-6
    assert (cx1 - cx0) * (cy1 - cy0) == pytest.approx(frac * area, rel=1e-6)
    assert (cx1 - cx0) / (cy1 - cy0) == pytest.approx((x1 - x0) / (y1 - y0), rel=1e-6)


def test_the_capped_window_sits_on_the_maps_hot_spot():
    prob = np.full((10, 10), 0.2)
    prob[7, 2] = 1.0  # cell (x=2, y=7) of a 1000 x 1000 image: pixels 200-300 x 700-800
    x0, y0, x1, y1 = box_cap.cap_box_area((0.0, 0.0, 1000.0, 1000.0), 300.0**2, prob, (1000, 1000))
    assert (x1 - x0, y1 - y0) == pytest.approx((300.0, 300.0))
    assert x0 <= 200 and x1 >= 300 and y0 <= 700 and y1 >= 800


def test_a_box_overshooting_the_image_by_an_ulp_is_clamped():
    w, h = 1120, 840
    box = (700.0, 300.0, math.nextafter(float(w), 2e4), float(h))
    capped = box_cap.cap_box_area(box, 100.0**2, np.ones((6, 8)), (w, h))
    assert capped[2] <= w and capped[3] <= h
    g.norm_box_to_grid(g.normalise_box(capped, (w, h)), (6, 8))  # would raise past the image's edge


@settings(max_examples=200, deadline=None)
@given(st.floats(1, 4000), st.floats(1, 4000), st.integers(1, 10**6), st.integers(1, 10**6), st.floats(1.0, 3.0))
def test_crop_max_pixels_floors_the_downscale_within_the_budget(w, h, a, b, floor):
    lo, hi = min(a, b), max(a, b)
    got = box_cap.crop_max_pixels((10.0, 20.0, 10.0 + w, 20.0 + h), lo, hi, floor)
    assert lo <= got <= hi
    source = w * h / floor**2  # the crop's pixels at 1/floor of source resolution
    if got > lo:  # read at no more than 1/floor of source, unless the lower budget forces more
        assert got <= source
    if got < hi:  # and lowered only as far as the floor asks
        assert got >= int(source)
    assert box_cap.crop_max_pixels((10.0, 20.0, 10.0 + w, 20.0 + h), lo, hi, None) == hi


def test_crop_max_pixels_examples():
    # A 280 x 280 box (100 tokens at source) under a 128-token budget, floor 1.4: 51 tokens' pixels, not 100.
    assert box_cap.crop_max_pixels((0, 0, 280, 280), 16 * 784, 128 * 784, 1.4) == int(280 * 280 / 1.96)
    assert box_cap.crop_max_pixels((0, 0, 2800, 2800), 16 * 784, 128 * 784, 1.4) == 128 * 784  # large: the budget
    assert box_cap.crop_max_pixels((0, 0, 28, 28), 16 * 784, 128 * 784, 1.4) == 16 * 784  # tiny: the lower budget
    with pytest.raises(ValueError, match=">= 1"):
        box_cap.crop_max_pixels((0, 0, 28, 28), 1, 2, 0.5)
