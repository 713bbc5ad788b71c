"""The RoI box cap (beyond the paper): a box too large to zoom shrinks to where the RoI map is densest."""

from __future__ import annotations

import math

import numpy as np

from qzoom_ray.geometry import GridBox, norm_box_to_grid


def densest_window(prob_map: np.ndarray, region: GridBox, win_hw: tuple[int, int]) -> GridBox:
    """The ``win_h`` x ``win_w`` run of cells inside ``region`` holding the most map mass (the first in row-major
    order on ties); a window larger than the region is clipped to it."""
    prob = np.asarray(prob_map, dtype=np.float64)
    x0, y0, x1, y1 = region
    if not (0 <= x0 < x1 <= prob.shape[1] and 0 <= y0 < y1 <= prob.shape[0]):
        raise ValueError(f"region {region} is not a non-empty run of cells of a {prob.shape} map")
    win_h, win_w = min(max(1, win_hw[0]), y1 - y0), min(max(1, win_hw[1]), x1 - x0)
    integral = np.zeros((y1 - y0 + 1, x1 - x0 + 1))
    integral[1:, 1:] = prob[y0:y1, x0:x1].cumsum(0).cumsum(1)
    sums = integral[win_h:, win_w:] - integral[:-win_h, win_w:] - integral[win_h:, :-win_w] + integral[:-win_h, :-win_w]
    iy, ix = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return x0 + int(ix), y0 + int(iy), x0 + int(ix) + win_w, y0 + int(iy) + win_h


def cap_box_area(
    box_px: tuple[float, float, float, float], max_area: float, prob_map: np.ndarray, image_wh: tuple[int, int]
) -> tuple[float, float, float, float]:
    """Shrink a pixel box larger than ``max_area`` to that area (same aspect), where the RoI map is densest.

    Beyond the paper: on a very large image a diffuse map bounds most of the page, and a crop of most of the page
    encoded at the view's budget is no zoom at all. Capping the box at ``k**2`` times the crop's pixel budget
    keeps the crop at >= 1/k of source resolution; the window keeps the box's aspect and sits, inside the box,
    over the run of map cells with the most mass. A box within the cap is returned unchanged.
    """
    if max_area <= 0:
        raise ValueError(f"max_area must be positive, got {max_area}")
    # Grid-to-pixel scaling can overshoot the image's edge by an ulp; clamp, since callers normalise the result.
    x0, x1 = (min(max(float(v), 0.0), float(image_wh[0])) for v in (box_px[0], box_px[2]))
    y0, y1 = (min(max(float(v), 0.0), float(image_wh[1])) for v in (box_px[1], box_px[3]))
    w, h = x1 - x0, y1 - y0
    if w <= 0 or h <= 0:
        raise ValueError(f"box must have positive width and height inside the image, got {box_px}")
    if w * h <= max_area:
        return x0, y0, x1, y1
    shrink = math.sqrt(max_area / (w * h))
    win_w, win_h = w * shrink, h * shrink
    prob = np.asarray(prob_map)
    grid_h, grid_w = prob.shape
    cell_w, cell_h = image_wh[0] / grid_w, image_wh[1] / grid_h
    region = norm_box_to_grid((x0 / image_wh[0], y0 / image_wh[1], x1 / image_wh[0], y1 / image_wh[1]), prob.shape)
    wx0, wy0, wx1, wy1 = densest_window(prob, region, (round(win_h / cell_h), round(win_w / cell_w)))
    cx, cy = (wx0 + wx1) / 2 * cell_w, (wy0 + wy1) / 2 * cell_h
    nx0 = min(max(cx - win_w / 2, x0), x1 - win_w)
    ny0 = min(max(cy - win_h / 2, y0), y1 - win_h)
    # min(): the float sum may overshoot the box's edge by an ulp.
    return nx0, ny0, min(nx0 + win_w, x1), min(ny0 + win_h, y1)


def crop_max_pixels(box_px: tuple[float, float, float, float], lo: int, hi: int, min_downscale: float | None) -> int:
    """The crop's upper pixel budget: ``hi``, lowered so a box is read at no more than 1/``min_downscale`` of its
    source resolution (``ZoomConfig.roi_min_downscale``), and never below ``lo``."""
    if min_downscale is None:
        return hi
    if min_downscale < 1.0:
        raise ValueError(f"min_downscale must be >= 1, got {min_downscale}")
    area = max(0.0, box_px[2] - box_px[0]) * max(0.0, box_px[3] - box_px[1])
    return max(lo, min(hi, int(area / min_downscale**2)))
