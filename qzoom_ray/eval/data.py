"""Load any labelled VQA dataset (Parquet or JSONL) into plain rows for the evaluation.

Required: ``question``, ``answer`` (or ``answers``), and ``image`` (bytes) or ``image_path``
(relative paths resolve against the file's folder, as in the batch job). Optional: ``id``,
``answers`` (list), ``metric``, ``choices``, ``question_type``, ``split``, ``category``,
``evidence_box`` ([x0, y0, x1, y1] source pixels).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

GROUP_COLUMNS = ("question_type", "split", "category")


@dataclass
class LabelledRow:
    id: str
    image: bytes
    question: str
    answers: list[str]
    metric: str
    choices: list[str] | None = None
    evidence_box: tuple[int, int, int, int] | None = None
    groups: dict[str, str] = field(default_factory=dict)  # question_type / split / category

    @property
    def answer(self) -> str:
        return self.answers[0] if self.answers else ""


def _read_table(path: Path, limit: int | None) -> list[dict[str, Any]]:
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
        return rows
    pf = pq.ParquetFile(path)
    rows = []
    for batch in pf.iter_batches(batch_size=64):
        rows.extend(batch.to_pylist())
        if limit is not None and len(rows) >= limit:
            break
    return rows[:limit] if limit is not None else rows


def to_labelled(raw: dict[str, Any], index: int, root: Path, default_metric: str) -> LabelledRow:
    image = raw.get("image")
    if isinstance(image, dict):  # HF datasets store images as {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    if image is None:
        path = raw.get("image_path")
        if path is None:
            raise ValueError(f"row {index}: no 'image' or 'image_path'")
        image = path
    if isinstance(image, str):
        full = image if os.path.isabs(image) else str(root / image)
        with open(full, "rb") as fh:
            image = fh.read()
    answers = raw.get("answers")
    if answers is None or len(answers) == 0:
        answers = [raw.get("answer")]
    answers = [str(a) for a in answers if a is not None]
    if raw.get("answer") is not None and str(raw["answer"]) not in answers:
        answers.insert(0, str(raw["answer"]))
    box = raw.get("evidence_box")
    groups = {c: str(raw[c]) for c in GROUP_COLUMNS if raw.get(c) is not None}
    return LabelledRow(
        id=str(raw.get("id", index)),
        image=bytes(image),
        question=str(raw["question"]),
        answers=answers,
        metric=str(raw.get("metric") or default_metric),
        choices=list(raw["choices"]) if raw.get("choices") is not None else None,
        evidence_box=tuple(int(v) for v in box) if box is not None and len(box) == 4 else None,  # type: ignore[arg-type]
        groups=groups,
    )


def load_labelled(
    path: str | Path, limit: int | None = None, default_metric: str = "exact_match", ids: set[str] | None = None
) -> list[LabelledRow]:
    """Rows of ``path`` (the first ``limit``; only those whose id is in ``ids`` when given)."""
    path = Path(path)
    raw = _read_table(path, limit)
    keep = [(i, r) for i, r in enumerate(raw) if ids is None or str(r.get("id", i)) in ids]
    return [to_labelled(r, i, path.parent, default_metric) for i, r in keep]
