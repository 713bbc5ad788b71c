"""Image sizes and text sizes per split, derived from the visual-token budget.

The rule (see docs/benchmark.md): Qwen2.5-VL resizes an image of W x H pixels to at most
``budget * 28**2`` pixels, i.e. by ``s = min(1, sqrt(budget * 784 / (W * H)))``. A glyph whose
cap height is ``g`` source pixels is ``g * s`` pixels tall after the resize; we call it legible
when that is at least :data:`LEGIBLE_PX` (one visual token, 28 px). Fine text is then sized as
``factor * LEGIBLE_PX / s_top`` with ``s_top`` the scale at :data:`TOP_BUDGET`:

* ordinary (long side 1000-1800 px): factor 1.05..1.4 -> legible at Max-1024, only about
  0.26..0.35 of a token at Max-64;
* ultra_hr (long side 4000-5000 px, area >= 11 MP): the cap height is set in *source* pixels,
  1.4..1.8 x LEGIBLE_PX (39..50 px), so a crop around the evidence is legible at any budget of
  Max-576 or more (a crop side up to ``g * sqrt(budget)`` px works), while the whole image needs
  more than ``4096 * (g / 28)**2`` tokens, i.e. > 4096 because the area is > 10.2 MP: even the
  paper's top budget cannot read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import ImageFont

TOKEN_PX = 28
LEGIBLE_PX = 28
TOP_BUDGET = 1024


@dataclass(frozen=True)
class SplitSpec:
    long_side: tuple[int, int]  # inclusive range of the longer image side, px
    min_area: int  # floor on W*H (ultra-hr: keeps the whole image illegible at Max-4096)
    max_area: int  # cap on W*H (keeps ultra-hr rendering and PNG encoding affordable)
    glyph_factor: tuple[float, float]  # fine-text cap height in LEGIBLE_PX units, ...
    glyph_relative: bool  # ... after a TOP_BUDGET resize (True) or in source pixels (False)


SPLITS: dict[str, SplitSpec] = {
    "ordinary": SplitSpec((1000, 1800), 0, 2_400_000, glyph_factor=(1.05, 1.4), glyph_relative=True),
    "ultra_hr": SplitSpec((4000, 5000), 11_000_000, 20_000_000, glyph_factor=(1.4, 1.8), glyph_relative=False),
}


def budget_scale(width: int, height: int, tokens: int) -> float:
    """Downscale factor Qwen2.5-VL applies at a Max-``tokens`` budget (never upscales here)."""
    return min(1.0, math.sqrt(tokens * TOKEN_PX**2 / (width * height)))


def min_legible_tokens(width: int, height: int, glyph_px: float) -> int:
    """Smallest budget at which a ``glyph_px`` cap height reaches LEGIBLE_PX after the resize."""
    return math.ceil((LEGIBLE_PX / glyph_px) ** 2 * width * height / TOKEN_PX**2)


def sample_size(rng: np.random.Generator, split: str, aspect: tuple[float, float]) -> tuple[int, int]:
    """(width, height) with the split's long side and an aspect ratio W/H drawn from ``aspect``."""
    spec = SPLITS[split]
    long_side = int(rng.integers(spec.long_side[0], spec.long_side[1] + 1))
    ratio = float(np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1]))))
    short_side = long_side / max(ratio, 1 / ratio)
    # Only the short side gives way to the area limits, so the long side stays in the split's range.
    short_side = min(max(short_side, spec.min_area / long_side), spec.max_area / long_side, long_side)
    w, h = (long_side, short_side) if ratio >= 1 else (short_side, long_side)
    return int(round(w)), int(round(h))


def fine_glyph_px(rng: np.random.Generator, split: str, width: int, height: int) -> int:
    lo, hi = SPLITS[split].glyph_factor
    factor = float(rng.uniform(lo, hi))
    scale = budget_scale(width, height, TOP_BUDGET) if SPLITS[split].glyph_relative else 1.0
    return max(6, int(round(factor * LEGIBLE_PX / scale)))


@lru_cache(maxsize=1)
def _cap_ratio() -> float:
    # Cap height of digits/capitals per point of font size, measured once on pillow's bundled font.
    font = ImageFont.load_default(size=200)
    x0, y0, x1, y1 = font.getbbox("8HX")
    return (y1 - y0) / 200


@lru_cache(maxsize=256)
def font_for_glyph(glyph_px: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font (no system fonts) sized so capitals/digits are ``glyph_px`` tall."""
    font = ImageFont.load_default(size=max(4, int(round(glyph_px / _cap_ratio()))))
    if not isinstance(font, ImageFont.FreeTypeFont):  # pragma: no cover - pillow without freetype
        raise RuntimeError("the synthetic benchmark needs Pillow >= 10.1 built with FreeType")
    return font
