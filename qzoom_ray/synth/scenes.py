"""Cluttered scenes: 2-5 large coloured shapes, one of which carries a small white tag with a code.

Every shape in a scene has a different type and a different colour, so "the red triangle" and
"the triangle" are unambiguous. Only one shape is tagged, as a label or a sticker is on one object
of a real scene: finding it is easy at any budget (a white patch on a saturated shape), reading it
is not. The clutter (pale blobs, grey lines, grey distractor codes) never
uses a palette colour, so colour and count questions stay answerable at a tiny budget, while the
code on a tag has the fine glyph size of the split.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from qzoom_ray.synth.common import SynthRecord, draw_text, pad_box, random_code, union_box
from qzoom_ray.synth.sizing import fine_glyph_px, font_for_glyph
from qzoom_ray.synth.vocab import COLOURS, SHAPES, TEMPLATES

MAX_SHAPES = 5


def shape_outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of ``shape`` with circumradius ``r`` around (cx, cy); circles get a 64-gon."""

    def ring(n: int, radius: float, start: float) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(start + 2 * math.pi * k / n), cy + radius * math.sin(start + 2 * math.pi * k / n)) for k in range(n)]

    if shape == "circle":
        return ring(64, r, 0.0)
    if shape == "square":
        return ring(4, r, math.pi / 4)
    if shape == "triangle":
        return ring(3, r, -math.pi / 2)
    if shape == "diamond":
        return ring(4, r, -math.pi / 2)
    if shape == "hexagon":
        return ring(6, r, 0.0)
    if shape == "star":
        outer, inner = ring(5, r, -math.pi / 2), ring(5, 0.55 * r, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    raise ValueError(f"unknown shape {shape}")


#: Radius of the largest circle around the centre that fits inside each shape, per unit circumradius;
#: the tag must fit in it so the code is printed *on* the shape.
INRADIUS = {"circle": 1.0, "square": 0.707, "triangle": 0.5, "diamond": 0.707, "hexagon": 0.866, "star": 0.445}


def _clutter(
    rng: np.random.Generator, draw: ImageDraw.ImageDraw, w: int, h: int, glyph: int, avoid: set[str],
    log: list[tuple[str, tuple[int, int, int, int]]],
) -> None:
    n = int(w * h / (14 * glyph) ** 2) + 8
    for _ in range(n):
        x, y = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        s = float(rng.uniform(0.5, 4.0)) * glyph
        grey = int(rng.integers(150, 236))
        tint = rng.integers(-12, 13, 3)
        fill = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle((x, y, x + s, y + s * float(rng.uniform(0.3, 1.5))), fill=fill)
        elif kind == 1:
            draw.ellipse((x, y, x + s, y + s), fill=fill)
        else:
            x1, y1 = x + float(rng.uniform(-4, 4)) * glyph, y + float(rng.uniform(-4, 4)) * glyph
            draw.line((x, y, x1, y1), fill=(grey - 60,) * 3, width=max(1, glyph // 8))
    font = font_for_glyph(glyph)
    for _ in range(max(2, n // 10)):  # grey distractor codes: reading must happen on the right shape
        code = random_code(rng)
        if code not in avoid:
            draw_text(draw, (float(rng.uniform(0, w)), float(rng.uniform(glyph, h))), code, font, (110, 110, 110), log)


def _place(rng: np.random.Generator, w: int, h: int, n: int, r: float) -> list[tuple[float, float]]:
    """Up to ``n`` non-overlapping centres for shapes of circumradius ``r`` (rejection sampling)."""
    centres: list[tuple[float, float]] = []
    for _ in range(400):
        if len(centres) == n or w < 2.2 * r or h < 2.2 * r:
            break
        c = (float(rng.uniform(1.1 * r, w - 1.1 * r)), float(rng.uniform(1.1 * r, h - 1.1 * r)))
        if all(math.dist(c, o) > 2.2 * r for o in centres):
            centres.append(c)
    return centres


def render_scene(
    rng: np.random.Generator, split: str, width: int, height: int, template: str, max_shapes: int = MAX_SHAPES
) -> SynthRecord:
    """One scene of 2 to ``max_shapes`` shapes. The benchmark always uses :data:`MAX_SHAPES`; fewer
    shapes make the training curriculum's first binding phase (a shape's name to its colour is learned
    on two candidates long before it is on five; docs/benchmark.md)."""
    if not 2 <= max_shapes <= min(len(SHAPES), len(COLOURS)):
        raise ValueError(f"max_shapes must be between 2 and {min(len(SHAPES), len(COLOURS))}, got {max_shapes}")
    glyph = fine_glyph_px(rng, split, width, height)
    font = font_for_glyph(glyph)
    n_wanted = int(rng.integers(2, max_shapes + 1))
    pad = 0.35 * glyph
    tag_w, tag_h = font.getlength("X" * 2) + 2 * pad, 1.6 * glyph
    # Circumradius: a share of the short side, but large enough for the tag to fit inside a star.
    r_min = math.hypot(tag_w / 2, tag_h / 2) / INRADIUS["star"] * 1.1
    # At least about two visual tokens across at the lowest budget (Max-64), so the shape is recognisable.
    r = max(float(rng.uniform(0.12, 0.16)) * min(width, height), r_min)
    centres = _place(rng, width, height, n_wanted, r)
    if not centres:
        raise ValueError(f"scene {width}x{height} too small for shapes of radius {r:.0f}")
    shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), len(centres), replace=False)]
    colours = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), len(centres), replace=False)]
    tagged = int(rng.integers(len(centres)))
    codes: list[str | None] = [None] * len(centres)
    codes[tagged] = random_code(rng)

    bg = tuple(int(v) for v in rng.integers(225, 250, 3))
    img = Image.new("RGB", (width, height), bg)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(img)
    clutter_texts: list[tuple[str, tuple[int, int, int, int]]] = []
    _clutter(rng, draw, width, height, glyph, {c for c in codes if c}, clutter_texts)
    texts: list[tuple[str, tuple[int, int, int, int]]] = []
    objects = []
    for (cx, cy), shape, colour, code in zip(centres, shapes, colours, codes, strict=True):
        rgb = COLOURS[colour]
        pts = shape_outline(shape, cx, cy, r)
        draw.polygon(pts, fill=rgb, outline=tuple(int(c * 0.6) for c in rgb), width=max(2, glyph // 6))
        tag = code_box = None
        if code is not None:
            tag = (int(cx - tag_w / 2), int(cy - tag_h / 2), int(cx + tag_w / 2), int(cy + tag_h / 2))
            draw.rectangle(tag, fill=(255, 255, 255), outline=(0, 0, 0), width=max(1, glyph // 10))
            code_box = draw_text(draw, (cx, cy), code, font, (0, 0, 0), texts, anchor="mm")
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        box = (int(min(xs)), int(min(ys)), int(math.ceil(max(xs))), int(math.ceil(max(ys))))
        objects.append({"kind": shape, "colour": colour, "code": code, "box": box, "tag_box": tag,
                        "code_box": code_box, "centre": (cx, cy), "radius": r})

    common = {"category": "scene", "split": split, "layout": "scene", "glyph_px": glyph, "clutter_texts": clutter_texts}
    pick = objects[int(rng.integers(len(objects)))]
    if template == "scene_side":
        sided = [o for o in objects if abs(o["centre"][0] - width / 2) > 0.1 * width]
        if sided:
            pick = sided[int(rng.integers(len(sided)))]
        else:
            template = "scene_colour"  # nothing clearly on one side: ask another coarse question
    if template == "scene_code":
        pick = objects[tagged]
        q = TEMPLATES[template].format(colour=pick["colour"], shape=pick["kind"])
        evidence = pad_box(pick["tag_box"], 0.3 * glyph, width, height)
        return SynthRecord(img, q, pick["code"], [pick["code"]], "fine", template=template, evidence_box=evidence,
                           metric="exact_match", answer_box=pick["code_box"], texts=texts, objects=objects, **common)
    if template == "scene_count":
        n = str(len(objects))
        evidence = union_box(*(o["box"] for o in objects))
        return SynthRecord(img, TEMPLATES[template], n, [n], "coarse", template=template, evidence_box=evidence,
                           metric="exact_match", texts=texts, objects=objects, **common)
    if template == "scene_colour":
        q = TEMPLATES[template].format(shape=pick["kind"])
        return SynthRecord(img, q, pick["colour"], [pick["colour"]], "coarse", template=template,
                           evidence_box=pick["box"], metric="exact_match", texts=texts, objects=objects, **common)
    if template == "scene_side":
        side = "left" if pick["centre"][0] < width / 2 else "right"
        q = TEMPLATES[template].format(colour=pick["colour"], shape=pick["kind"])
        return SynthRecord(img, q, side, [side], "coarse", template=template, evidence_box=pick["box"],
                           metric="exact_match", texts=texts, objects=objects, **common)
    raise ValueError(f"not a scene template: {template}")
