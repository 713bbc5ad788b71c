"""Stage-1 pseudo labels: denoised tri-state maps from answer-token -> image attention (spec §1.6).

Pure numpy. A label map holds 1 (foreground: the evidence), 0 (background: confidently not the
evidence) and -100 (ignore: ambiguous cells, attention sinks). A sample whose foreground is too
large or whose attention is too weak gets an all-ignore map and contributes no loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qzoom_ray.geometry import gaussian_blur3x3

IGNORE = -100
GridBox = tuple[int, int, int, int]  # x0, y0, x1, y1 in cells, exclusive ends


@dataclass(frozen=True)
class LabelParams:
    """Defaults are the values of the authors' stage-1 scripts (spec §6.2), not their argparse defaults."""

    sink_thresh: float = 1e-2
    fg_coeff: float = 0.25
    bg_coeff: float = 0.05
    max_area_ratio: float = 0.5
    min_peak: float = 5e-3
    blur_sigma: float = 1.0


@dataclass
class PseudoLabel:
    labels: np.ndarray  # (h, w) int64 in {1, 0, -100}
    valid: bool
    reason: str  # "ok" | "weak" | "too_large" | "empty"
    fg_box: GridBox | None
    peak: float


def padding_cells(grid_hw: tuple[int, int], content_wh: tuple[int, int], padded_side: int) -> np.ndarray:
    """Cells of a square-padded image that hold only the gray padding (``expand2square`` centres the content).

    A cell counts as padding when its centre lies outside the content rectangle.
    """
    gh, gw = grid_hw
    cw, ch = content_wh
    x0 = (padded_side - cw) / 2.0
    y0 = (padded_side - ch) / 2.0
    xs = (np.arange(gw) + 0.5) * padded_side / gw
    ys = (np.arange(gh) + 0.5) * padded_side / gh
    inside_x = (xs >= x0) & (xs < x0 + cw)
    inside_y = (ys >= y0) & (ys < y0 + ch)
    return ~(inside_y[:, None] & inside_x[None, :])


def _extent(mask: np.ndarray) -> GridBox | None:
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def make_pseudo_label(
    attn: np.ndarray,
    sink: np.ndarray | None = None,
    padding: np.ndarray | None = None,
    params: LabelParams | None = None,
) -> PseudoLabel:
    """Tri-state labels for one grounding map ``attn`` (h, w); ``sink`` is the sink-head map, ``padding``
    a boolean mask of known non-content cells."""
    p = params or LabelParams()
    a = np.asarray(attn, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D attention map, got shape {a.shape}")
    pad = np.zeros(a.shape, bool) if padding is None else np.asarray(padding, bool)
    sinks = np.zeros(a.shape, bool) if sink is None else np.asarray(sink, np.float64) >= p.sink_thresh
    if pad.shape != a.shape or sinks.shape != a.shape:
        raise ValueError("sink/padding masks must have the attention map's shape")
    removed = sinks | pad
    g = np.where(removed, 0.0, a)
    peak = float(g.max()) if g.size else 0.0
    labels = np.full(a.shape, IGNORE, dtype=np.int64)
    if peak <= 0.0:
        return PseudoLabel(labels, False, "empty", None, peak)

    fg = g > p.fg_coeff * peak
    # The blur dilates the foreground by about one cell, so the box leaves a margin around the evidence.
    blurred = gaussian_blur3x3(np.where(fg, g, 0.0), sigma=p.blur_sigma)
    box = _extent(blurred > 0)
    assert box is not None  # fg holds at least the peak cell
    x0, y0, x1, y1 = box
    in_box = np.zeros(a.shape, bool)
    in_box[y0:y1, x0:x1] = True

    if peak < p.min_peak:
        return PseudoLabel(labels, False, "weak", box, peak)
    if (x1 - x0) * (y1 - y0) >= p.max_area_ratio * a.size:
        return PseudoLabel(labels, False, "too_large", box, peak)

    # Background must be far from the evidence AND clearly unattended; sinks are unknown, not background.
    bg = (~in_box & (g < p.bg_coeff * peak) & ~sinks) | pad
    labels[bg] = 0
    labels[fg] = 1
    return PseudoLabel(labels, True, "ok", box, peak)


def evidence_cells(box_px: tuple[float, float, float, float], image_wh: tuple[int, int],
                   grid_hw: tuple[int, int]) -> np.ndarray:
    """Boolean (h, w) mask of the grid cells a source-pixel box overlaps (the grid spans the whole image)."""
    gh, gw = grid_hw
    w, h = image_wh
    x0, y0, x1, y1 = box_px
    c0 = int(np.floor(x0 * gw / w))
    c1 = int(np.ceil(x1 * gw / w))
    r0 = int(np.floor(y0 * gh / h))
    r1 = int(np.ceil(y1 * gh / h))
    mask = np.zeros((gh, gw), bool)
    mask[max(0, r0) : max(r0 + 1, min(gh, r1)), max(0, c0) : max(c0 + 1, min(gw, c1))] = True
    return mask


def box_in_view(box_px: tuple[float, float, float, float], image_wh: tuple[int, int], pad_to_square: bool
                ) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """A source-pixel box and image size in the frame the grid spans: with ``pad_to_square`` the content sits in
    the middle of a gray square, so the box moves with it."""
    x0, y0, x1, y1 = (float(v) for v in box_px)
    if not pad_to_square:
        return (x0, y0, x1, y1), image_wh
    side = max(image_wh)
    dx, dy = (side - image_wh[0]) / 2, (side - image_wh[1]) / 2
    return (x0 + dx, y0 + dy, x1 + dx, y1 + dy), (side, side)


PixelBox = tuple[int, int, int, int]  # x0, y0, x1, y1 in source pixels, exclusive ends
_MAX_TILES_PER_SIDE = 32


def label_tiles(image_wh: tuple[int, int], max_tile_pixels: int, overlap: float = 0.15) -> list[PixelBox]:
    """The fewest evenly spaced, overlapping tiles of at most ``max_tile_pixels`` that cover the image.

    Each tile is the image divided ``nx`` by ``ny`` ways, grown by ``overlap`` of its side so evidence cut by one
    seam lies whole in a neighbour. Among layouts whose tiles are no more elongated than 2:1 (or the image), the
    fewest tiles, then the squarest.
    """
    w, h = image_wh
    if w < 1 or h < 1:
        raise ValueError(f"image sides must be >= 1 pixel, got {image_wh}")
    if max_tile_pixels < 1 or not 0.0 <= overlap < 1.0:
        raise ValueError(f"need max_tile_pixels >= 1 and 0 <= overlap < 1, got {max_tile_pixels}, {overlap}")

    def side(total: int, n: int) -> int:
        return total if n == 1 else min(total, math.ceil(total / n * (1.0 + overlap)))

    # Key: fewest tiles, then the squarest tile; at most _MAX_TILES_PER_SIDE a side keeps the search tiny.
    layouts = [(nx * ny, abs(math.log(side(w, nx) / side(h, ny))), nx, ny)
               for nx in range(1, min(w, _MAX_TILES_PER_SIDE) + 1) for ny in range(1, min(h, _MAX_TILES_PER_SIDE) + 1)
               if side(w, nx) * side(h, ny) <= max_tile_pixels]
    if not layouts:
        raise ValueError(f"no tiling of a {w}x{h} image into at most {_MAX_TILES_PER_SIDE}^2 tiles fits "
                         f"{max_tile_pixels} pixels per tile")
    # Thin strips would cut every text line short: keep tiles no more elongated than the image or 2:1.
    max_skew = max(math.log(2.0), abs(math.log(w / h)))
    best = min([k for k in layouts if k[1] <= max_skew + 1e-9] or layouts)
    _, _, nx, ny = best
    tw, th = side(w, nx), side(h, ny)
    xs = [0] if nx == 1 else [round(i * (w - tw) / (nx - 1)) for i in range(nx)]
    ys = [0] if ny == 1 else [round(j * (h - th) / (ny - 1)) for j in range(ny)]
    return [(x, y, x + tw, y + th) for y in ys for x in xs]


def _overlap_fractions(lo: float, hi: float, n_src: int, total: float, n_dst: int) -> np.ndarray:
    """(n_dst, n_src): share of each source cell (an even split of [lo, hi)) inside each cell of [0, total)."""
    src = lo + (hi - lo) * np.arange(n_src + 1) / n_src
    dst = total * np.arange(n_dst + 1) / n_dst
    inter = np.clip(np.minimum(dst[1:, None], src[None, 1:]) - np.maximum(dst[:-1, None], src[None, :-1]), 0.0, None)
    return inter / ((hi - lo) / n_src)


def spread_tile_map(tile_map: np.ndarray, tile_box: PixelBox, image_wh: tuple[int, int],
                    grid_hw: tuple[int, int]) -> np.ndarray:
    """A map read on a tile, moved onto the whole image's (h, w) grid; each tile cell's value is split over the
    image cells it overlaps by area, so the total is kept and cells outside the tile get nothing."""
    m = np.asarray(tile_map, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D tile map, got shape {m.shape}")
    x0, y0, x1, y1 = tile_box
    w, h = image_wh
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"tile {tile_box} is not inside the {w}x{h} image")
    fy = _overlap_fractions(y0, y1, m.shape[0], h, grid_hw[0])
    fx = _overlap_fractions(x0, x1, m.shape[1], w, grid_hw[1])
    return fy @ m @ fx.T
