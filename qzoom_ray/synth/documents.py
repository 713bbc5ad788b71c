"""Document pages: a coloured header bar, stamps in a side strip and a dense ledger of key/value rows.

Three layouts (form, invoice, table) differ only in their rules and grid lines; all share the
ledger: blocks of ``LABEL value`` rows where most labels are random codes and a few are field
names from :data:`~qzoom_ray.synth.vocab.FIELDS` (each at most once per page). The fine question
asks for the value of one field, so it must be read at the glyph size of the split; the coarse
questions (header colour, number of stamps) only need large colour blobs.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from qzoom_ray.synth.common import (
    SynthRecord,
    draw_text,
    pad_box,
    random_code,
    union_box,
)
from qzoom_ray.synth.sizing import fine_glyph_px, font_for_glyph
from qzoom_ray.synth.vocab import COLOURS, FIELDS, TEMPLATES, VALUE_MAX, VALUE_MIN

LAYOUTS = ("form", "invoice", "table")
INK = (20, 20, 20)
RULE = (175, 175, 175)
KEY_SCALE = 1.6  # cap height of field names relative to the fine text


def _value(rng: np.random.Generator) -> str:
    return str(int(rng.integers(VALUE_MIN, VALUE_MAX + 1)))


def _darker(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(c * 0.6) for c in rgb)  # type: ignore[return-value]


def _stamps(
    rng: np.random.Generator, draw: ImageDraw.ImageDraw, x0: int, top: int, bottom: int, d: int
) -> list[dict]:
    """1-4 filled discs stacked in the side strip; their count and colours are the coarse facts."""
    slots = max(1, (bottom - top) // int(d * 1.25))
    n = int(rng.integers(1, min(4, slots) + 1))
    objects = []
    for slot in sorted(rng.choice(slots, n, replace=False).tolist()):
        y = top + slot * int(d * 1.25) + int(d * 0.1)
        colour = str(rng.choice(list(COLOURS)))
        box = (x0, y, x0 + d, y + d)
        draw.ellipse(box, fill=COLOURS[colour], outline=_darker(COLOURS[colour]), width=max(2, d // 20))
        objects.append({"kind": "stamp", "colour": colour, "box": box})
    return objects


def render_document(
    rng: np.random.Generator, split: str, width: int, height: int, template: str
) -> SynthRecord:
    glyph = fine_glyph_px(rng, split, width, height)
    font = font_for_glyph(glyph)
    layout = LAYOUTS[int(rng.integers(len(LAYOUTS)))]
    paper = tuple(int(v) for v in rng.integers(240, 256, 3))
    img = Image.new("RGB", (width, height), paper)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(img)
    texts: list[tuple[str, tuple[int, int, int, int]]] = []

    # Header bar: a large block of one palette colour (coarse question), title in white.
    header_colour = str(rng.choice(list(COLOURS)))
    header_h = int(max(0.08 * height, 2.6 * glyph))
    header_box = (0, 0, width, header_h)
    draw.rectangle(header_box, fill=COLOURS[header_colour])
    draw_text(draw, (glyph, header_h * 0.7), layout.upper(), font_for_glyph(int(header_h * 0.4)), (255, 255, 255))

    # Stamp strip on the right.
    margin = int(glyph * 1.2)
    d = int(max(0.13 * min(width, height), 3 * glyph))
    strip_x = width - margin - d
    stamps = _stamps(rng, draw, strip_x, header_h + margin, height - margin, d)

    # Ledger grid: blocks of (label, value) rows filling the body.
    # Field names are printed larger than the rest (as bold keys are on real forms), so a page seen
    # at a middling budget shows *where* 'Total' is before its value becomes legible.
    key_font = font_for_glyph(int(round(KEY_SCALE * glyph)))
    line = int(round(1.9 * KEY_SCALE * glyph))
    label_w = int(max(key_font.getlength(t) for t in FIELDS)) + glyph
    value_w = int(font.getlength("999")) + glyph
    block_w = label_w + value_w + glyph
    body_x0, body_x1 = margin, strip_x - margin
    body_y0, body_y1 = header_h + margin, height - margin
    n_blocks = max(1, (body_x1 - body_x0) // block_w)
    n_rows = max(1, (body_y1 - body_y0) // line)
    slots = [(b, r) for b in range(n_blocks) for r in range(n_rows)]
    # One or two keyed rows per page among rows keyed by random codes: the key is easy to spot, its value is small.
    n_fields = int(rng.integers(1, min(2, len(slots)) + 1))
    field_names = [FIELDS[i] for i in rng.choice(len(FIELDS), n_fields, replace=False)]
    field_slots = {slots[i]: name for i, name in zip(rng.choice(len(slots), n_fields, replace=False), field_names, strict=True)}

    fields: dict[str, dict] = {}
    for b, r in slots:
        name = field_slots.get((b, r))
        if name is None and rng.random() > 0.85:
            continue  # a few blank rows, as on real forms
        x = body_x0 + b * block_w
        y_base = body_y0 + r * line + int(glyph * 1.35 * KEY_SCALE)
        label = name if name is not None else random_code(rng, int(rng.integers(2, 5)))
        value = _value(rng)
        lbox = draw_text(draw, (x, y_base), label, key_font if name is not None else font, INK, texts)
        vbox = draw_text(draw, (x + label_w, y_base), value, font, INK, texts)
        cell = (x - glyph // 3, body_y0 + r * line, x + block_w - glyph // 2, body_y0 + (r + 1) * line)
        if layout == "table":
            draw.rectangle(cell, outline=RULE, width=max(1, glyph // 12))
        elif layout == "invoice":
            draw.line((cell[0], cell[3] - 1, cell[2], cell[3] - 1), fill=RULE, width=max(1, glyph // 14))
        else:  # form: underline the value field
            draw.line((vbox[0], vbox[3] + glyph // 4, cell[2], vbox[3] + glyph // 4), fill=RULE, width=max(1, glyph // 12))
        if name is not None:
            fields[name] = {"value": value, "label_box": lbox, "value_box": vbox}

    common = {"category": "document", "split": split, "template": template, "layout": layout, "glyph_px": glyph}
    objects = stamps + [{"kind": "header", "colour": header_colour, "box": header_box}]
    if template == "doc_value":
        name = field_names[int(rng.integers(len(field_names)))]
        f = fields[name]
        evidence = pad_box(union_box(f["label_box"], f["value_box"]), 0.4 * glyph, width, height)
        return SynthRecord(
            img, TEMPLATES[template].format(field=name), f["value"], [f["value"]], "fine",
            evidence_box=evidence, metric="anls", answer_box=f["value_box"], texts=texts, objects=objects, **common,
        )
    if template == "doc_header_colour":
        # A direct answer, not multiple choice: binding a colour to an option letter is a second skill
        # that a tiny model trained from scratch picks up far later than the colour itself.
        return SynthRecord(
            img, TEMPLATES[template], header_colour, [header_colour], "coarse", evidence_box=header_box,
            metric="exact_match", texts=texts, objects=objects, **common,
        )
    if template == "doc_stamp_count":
        evidence = union_box(*(s["box"] for s in stamps))
        n = str(len(stamps))
        return SynthRecord(
            img, TEMPLATES[template], n, [n], "coarse", evidence_box=evidence,
            metric="exact_match", texts=texts, objects=objects, **common,
        )
    raise ValueError(f"not a document template: {template}")
