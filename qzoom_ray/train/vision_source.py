"""Dense perception targets for pretraining the tiny model's vision tower on benchmark renders.

A real MLLM's vision tower arrives pretrained (CLIP/SigLIP on billions of image-text pairs) and can
already tell glyphs, shapes and colours apart before the language model is trained on top. A tower
trained from scratch through the language model alone gets one answer token of signal per question
and, measured on two CPU cores, learns to read a single glyph only after thousands of steps
(docs/benchmark.md). Here each *visual token* gets a label instead: which glyph is centred in it,
which field key covers it, which object and which palette colour it lies on. That is hundreds of
targets per view, and a linear head on the merger's output reaches 95% glyph accuracy within
minutes, after which the language model only has to learn where to look.

Labels live on the grid of merged visual tokens (one per ``28 x 28`` px of the resized view):

* ``glyph``: 0 = no glyph here, 1.. = :data:`GLYPHS` on every token holding a quarter of a glyph or
  more; tokens with less of one, tokens two glyphs claim and glyphs too small to read at this scale are ignored (-100), so illegible text is never a target;
* ``key``: 0 = none, 1.. = :data:`~qzoom_ray.synth.vocab.FIELDS` (a large field name covering the token);
* ``object``: 0 = background, 1.. = :data:`OBJECTS` (shape types, stamp, header bar);
* ``colour``: 0 = none, 1.. = palette colour of the object under the token centre.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from qzoom_ray.synth.common import SynthRecord
from qzoom_ray.synth.scenes import shape_outline
from qzoom_ray.synth.vocab import CODE_ALPHABET, COLOURS, FIELDS, SHAPES, TEMPLATES

TOKEN_PX = 28
IGNORE = -100
#: Every single glyph the benchmark asks about: code symbols and value digits.
GLYPHS = "".join(sorted(set(CODE_ALPHABET) | set("123456789")))
OBJECTS: tuple[str, ...] = (*SHAPES, "stamp", "header")
#: Number of classes per dense head (class 0 is "none" in each).
HEAD_CLASSES: dict[str, int] = {
    "glyph": 1 + len(GLYPHS),
    "key": 1 + len(FIELDS),
    "object": 1 + len(OBJECTS),
    "colour": 1 + len(COLOURS),
}
#: A glyph smaller than this after the resize is not a target (no one reads a 9-px digit in a 28-px token).
MIN_GLYPH_PX = 12.0
#: A token holds a glyph (is a target) when it covers at least this share of the glyph's ink box:
#: 1-4 tokens per glyph, always the one under its centre, never a sliver.
GLYPH_SHARE = 0.25


@dataclass
class DenseView:
    image: Image.Image  # already at its processed size (multiples of 28 px)
    labels: dict[str, np.ndarray]  # head -> (rows, cols) int64 on the merged-token grid


def _token_span(lo: float, hi: float, n: int) -> tuple[int, int]:
    """Token indices [a, b) that the pixel interval [lo, hi) of the resized view touches."""
    a = max(0, int(math.floor(lo / TOKEN_PX)))
    b = min(n, int(math.ceil(hi / TOKEN_PX)))
    return a, b


def dense_labels(rec: SynthRecord, window: tuple[float, float, float, float], scale: float,
                 grid: tuple[int, int]) -> dict[str, np.ndarray]:
    """Labels for the view of ``rec`` cut at ``window`` (source px) and resized by ``scale`` to ``grid`` tokens."""
    rows, cols = grid
    wx0, wy0 = window[0], window[1]

    def to_view(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        return ((box[0] - wx0) * scale, (box[1] - wy0) * scale, (box[2] - wx0) * scale, (box[3] - wy0) * scale)

    glyph = np.zeros(grid, np.int64)
    key = np.zeros(grid, np.int64)
    held: list[tuple[int, int, int]] = []
    for text, box in [*rec.texts, *rec.clutter_texts]:
        x0, y0, x1, y1 = to_view(box)
        if x1 <= 0 or y1 <= 0 or x0 >= cols * TOKEN_PX or y0 >= rows * TOKEN_PX:
            continue
        c0, c1 = _token_span(x0, x1, cols)
        r0, r1 = _token_span(y0, y1, rows)
        if text in FIELDS:
            key[r0:r1, c0:c1] = 1 + FIELDS.index(text)
        glyph[r0:r1, c0:c1] = IGNORE  # any text: not "no glyph", and multi-glyph text is not a target
        if len(text) == 1 and text in GLYPHS and (y1 - y0) >= MIN_GLYPH_PX:
            area = max(1e-6, (x1 - x0) * (y1 - y0))
            for r in range(r0, r1):
                for c in range(c0, c1):
                    ox = min(x1, (c + 1) * TOKEN_PX) - max(x0, c * TOKEN_PX)
                    oy = min(y1, (r + 1) * TOKEN_PX) - max(y0, r * TOKEN_PX)
                    if ox > 0 and oy > 0 and ox * oy >= GLYPH_SHARE * area:
                        held.append((r, c, 1 + GLYPHS.index(text)))
    seen: dict[tuple[int, int], int] = {}
    for r, c, cls in held:  # after every IGNORE; a token two glyphs claim stays ignored
        seen[(r, c)] = cls if seen.get((r, c), cls) == cls else IGNORE
    for (r, c), cls in seen.items():
        glyph[r, c] = cls

    # Objects are rasterised at token resolution: a token belongs to the object under its centre.
    obj = Image.new("L", (cols, rows), 0)
    col = Image.new("L", (cols, rows), 0)
    d_obj, d_col = ImageDraw.Draw(obj), ImageDraw.Draw(col)

    def grid_pts(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [((x - wx0) * scale / TOKEN_PX - 0.5, (y - wy0) * scale / TOKEN_PX - 0.5) for x, y in pts]

    for o in rec.objects:
        kind = o["kind"]
        cls_col = 1 + list(COLOURS).index(o["colour"])
        if kind in SHAPES:
            (cx, cy), r = o["centre"], o["radius"]
            pts = grid_pts(shape_outline(kind, cx, cy, r))
            d_obj.polygon(pts, fill=1 + OBJECTS.index(kind))
            d_col.polygon(pts, fill=cls_col)
        else:
            x0, y0, x1, y1 = o["box"]
            (a, b), (c, d) = grid_pts([(x0, y0), (x1, y1)])
            draw = d_obj.ellipse if kind == "stamp" else d_obj.rectangle
            draw((a, b, c, d), fill=1 + OBJECTS.index(kind))
            (d_col.ellipse if kind == "stamp" else d_col.rectangle)((a, b, c, d), fill=cls_col)
    return {
        "glyph": glyph,
        "key": key,
        "object": np.asarray(obj, dtype=np.int64),
        "colour": np.asarray(col, dtype=np.int64),
    }


def _overlaps(box: tuple[float, float, float, float], boxes: list[tuple[float, float, float, float]], margin: float) -> bool:
    return any(box[0] < b[2] + margin and b[0] < box[2] + margin and box[1] < b[3] + margin and b[1] < box[3] + margin
               for b in boxes)


def render_canvas(rng: np.random.Generator, grid_tokens: tuple[int, int] = (8, 16),
                  glyph_px: tuple[float, float] = (8.0, 44.0), snap: bool = False) -> DenseView:
    """A busy primer page: many loose glyphs (some on white tags), a field name or two and a few
    palette shapes on a pale background, so every step sees hundreds of glyph targets."""
    from qzoom_ray.synth.common import draw_text
    from qzoom_ray.synth.sizing import font_for_glyph

    cols = int(rng.integers(grid_tokens[0], grid_tokens[1] + 1))
    rows = int(rng.integers(grid_tokens[0], grid_tokens[1] + 1))
    w, h = cols * TOKEN_PX, rows * TOKEN_PX
    image = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(215, 256, 3)))  # type: ignore[arg-type]
    draw = ImageDraw.Draw(image)
    objects: list[dict] = []
    for _ in range(int(rng.integers(0, 4))):
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        r = float(rng.uniform(1.0, 4.0)) * TOKEN_PX
        cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        draw.polygon(shape_outline(kind, cx, cy, r), fill=COLOURS[colour])
        objects.append({"kind": kind, "colour": colour, "centre": (cx, cy), "radius": r})
    texts: list[tuple[str, tuple[int, int, int, int]]] = []
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(int(rng.integers(0, 3))):
        name = FIELDS[int(rng.integers(len(FIELDS)))]
        font = font_for_glyph(int(rng.integers(12, 40)))
        xy = (float(rng.uniform(0, w * 0.7)), float(rng.uniform(h * 0.15, h)))
        box = draw.textbbox(xy, name, font=font, anchor="ls")
        if not _overlaps(box, boxes, 4):
            boxes.append(box)
            draw_text(draw, xy, name, font, (20, 20, 20), texts)
    for _ in range(cols * rows // 3):
        ch = GLYPHS[int(rng.integers(len(GLYPHS)))]
        g = float(rng.uniform(*glyph_px))
        font = font_for_glyph(int(round(g)))
        xy = (float(rng.uniform(0, w)), float(rng.uniform(0, h)))
        if snap:
            xy = ((xy[0] // TOKEN_PX + 0.5) * TOKEN_PX, (xy[1] // TOKEN_PX + 0.5) * TOKEN_PX)
        box = draw.textbbox(xy, ch, font=font, anchor="mm")
        pad = 0.35 * g
        outer = (box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad)
        if _overlaps(outer, boxes, 2):
            continue
        boxes.append(outer)
        if rng.random() < 0.4:
            draw.rectangle(outer, fill=(255, 255, 255), outline=(0, 0, 0), width=max(1, int(g // 10)))
        ink = tuple(int(v) for v in rng.integers(0, 120, 3)) if rng.random() < 0.3 else (0, 0, 0)
        draw_text(draw, xy, ch, font, ink, texts, anchor="mm")  # type: ignore[arg-type]
    rec = SynthRecord(image, "", "", [], "fine", "scene", "ordinary", "", "canvas", (0, 0, w, h), "exact_match",
                      texts=texts, objects=objects)
    return DenseView(image, dense_labels(rec, (0.0, 0.0, float(w), float(h)), 1.0, (rows, cols)))


def whole_image_view(rec: SynthRecord, budget: int) -> DenseView:
    """The whole of ``rec`` resized to about ``budget`` tokens (multiples of 28 px), with its labels."""
    w, h = rec.width, rec.height
    s = math.sqrt(budget * TOKEN_PX**2 / (w * h))
    cols, rows = max(2, round(w * s / TOKEN_PX)), max(2, round(h * s / TOKEN_PX))
    scale = (cols * TOKEN_PX / w + rows * TOKEN_PX / h) / 2
    image = rec.image.resize((cols * TOKEN_PX, rows * TOKEN_PX), Image.Resampling.BICUBIC)
    return DenseView(image, dense_labels(rec, (0.0, 0.0, float(w), float(h)), scale, (rows, cols)))


def make_dense_view_fn(
    canvas_prob: float = 0.5,
    glyph_px: tuple[float, float] = (8.0, 44.0),
    grid_tokens: tuple[int, int] = (6, 16),
    whole_prob: float = 0.25,
    whole_budgets: tuple[int, ...] = (64, 128, 256),
    evidence_prob: float = 0.6,
) -> Callable[[np.random.Generator], DenseView]:
    """A sampler of labelled views: ``canvas_prob`` primer canvases (:func:`render_canvas`), else
    views of fresh benchmark renders (ordinary split).

    Most views are windows of ``grid_tokens`` tokens a side at a scale that puts the fine glyphs at
    ``glyph_px`` (below :data:`MIN_GLYPH_PX` they are seen but not targets), centred on the record's
    evidence with ``evidence_prob``; ``whole_prob`` of them are whole images at a low budget (the
    objects and colours the coarse questions ask about).
    """
    from qzoom_ray.synth.generator import render_record

    templates = list(TEMPLATES)

    def sample(rng: np.random.Generator) -> DenseView:
        if rng.random() < canvas_prob:
            return render_canvas(rng, glyph_px=glyph_px)
        rec = render_record(int(rng.integers(2**31)), split="ordinary", template=templates[int(rng.integers(len(templates)))])
        w, h = rec.width, rec.height
        if rng.random() < whole_prob:
            return whole_image_view(rec, int(whole_budgets[int(rng.integers(len(whole_budgets)))]))
        scale = min(1.0, float(rng.uniform(*glyph_px)) / max(rec.glyph_px, 1))
        cols = int(rng.integers(grid_tokens[0], grid_tokens[1] + 1))
        rows = int(rng.integers(grid_tokens[0], grid_tokens[1] + 1))
        cols = min(cols, max(2, int(w * scale // TOKEN_PX)))
        rows = min(rows, max(2, int(h * scale // TOKEN_PX)))
        ww, wh = cols * TOKEN_PX / scale, rows * TOKEN_PX / scale
        if rng.random() < evidence_prob:
            ex0, ey0, ex1, ey1 = rec.evidence_box
            cx = (ex0 + ex1) / 2 + float(rng.uniform(-0.4, 0.4)) * ww
            cy = (ey0 + ey1) / 2 + float(rng.uniform(-0.4, 0.4)) * wh
        else:
            cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        x0 = min(max(0.0, cx - ww / 2), max(0.0, w - ww))
        y0 = min(max(0.0, cy - wh / 2), max(0.0, h - wh))
        window = (x0, y0, x0 + ww, y0 + wh)
        image = rec.image.crop(tuple(int(round(v)) for v in window)).resize(
            (cols * TOKEN_PX, rows * TOKEN_PX), Image.Resampling.BICUBIC
        )
        return DenseView(image, dense_labels(rec, window, scale, (rows, cols)))

    return sample
