"""How well stage-1 pseudo labels point at the evidence, on rows that carry an ``evidence_box``.

Labels are self-supervised, so their quality is a property of the base model's attention. On a
benchmark with evidence boxes it can be measured before any twig is trained: a label run whose
hottest cell rarely lies in the evidence will not teach a twig to find it either.

Pure functions over label rows (the columns ``jobs/make_pseudo_labels.py`` writes); the image is read
only for its size.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from qzoom_ray.eval.metrics import exact_match
from qzoom_ray.train.labels import box_in_view, evidence_cells

LABEL_QUALITY_COLUMNS = ["id", "image", "grid_h", "grid_w", "attn_map", "labels", "valid", "evidence_box",
                         "pad_to_square", "answer", "gt_answer"]


@dataclass(frozen=True)
class LabelEvidence:
    """One valid label row against its evidence box."""

    peak_in_evidence: bool  # the attention map's hottest cell overlaps the evidence
    fg_holds_evidence: bool  # some foreground cell overlaps the evidence
    fg_cells: int
    labelled_cells: int  # foreground + background (ignored cells excluded)


def _image_size(image: Any) -> tuple[int, int]:
    data = image["bytes"] if isinstance(image, dict) else image
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def label_evidence(row: dict[str, Any], image_wh: tuple[int, int] | None = None) -> LabelEvidence | None:
    """``None`` for rows without an evidence box or with an all-ignore (invalid) label."""
    if not row.get("valid") or row.get("evidence_box") is None:
        return None
    h, w = int(row["grid_h"]), int(row["grid_w"])
    wh = image_wh or _image_size(row["image"])
    box, wh = box_in_view(row["evidence_box"], wh, bool(row.get("pad_to_square")))
    cells = evidence_cells(box, wh, (h, w))
    attn = np.asarray(row["attn_map"], dtype=np.float64).reshape(h, w)
    labels = np.asarray(row["labels"]).reshape(h, w)
    fg = labels == 1
    return LabelEvidence(
        peak_in_evidence=bool(cells.flat[int(attn.argmax())]),
        fg_holds_evidence=bool((fg & cells).any()),
        fg_cells=int(fg.sum()),
        labelled_cells=int((labels >= 0).sum()),
    )


def summarise_label_quality(rows: Iterable[dict[str, Any]],
                            group_of: Callable[[dict[str, Any]], str] = lambda r: "all",
                            image_wh: Callable[[dict[str, Any]], tuple[int, int]] | None = None,
                            ) -> dict[str, dict[str, float]]:
    """Per group: rows, valid share, and over valid rows with evidence the peak / foreground hit rates,
    the foreground's share of labelled cells, and how often the label-time answer was right."""
    acc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in rows:
        g = acc[group_of(row)]
        g["rows"] += 1
        g["valid"] += bool(row.get("valid"))
        ev = label_evidence(row, image_wh(row) if image_wh else None)
        if ev is None:
            continue
        g["scored"] += 1
        g["peak_in_evidence"] += ev.peak_in_evidence
        g["fg_holds_evidence"] += ev.fg_holds_evidence
        g["fg_share"] += ev.fg_cells / max(ev.labelled_cells, 1)
        if row.get("gt_answer") is not None:
            g["answered"] += 1
            g["answer_right"] += exact_match(str(row.get("answer") or ""), [str(row["gt_answer"])]) == 1.0
    out = {}
    for name, g in sorted(acc.items()):
        n = g["scored"]
        out[name] = {"rows": int(g["rows"]), "valid": g["valid"] / g["rows"], "scored": int(n)}
        for key in ("peak_in_evidence", "fg_holds_evidence", "fg_share"):
            out[name][key] = g[key] / n if n else float("nan")
        # The rule of stage 1's `correct_answers_only`: exact match after normalisation.
        out[name]["answer_right"] = g["answer_right"] / g["answered"] if g["answered"] else float("nan")
    return out
