"""Tests for qzoom_ray.geometry's sequence splicing and M-RoPE RoI position ids (spec 3.5-3.6)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qzoom_ray import geometry as g

VS, VE, PAD = 151652, 151653, 151655


def coarse_positions_for(n_pre: int, grid_h: int, grid_w: int, n_post: int) -> np.ndarray:
    """Positions get_rope_index gives: n_pre text tokens, one image grid, n_post text tokens (first = <ve>)."""
    pre = np.tile(np.arange(n_pre, dtype=np.float64), (3, 1))
    rr, cc = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    img = np.stack([np.full(grid_h * grid_w, n_pre), n_pre + rr.ravel(), n_pre + cc.ravel()]).astype(
        np.float64
    )
    start = n_pre + max(grid_h, grid_w)
    post = np.tile(np.arange(start, start + n_post, dtype=np.float64), (3, 1))
    return np.concatenate([pre, img, post], axis=1)


# ---------------------------------------------------------------- worked example (spec 3.6)


def _worked_example(aligned: bool) -> tuple[np.ndarray, g.SpliceLayout]:
    coarse = coarse_positions_for(15, 24, 24, 10)
    layout = g.splice_layout(coarse.shape[1], image_start=15, num_image_tokens=576, roi_tokens=400)
    pos = g.roi_position_ids(coarse, layout, 15, (24, 24), (20, 20), (6, 3, 12, 9), aligned=aligned)
    return pos, layout


def test_worked_example_aligned() -> None:
    pos, layout = _worked_example(aligned=True)
    assert layout.prefix_len == 15 + 576 + 1
    assert pos.shape == (3, layout.total_len) and pos.dtype == np.float64
    glob = pos[:, 15:591]
    assert np.all(glob[0] == 15)
    assert glob[1:].min() == 15 and glob[1:].max() == 38
    assert np.all(pos[:, 591] == 39)  # global <ve>
    assert np.all(pos[:, layout.prefix_len] == 40)  # RoI <vs>
    roi = pos[:, layout.roi_start : layout.roi_start + 400].reshape(3, 20, 20)
    assert np.all(roi[0] == 41)
    np.testing.assert_allclose(roi[1][:, 0], np.linspace(18, 23, 20))
    np.testing.assert_allclose(roi[2][0], np.linspace(21, 26, 20))
    assert np.all(roi[1] == roi[1][:, :1]) and np.all(roi[2] == roi[2][:1])  # row-major layout
    assert np.all(pos[:, layout.roi_start + 400] == 61)  # RoI <ve>
    assert np.all(pos[:, layout.roi_start + 401] == 62)  # first suffix token, was 40
    assert np.array_equal(pos[:, -1], np.full(3, 48 + 22))
    assert g.decode_start_position(pos) == 71.0


def test_worked_example_standard() -> None:
    pos, layout = _worked_example(aligned=False)
    roi = pos[:, layout.roi_start : layout.roi_start + 400].reshape(3, 20, 20)
    assert np.all(roi[0] == 41)
    np.testing.assert_array_equal(roi[1][:, 0], np.arange(41, 61))
    np.testing.assert_array_equal(roi[2][0], np.arange(41, 61))
    aligned, _ = _worked_example(aligned=True)
    # Only RoI h/w differ between the two modes.
    diff = np.nonzero(np.any(pos != aligned, axis=0))[0]
    assert diff.min() >= layout.roi_start and diff.max() < layout.roi_start + 400
    assert np.all(pos[0] == aligned[0])


def test_single_row_roi_uses_start_value() -> None:
    coarse = coarse_positions_for(3, 4, 6, 2)
    layout = g.splice_layout(coarse.shape[1], 3, 24, roi_tokens=5)
    pos = g.roi_position_ids(coarse, layout, 3, (4, 6), (1, 5), (1, 2, 4, 3), aligned=True)
    roi = pos[:, layout.roi_start : layout.roi_start + 5]
    assert np.all(roi[1] == 3 + 2)
    np.testing.assert_allclose(roi[2], np.linspace(4, 6, 5))


# ---------------------------------------------------------------- splicing


@given(
    n_pre=st.integers(1, 20),
    gh=st.integers(1, 8),
    gw=st.integers(1, 8),
    n_post=st.integers(1, 20),
    rh=st.integers(1, 8),
    rw=st.integers(1, 8),
    data=st.data(),
)
def test_splice_ids_and_positions(
    n_pre: int, gh: int, gw: int, n_post: int, rh: int, rw: int, data: st.DataObject
) -> None:
    n_img = gh * gw
    coarse_len = n_pre + n_img + n_post
    coarse_ids = np.arange(1000, 1000 + coarse_len, dtype=np.int32)
    layout = g.splice_layout(coarse_len, n_pre, n_img, rh * rw)
    assert layout.total_len == layout.prefix_len + rh * rw + 2 + layout.suffix_len
    assert layout.prefix_len + layout.suffix_len == coarse_len

    ids = g.splice_token_ids(coarse_ids, layout, VS, VE, PAD)
    assert ids.dtype == np.int64 and ids.shape == (layout.total_len,)
    roi_slice = slice(layout.prefix_len, layout.prefix_len + rh * rw + 2)
    assert ids[roi_slice][0] == VS and ids[roi_slice][-1] == VE and np.all(ids[roi_slice][1:-1] == PAD)
    kept = np.concatenate([ids[: layout.prefix_len], ids[roi_slice.stop :]])
    assert np.array_equal(kept, coarse_ids)  # coarse tokens keep their order

    x0 = data.draw(st.integers(0, gw - 1))
    x1 = data.draw(st.integers(x0 + 1, gw))
    y0 = data.draw(st.integers(0, gh - 1))
    y1 = data.draw(st.integers(y0 + 1, gh))
    coarse = coarse_positions_for(n_pre, gh, gw, n_post)
    s = float(n_pre)
    for aligned in (True, False):
        pos = g.roi_position_ids(coarse, layout, n_pre, (gh, gw), (rh, rw), (x0, y0, x1, y1), aligned)
        assert pos.shape == (3, layout.total_len)
        assert np.array_equal(pos[:, : layout.prefix_len], coarse[:, : layout.prefix_len])
        after = pos[:, roi_slice.stop - 1 :]  # RoI <ve> then the suffix text
        assert np.all(np.diff(after[0]) > 0) and np.all(after[0] == after[1]) and np.all(after[1] == after[2])
        assert after[0, 0] > pos[:, : roi_slice.stop - 1].max()  # nothing after the RoI overlaps it
        roi = pos[:, layout.roi_start : layout.roi_start + rh * rw]
        if aligned:
            assert roi[1].min() >= s + y0 - 1e-9 and roi[1].max() <= s + y1 - 1 + 1e-9
            assert roi[2].min() >= s + x0 - 1e-9 and roi[2].max() <= s + x1 - 1 + 1e-9
        assert g.decode_start_position(pos) == pos[0, -1] + 1


def test_splice_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        g.splice_layout(10, image_start=5, num_image_tokens=5, roi_tokens=4)
    layout = g.splice_layout(12, 5, 5, 4)
    with pytest.raises(ValueError):
        g.splice_token_ids(np.arange(11), layout, VS, VE, PAD)
    coarse = coarse_positions_for(5, 1, 5, 2)
    with pytest.raises(ValueError):
        g.roi_position_ids(coarse, layout, 5, (1, 5), (2, 3), (0, 0, 2, 1), aligned=True)
    with pytest.raises(ValueError):
        g.roi_position_ids(coarse, layout, 5, (1, 5), (2, 2), (0, 0, 6, 1), aligned=True)
