"""Training samples for the tiny base model, drawn on the fly from the synthetic benchmark.

A real MLLM reads small text when the pixel budget makes it at least about one visual token tall,
and guesses otherwise. Each sample is a *view* of a freshly rendered page or scene with every
question the view can answer (several chat turns on one image):

* a crop around a piece of fine evidence, resized so the fine text lands at 1.0-1.6 tokens high
  at a small budget: exactly what a large image looks like to the model at a high budget, for a
  fraction of the tokens (this is where reading is learned);
* the whole image at a budget of the evaluation ladder: coarse facts, and fine facts that are
  legible only when the budget is high enough (the model learns to guess otherwise).
"""

from __future__ import annotations

import math

import numpy as np

from qzoom_ray.synth.common import SynthRecord
from qzoom_ray.synth.generator import render_record
from qzoom_ray.synth.vocab import FIELDS, TEMPLATES, vocabulary
from qzoom_ray.train.data import TrainSample
from qzoom_ray.train.grounding import Grounding
from qzoom_ray.train.reading_source import READ_QUESTION

TOKEN_PX = 28
Box = tuple[int, int, int, int]


def crop_around(box: Box, image_wh: tuple[int, int], side_wh: tuple[float, float], rng: np.random.Generator) -> Box:
    """A window of about ``side_wh`` that contains ``box``, placed at a random offset, inside the image."""
    w, h = image_wh
    x0, y0, x1, y1 = box
    cw = int(min(w, max(side_wh[0], x1 - x0)))
    ch = int(min(h, max(side_wh[1], y1 - y0)))
    lo_x, hi_x = max(0, x1 - cw), min(x0, w - cw)
    lo_y, hi_y = max(0, y1 - ch), min(y0, h - ch)
    cx = int(rng.integers(lo_x, max(lo_x, hi_x) + 1))
    cy = int(rng.integers(lo_y, max(lo_y, hi_y) + 1))
    return cx, cy, cx + cw, cy + ch


def _inside(box: Box, window: Box) -> bool:
    return box[0] >= window[0] and box[1] >= window[1] and box[2] <= window[2] and box[3] <= window[3]


def document_fields(rec: SynthRecord) -> list[tuple[str, str, Box]]:
    """(field name, value, label+value box) of every field row drawn on a page (label, then value)."""
    out = []
    for (label, lbox), (value, vbox) in zip(rec.texts, rec.texts[1:], strict=False):
        if label in FIELDS and value.isdigit():
            out.append((label, value, (lbox[0], min(lbox[1], vbox[1]), vbox[2], max(lbox[3], vbox[3]))))
    return out


def view_questions(
    rec: SynthRecord, window: Box, rng: np.random.Generator, templates: tuple[str, ...] | None = None
) -> list[tuple[str, str]]:
    """Every benchmark question answerable from the ``window`` of ``rec`` (whole image: all of them),
    restricted to ``templates`` when given."""
    full = window == (0, 0, rec.width, rec.height)
    qa: list[tuple[str, str]] = []
    keep = set(templates or TEMPLATES)
    if rec.category == "scene":
        shapes = rec.objects
        # One question per shape: "Which code is on the red star?" next to "What colour is the
        # star?" would let the second be answered from the text of the first.
        for o in shapes:
            options = []
            if o["tag_box"] is not None and _inside(o["tag_box"], window) and "scene_code" in keep:
                code_q = (TEMPLATES["scene_code"].format(colour=o["colour"], shape=o["kind"]), o["code"])
                if rec.template == "scene_code":  # the record's own (fine) question is about this shape
                    qa.append(code_q)
                    continue
                options.append(code_q)
            # The tagged shape is asked for its colour and side too, as the benchmark does: its white
            # tag covers the centre, so its colour must be read from the rim (never taught before
            # this, it scored 11 % at Max-64 against 42 % for untagged shapes).
            if (full or _inside(o["box"], window)) and "scene_colour" in keep:
                options.append((TEMPLATES["scene_colour"].format(shape=o["kind"]), o["colour"]))
            if full and abs(o["centre"][0] - rec.width / 2) > 0.1 * rec.width and "scene_side" in keep:
                side = "left" if o["centre"][0] < rec.width / 2 else "right"
                options.append((TEMPLATES["scene_side"].format(colour=o["colour"], shape=o["kind"]), side))
            if options:
                qa.append(options[int(rng.integers(len(options)))])
        if full and "scene_count" in keep:
            qa.append((TEMPLATES["scene_count"], str(len(shapes))))
    else:
        for name, value, box in document_fields(rec):
            if _inside(box, window) and "doc_value" in keep:
                qa.append((TEMPLATES["doc_value"].format(field=name), value))
        header = next(o for o in rec.objects if o["kind"] == "header")
        if (full or _inside(header["box"], window)) and "doc_header_colour" in keep:
            qa.append((TEMPLATES["doc_header_colour"], header["colour"]))
        if full and "doc_stamp_count" in keep:
            n = sum(1 for o in rec.objects if o["kind"] == "stamp")
            qa.append((TEMPLATES["doc_stamp_count"], str(n)))
    return qa


def shape_groundings(rec: SynthRecord, window: Box, questions: list[str]) -> list[Grounding | None]:
    """Per question, the scene shape it names with its box in the window's pixels (None: names none,
    or the shape is not wholly in the window). A scene never holds two shapes of one kind, so the
    word picks the shape."""
    out: list[Grounding | None] = []
    for question in questions:
        words = set(question.rstrip("?").split())
        named = [o for o in rec.objects if rec.category == "scene" and o["kind"] in words]
        if len(named) == 1 and _inside(named[0]["box"], window):
            x0, y0, x1, y1 = named[0]["box"]
            out.append(Grounding(named[0]["kind"], (x0 - window[0], y0 - window[1], x1 - window[0], y1 - window[1])))
        else:
            out.append(None)
    return out


#: The counting templates and the word of their question that names what is counted.
COUNTED_WORDS = {TEMPLATES["scene_count"]: "shapes", TEMPLATES["doc_stamp_count"]: "stamps"}


def countable_objects(rec: SynthRecord, window: Box) -> list[Box]:
    """The boxes, in the window's pixels and clipped to it, of the objects a count question counts (a
    scene's shapes, a page's stamps) whose centre lies in the window."""
    counted = rec.objects if rec.category == "scene" else [o for o in rec.objects if o["kind"] == "stamp"]
    out = []
    for o in counted:
        x0, y0, x1, y1 = o["box"]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if window[0] <= cx < window[2] and window[1] <= cy < window[3]:
            out.append((max(x0, window[0]) - window[0], max(y0, window[1]) - window[1],
                        min(x1, window[2]) - window[0], min(y1, window[3]) - window[1]))
    return out


def question_counts(questions: list[tuple[str, str]]) -> list[tuple[str, int] | None]:
    """Per (question, answer) turn, (the counted word, the count) where it asks for a count."""
    return [(COUNTED_WORDS[q], int(a)) if q in COUNTED_WORDS else None for q, a in questions]


def field_groundings(rec: SynthRecord, window: Box, questions: list[str]) -> list[Grounding | None]:
    """Per question, the ledger row a ``doc_value`` question asks about (its key and value) with its
    box in the window's pixels (None: asks about none, or the row is not wholly in the window). Keys are
    unique on a page, so the key names the row."""
    rows = {TEMPLATES["doc_value"].format(field=name): (name, box) for name, _, box in document_fields(rec)} \
        if rec.category == "document" else {}
    out: list[Grounding | None] = []
    for question in questions:
        name, box = rows.get(question, (None, None))
        if name is not None and _inside(box, window):
            out.append(Grounding(name, (box[0] - window[0], box[1] - window[1], box[2] - window[0], box[3] - window[1])))
        else:
            out.append(None)
    return out


def tight_window(rec: SynthRecord, scale: float, pad: tuple[float, float], rng: np.random.Generator) -> tuple[Box, int]:
    """A window around the evidence, ``pad`` times its size per side, and the budget that shows it at ``scale``."""
    x0, y0, x1, y1 = rec.evidence_box
    side = ((x1 - x0) * float(rng.uniform(*pad)), (y1 - y0) * float(rng.uniform(*pad)))
    window = crop_around(rec.evidence_box, (rec.width, rec.height), side, rng)
    area = (window[2] - window[0]) * (window[3] - window[1]) * scale * scale
    return window, max(4, math.ceil(area / TOKEN_PX**2))


def make_sample_fn(
    crop_budgets: tuple[int, ...] = (64, 128, 256),
    full_budgets: tuple[int, ...] = (64, 128, 256, 576, 1024),
    full_weights: tuple[float, ...] | None = None,
    crop_prob: float = 0.5,
    glyph_tokens: tuple[float, float] = (1.0, 1.6),
    max_turns: int = 6,
    templates: tuple[str, ...] | None = None,
    tight_prob: float = 0.0,
    tight_pad: tuple[float, float] = (1.05, 1.8),
    scene_shapes: int | None = None,
    ground_shapes: bool = False,
    ground_fields: bool = False,
    count_objects: bool = False,
):
    """A sampler of multi-question views; ``full_weights`` skews which ladder budget whole images get.

    ``templates`` restricts the records and questions to those templates (a curriculum phase).
    ``tight_prob`` of the fine records are shown as a *tight* view: the evidence plus a margin at a
    budget of a few dozen tokens, so a step sees many more glyphs per token (where reading is learned
    fastest); the other fine records get a ``crop_budgets`` window with ``crop_prob``.
    ``scene_shapes`` caps the shapes per scene (None: the benchmark's 2-5), for a binding phase.
    ``ground_shapes`` attaches to every scene question the shape it names (:func:`shape_groundings`),
    for a phase with grounding supervision; the samples are otherwise the same. ``ground_fields`` does
    the same for the ledger row a ``doc_value`` question asks about (:func:`field_groundings`).
    ``count_objects`` attaches the countable objects of every view and the count of every counting
    question (:func:`countable_objects`, :func:`question_counts`), for the count read-outs.
    """
    weights = np.asarray(full_weights or [1.0] * len(full_budgets), dtype=float)
    weights = weights / weights.sum()
    pool = tuple(templates) if templates else None
    if pool and (unknown := set(pool) - set(TEMPLATES)):
        raise ValueError(f"unknown templates {sorted(unknown)}; expected some of {sorted(TEMPLATES)}")

    def sample(rng: np.random.Generator) -> TrainSample:
        while True:
            template = pool[int(rng.integers(len(pool)))] if pool else None
            rec = render_record(
                int(rng.integers(2**31)), split="ordinary", template=template, max_shapes=scene_shapes
            )
            full = (0, 0, rec.width, rec.height)
            # Scale s so that the glyph is `target` px tall after the resize.
            target = float(rng.uniform(*glyph_tokens)) * TOKEN_PX
            scale = min(1.0, target / max(rec.glyph_px, 1))
            if rec.question_type == "fine" and rng.random() < tight_prob:
                window, budget = tight_window(rec, scale, tight_pad, rng)
            elif rec.question_type == "fine" and rng.random() < crop_prob:
                budget = int(crop_budgets[int(rng.integers(len(crop_budgets)))])
                area = budget * TOKEN_PX**2 / (scale * scale)
                aspect = float(np.exp(rng.uniform(math.log(0.6), math.log(1.7))))
                side = (math.sqrt(area * aspect), math.sqrt(area / aspect))
                window = crop_around(rec.evidence_box, (rec.width, rec.height), side, rng)
            else:
                budget = int(rng.choice(full_budgets, p=weights))
                window = full
            qa = view_questions(rec, window, rng, pool)
            if rec.question_type == "fine" and (rec.question, rec.answer) not in qa:
                qa.append((rec.question, rec.answer))  # the fine evidence is always asked about
            if qa:  # a whole scene restricted to templates it cannot answer: draw again
                break
        picked = [qa[i] for i in rng.permutation(len(qa))[:max_turns]]
        image = rec.image if window == full else rec.image.crop(window)
        (q0, a0), rest = picked[0], picked[1:]
        questions = [q for q, _ in picked]
        groundings = []
        if ground_shapes or ground_fields:
            shapes = shape_groundings(rec, window, questions) if ground_shapes else [None] * len(questions)
            fields = field_groundings(rec, window, questions) if ground_fields else [None] * len(questions)
            groundings = [a or b for a, b in zip(shapes, fields, strict=True)]
        return TrainSample(image=image, question=q0, answer=a0, budget_tokens=budget, more_turns=rest,
                           groundings=groundings,
                           counts=question_counts(picked) if count_objects else [],
                           objects=countable_objects(rec, window) if count_objects else None)

    return sample


def tokenizer_corpus() -> list[str]:
    vocab = vocabulary()
    lines = [" ".join(vocab.words), " ".join(vocab.answers), vocab.characters]
    lines += list(TEMPLATES.values()) + [READ_QUESTION]
    return lines
