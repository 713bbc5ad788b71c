"""Pure geometry of the Q-Zoom RoI path: RoI map -> box -> crop, sequence splicing and M-RoPE positions.

Everything here is numpy + stdlib so it can be unit-tested and reused by the CPU-side preprocessing
without importing torch/transformers. Method reference: spec sections 3.3-3.6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

GridBox = tuple[int, int, int, int]  # (x0, y0, x1, y1) on the merged token grid, x1/y1 exclusive
PixelBox = tuple[int, int, int, int]  # (x0, y0, x1, y1) in source pixels, x1/y1 exclusive

# Qwen2.5-VL only suppresses the top-left attention-sink cells on grids larger than this (spec 3.3.1).
_SINK_MIN_CELLS = 256
# Pixel coordinates within this distance of an integer are treated as that integer before truncation,
# so float noise such as 6 * 1000 / 24 = 250.00000000000003 does not shift a crop edge by a pixel.
_INT_SNAP_EPS = 1e-6


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
    max_aspect_ratio: float = 200.0,
) -> tuple[int, int]:
    """Qwen's resize rule: sides become multiples of `factor`, pixel count is clamped to the budget.

    Kept bit-identical to transformers' `smart_resize` (including Python's banker's rounding in
    `round`) because the resized size decides the visual token count, which must match the model.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image sides must be >= 1 pixel, got height={height}, width={width}")
    ratio = max(height, width) / min(height, width)
    if ratio > max_aspect_ratio:
        raise ValueError(f"absolute aspect ratio must be smaller than {max_aspect_ratio:g}, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def visual_token_count(
    height: int,
    width: int,
    factor: int,
    min_pixels: int,
    max_pixels: int,
    max_aspect_ratio: float = 200.0,
) -> int:
    """Number of merged visual tokens the LLM sees for an image of this size."""
    h_bar, w_bar = smart_resize(height, width, factor, min_pixels, max_pixels, max_aspect_ratio)
    return (h_bar // factor) * (w_bar // factor)


def qwen25_sink_mask(grid_h: int, grid_w: int) -> np.ndarray:
    """Keep-mask hiding Qwen2.5-VL's attention-sink artefacts along the top-left edges (spec 3.3.1)."""
    mask = np.ones((grid_h, grid_w), dtype=bool)
    if grid_h * grid_w > _SINK_MIN_CELLS:
        mask[: max(1, grid_h // 4), 0] = False
        mask[0, : max(1, grid_w // 4)] = False
    return mask


def _gaussian_taps(sigma: float) -> np.ndarray:
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    taps = np.exp(-(np.arange(-1.0, 2.0) ** 2) / (2.0 * sigma * sigma))
    return taps / taps.sum()


def gaussian_blur3x3(arr: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Separable 3x3 Gaussian with reflect padding, matching torchvision's `gaussian_blur` default."""
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {a.shape}")
    if a.size == 0:
        return a.copy()
    k = _gaussian_taps(sigma)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (1, 1)
        # numpy's "reflect" needs >= 2 samples to mirror; a size-1 axis is constant along itself, so
        # repeating the value ("edge") gives the same result a reflect would have if it were defined.
        mode = "reflect" if a.shape[axis] > 1 else "edge"
        p = np.pad(a, pad, mode=mode)
        n = a.shape[axis]
        a = (
            k[0] * np.take(p, range(0, n), axis=axis)
            + k[1] * np.take(p, range(1, n + 1), axis=axis)
            + k[2] * np.take(p, range(2, n + 2), axis=axis)
        )
    return a


def _stable_sigmoid(x: np.ndarray) -> np.ndarray:
    # exp() only ever sees non-positive arguments, so huge logits of either sign cannot overflow.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def roi_prob_map(logit_map: np.ndarray, sink_mask: np.ndarray | None) -> np.ndarray:
    """P' = blur(sigmoid(logits) * mask): the smoothed RoI probability map (spec 3.3.2)."""
    logits = np.asarray(logit_map, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"expected a 2-D logit map, got shape {logits.shape}")
    prob = _stable_sigmoid(logits)
    if sink_mask is not None:
        mask = np.asarray(sink_mask)
        if mask.shape != prob.shape:
            raise ValueError(f"sink mask shape {mask.shape} does not match map shape {prob.shape}")
        prob = prob * mask
    return gaussian_blur3x3(prob, sigma=1.0)


def roi_box_from_map(prob_map: np.ndarray, thresh: float, relative: bool = False) -> GridBox | None:
    """Single bounding box of every cell strictly above `thresh` (no connected components, spec 3.3.5).

    ``relative`` (beyond the paper) compares cells with ``thresh`` times the map's peak instead: the box
    then never vanishes for a map with any mass, and its size follows the map's shape, not how confident
    the twig is overall. A twig trained with a heavy foreground weight puts a broad plateau above any
    absolute threshold, and a broad box is read at the same token budget as a tight one.
    """
    prob = np.asarray(prob_map)
    if relative:
        peak = float(prob.max()) if prob.size else 0.0
        if peak <= 0.0:
            return None
        ys, xs = np.nonzero(prob >= thresh * peak)
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    ys, xs = np.nonzero(prob > thresh)
    if xs.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def grid_box_to_pixels(
    box: GridBox, grid_hw: tuple[int, int], image_wh: tuple[int, int]
) -> tuple[float, float, float, float]:
    """Scale a merged-grid box to source pixels; no margin is added, as in the reference."""
    grid_h, grid_w = grid_hw
    width, height = image_wh
    sx = width / grid_w
    sy = height / grid_h
    x0, y0, x1, y1 = box
    return x0 * sx, y0 * sy, x1 * sx, y1 * sy


NormBox = tuple[float, float, float, float]  # (x0, y0, x1, y1) as fractions of the image's width / height


def grow_box_by_margin(box_norm: NormBox, margin: float) -> NormBox:
    """Each side moved out by ``margin`` of the image's width (x) or height (y), clamped to the image.

    Beyond the paper (whose box has no margin, spec 3.3.6): stage 2 fine-tunes on pseudo-RoI boxes with a margin
    of context around the evidence, so the zoom pass reads crops like those it was tuned on.
    """
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    x0, y0, x1, y1 = box_norm
    return max(0.0, x0 - margin), max(0.0, y0 - margin), min(1.0, x1 + margin), min(1.0, y1 + margin)


def norm_box_to_grid(box_norm: NormBox, grid_hw: tuple[int, int]) -> GridBox:
    """The smallest non-empty run of merged-grid cells covering a normalised box (its RoI position ids)."""
    x0, y0, x1, y1 = (float(v) for v in box_norm)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"box must be normalised (0 <= x0 < x1 <= 1, same for y), got {tuple(box_norm)}")
    gh, gw = grid_hw
    gx0, gy0 = min(math.floor(x0 * gw), gw - 1), min(math.floor(y0 * gh), gh - 1)
    return gx0, gy0, max(math.ceil(x1 * gw), gx0 + 1), max(math.ceil(y1 * gh), gy0 + 1)


def _grow_side(lo: float, hi: float, size: int, min_side: int) -> tuple[int, int]:
    # Invalid (out-of-image) inputs are clamped first so the result is always a non-empty in-image span;
    # for valid inputs this is a no-op and the order below is the reference's grow -> slide -> clamp.
    lo = min(max(lo, 0.0), float(size))
    hi = min(max(hi, lo), float(size))
    if hi - lo < min_side:
        extra = (min_side - (hi - lo)) / 2.0
        lo -= extra
        hi += extra
        if lo < 0.0:
            hi -= lo
            lo = 0.0
        if hi > size:
            lo -= hi - size
            hi = float(size)
        lo = max(lo, 0.0)
        hi = min(hi, float(size))

    def to_int(v: float) -> int:
        r = round(v)
        return int(r) if abs(v - r) < _INT_SNAP_EPS else math.floor(v)

    # The reference truncates both edges (`.long()`); we do the same so crop sizes (and hence RoI token
    # counts) agree, then repair the rare case where truncation left the span short or empty.
    ilo, ihi = to_int(lo), to_int(hi)
    need = max(1, min(min_side, size))
    if ihi - ilo < need:
        ihi = min(size, ilo + need)
        ilo = ihi - need
    return ilo, ihi


def grow_box_to_min_size(
    box: tuple[float, float, float, float], image_wh: tuple[int, int], min_side: int = 28
) -> PixelBox:
    """Grow a too-small pixel box about its centre to `min_side`, keep it inside the image (spec 3.3.7).

    Integer conversion truncates both edges like the reference (after snapping values within 1e-6 of
    an integer), then the span is widened if truncation made it shorter than min(min_side, image side).
    Guarantees 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H.
    """
    width, height = image_wh
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {image_wh}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box has non-finite coordinates: {box}")
    ix0, ix1 = _grow_side(x0, x1, width, min_side)
    iy0, iy1 = _grow_side(y0, y1, height, min_side)
    return ix0, iy0, ix1, iy1


def normalise_box(box: PixelBox, image_wh: tuple[int, int]) -> tuple[float, float, float, float]:
    """Pixel box as fractions of the image size (for reporting, resolution independent)."""
    width, height = image_wh
    x0, y0, x1, y1 = box
    return x0 / width, y0 / height, x1 / width, y1 / height


def crop_is_encodable(
    box: PixelBox, factor: int, min_pixels: int, max_pixels: int, max_aspect_ratio: float = 200.0
) -> bool:
    """Whether the image processor would accept this crop; if not the sample answers directly (spec 3.2.6)."""
    x0, y0, x1, y1 = box
    try:
        smart_resize(y1 - y0, x1 - x0, factor, min_pixels, max_pixels, max_aspect_ratio)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class SpliceLayout:
    """Where the RoI block goes in the spliced sequence (spec 3.5)."""

    prefix_len: int  # coarse tokens up to and including the global <vision_end>
    roi_tokens: int  # Hr * Wr
    suffix_len: int  # coarse tokens after the global <vision_end>

    @property
    def total_len(self) -> int:
        return self.prefix_len + self.roi_tokens + 2 + self.suffix_len

    @property
    def roi_start(self) -> int:
        return self.prefix_len + 1


def splice_layout(coarse_len: int, image_start: int, num_image_tokens: int, roi_tokens: int) -> SpliceLayout:
    """Layout for inserting an RoI block right after the global image's <vision_end>."""
    prefix_len = image_start + num_image_tokens + 1
    if image_start < 0 or num_image_tokens < 1 or prefix_len > coarse_len:
        raise ValueError(
            f"image span [{image_start}, {image_start + num_image_tokens}) plus <vision_end> does not fit "
            f"a coarse sequence of length {coarse_len}"
        )
    if roi_tokens < 1:
        raise ValueError(f"roi_tokens must be >= 1, got {roi_tokens}")
    return SpliceLayout(prefix_len=prefix_len, roi_tokens=roi_tokens, suffix_len=coarse_len - prefix_len)


def splice_token_ids(
    coarse_ids: np.ndarray, layout: SpliceLayout, vision_start_id: int, vision_end_id: int, image_pad_id: int
) -> np.ndarray:
    """coarse[:prefix] + <vs> + pad * roi + <ve> + coarse[prefix:], as int64."""
    ids = np.asarray(coarse_ids, dtype=np.int64).reshape(-1)
    if ids.size != layout.prefix_len + layout.suffix_len:
        raise ValueError(
            f"coarse ids have length {ids.size}, layout expects {layout.prefix_len + layout.suffix_len}"
        )
    roi = np.full(layout.roi_tokens + 2, image_pad_id, dtype=np.int64)
    roi[0] = vision_start_id
    roi[-1] = vision_end_id
    return np.concatenate([ids[: layout.prefix_len], roi, ids[layout.prefix_len :]])


def roi_position_ids(
    coarse_positions: np.ndarray,
    layout: SpliceLayout,
    image_start: int,
    grid_hw: tuple[int, int],
    roi_grid_hw: tuple[int, int],
    box: GridBox,
    aligned: bool,
) -> np.ndarray:
    """M-RoPE (t, h, w) positions of the spliced sequence, float64 of shape (3, total_len) (spec 3.6).

    aligned=True is the reference's `reuse_src_pos` mode: RoI tokens reuse the global image's h/w
    coordinates of the box, corner-aligned and fractional; aligned=False is what `get_rope_index` gives
    for the RoI as a fresh second image. Both share <vs>/<ve>/text/t ids.
    """
    pos = np.asarray(coarse_positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[0] != 3 or pos.shape[1] != layout.prefix_len + layout.suffix_len:
        raise ValueError(
            f"coarse positions must have shape (3, {layout.prefix_len + layout.suffix_len}), got {pos.shape}"
        )
    roi_h, roi_w = roi_grid_hw
    if roi_h * roi_w != layout.roi_tokens:
        raise ValueError(f"RoI grid {roi_grid_hw} does not have {layout.roi_tokens} tokens")
    grid_h, grid_w = grid_hw
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= grid_w and 0 <= y0 < y1 <= grid_h):
        raise ValueError(f"grid box {box} is not inside the {grid_h}x{grid_w} grid")

    s = pos[0, image_start]
    p = pos[0, layout.prefix_len - 1]  # global <vision_end>
    shift = max(roi_h, roi_w) + 2

    roi = np.empty((3, layout.roi_tokens + 2), dtype=np.float64)
    roi[:, 0] = p + 1
    roi[:, -1] = p + shift
    body = roi[:, 1:-1]
    body[0] = p + 2
    if aligned:
        rows = np.linspace(s + y0, s + y1 - 1, roi_h)
        cols = np.linspace(s + x0, s + x1 - 1, roi_w)
    else:
        rows = p + 2 + np.arange(roi_h, dtype=np.float64)
        cols = p + 2 + np.arange(roi_w, dtype=np.float64)
    body[1] = np.repeat(rows, roi_w)
    body[2] = np.tile(cols, roi_h)
    return np.concatenate([pos[:, : layout.prefix_len], roi, pos[:, layout.prefix_len :] + shift], axis=1)


def decode_start_position(positions: np.ndarray) -> float:
    """Position (all axes) of the first generated token: one past the largest position used."""
    return float(np.max(positions)) + 1.0
