"""Entry points: :func:`render_record` (one sample, for on-the-fly training loaders) and
:func:`generate_rows` (the rows of a dataset, in the batch job's input format).

Determinism: a record is a pure function of its seed (an int or a sequence of ints fed to
``numpy.random.default_rng``); record ``i`` of a dataset built with seed ``s`` uses ``[s, i]``, so
records can be produced in any order or in parallel and are byte-identical across runs.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from qzoom_ray.synth.common import SynthRecord
from qzoom_ray.synth.documents import render_document
from qzoom_ray.synth.scenes import MAX_SHAPES, render_scene
from qzoom_ray.synth.sizing import min_legible_tokens, sample_size
from qzoom_ray.synth.vocab import COARSE_TEMPLATES, FINE_TEMPLATES, TEMPLATES

CATEGORIES = ("document", "scene")
SPLIT_NAMES = ("ordinary", "ultra_hr")
#: Aspect ratio ranges (W/H): pages are mostly portrait, scenes mostly landscape; both vary.
ASPECT = {"document": (0.55, 1.5), "scene": (0.6, 2.0)}
_KEY = {"document": "doc", "scene": "scene"}

Seed = int | Sequence[int]


def template_category(template: str) -> str:
    return "document" if template.startswith("doc_") else "scene"


def render_record(
    seed: Seed,
    kind: str | None = None,
    split: str | None = "ordinary",
    question_type: str | None = None,
    template: str | None = None,
    size: tuple[int, int] | None = None,
    ultra_frac: float = 0.25,
    fine_frac: float = 0.5,
    max_shapes: int | None = None,
) -> SynthRecord:
    """Render one image + question. ``None`` arguments are drawn from the seed:

    kind: "document" | "scene"; split: "ordinary" | "ultra_hr" (None: ultra with ``ultra_frac``);
    question_type: "fine" | "coarse" (None: fine with ``fine_frac``); template: a key of
    :data:`~qzoom_ray.synth.vocab.TEMPLATES` (overrides kind and question_type); size: (W, H),
    else drawn from the split's range (the fine text size always follows the split's rule);
    max_shapes: scenes hold 2 to this many shapes (None: the benchmark's
    :data:`~qzoom_ray.synth.scenes.MAX_SHAPES`; documents ignore it).
    """
    rng = np.random.default_rng(seed)
    # Draw every choice even when it is given, so that fixing one argument does not shift the rest.
    drawn_kind = CATEGORIES[int(rng.integers(2))]
    drawn_split = "ultra_hr" if rng.random() < ultra_frac else "ordinary"
    drawn_type = "fine" if rng.random() < fine_frac else "coarse"
    if template is not None:
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; expected one of {sorted(TEMPLATES)}")
        kind = template_category(template)
    kind = kind or drawn_kind
    split = split or drawn_split
    if kind not in CATEGORIES or split not in SPLIT_NAMES:
        raise ValueError(f"kind must be one of {CATEGORIES} and split one of {SPLIT_NAMES}")
    pool = (FINE_TEMPLATES if (question_type or drawn_type) == "fine" else COARSE_TEMPLATES)[_KEY[kind]]
    drawn_template = pool[int(rng.integers(len(pool)))]
    template = template or drawn_template
    width, height = size or sample_size(rng, split, ASPECT[kind])
    if kind == "document":
        return render_document(rng, split, width, height, template)
    return render_scene(rng, split, width, height, template, max_shapes=MAX_SHAPES if max_shapes is None else max_shapes)


def encode_image(record: SynthRecord, image_format: str = "auto") -> tuple[bytes, str]:
    """(bytes, extension). auto: PNG for pages (sharp, compresses well), JPEG q95 for cluttered scenes."""
    fmt = image_format.lower()
    if fmt == "auto":
        fmt = "png" if record.category == "document" else "jpeg"
    buf = io.BytesIO()
    if fmt == "png":
        record.image.save(buf, "PNG", compress_level=6)
        return buf.getvalue(), "png"
    if fmt in ("jpeg", "jpg"):
        # Fixed settings (no optimize pass, 4:4:4) keep small coloured text crisp and the bytes stable.
        record.image.save(buf, "JPEG", quality=95, subsampling=0)
        return buf.getvalue(), "jpg"
    raise ValueError(f"unknown image format {image_format!r}")


def record_row(record: SynthRecord, record_id: str, image: bytes | None = None) -> dict[str, Any]:
    """The dataset columns of ``record`` (``image`` bytes when given; see docs/benchmark.md)."""
    legible = (
        min_legible_tokens(record.width, record.height, record.glyph_px) if record.question_type == "fine" else None
    )
    row: dict[str, Any] = {
        "id": record_id,
        "question": record.question,
        "answer": record.answer,
        "answers": list(record.answers),
        "question_type": record.question_type,
        "category": record.category,
        "split": record.split,
        "template": record.template,
        "layout": record.layout,
        "metric": record.metric,
        "choices": record.choices,
        "evidence_box": [int(v) for v in record.evidence_box],
        "answer_box": [int(v) for v in record.answer_box] if record.answer_box else None,
        "image_width": record.width,
        "image_height": record.height,
        "glyph_px": record.glyph_px,
        "min_legible_tokens": legible,
    }
    if image is not None:
        row = {"id": record_id, "image": image, **{k: v for k, v in row.items() if k != "id"}}
    return row


def generate_records(
    n: int, seed: int, split: str = "mixed", ultra_frac: float = 0.25, fine_frac: float = 0.5, start: int = 0
) -> Iterator[tuple[str, SynthRecord]]:
    """(id, record) for records ``start .. start+n-1``; split: "ordinary" | "ultra_hr" | "mixed"."""
    fixed = None if split == "mixed" else split
    for i in range(start, start + n):
        yield f"synth-{seed}-{i:06d}", render_record([seed, i], split=fixed, ultra_frac=ultra_frac, fine_frac=fine_frac)
