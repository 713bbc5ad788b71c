"""Write generated records as Parquet (image bytes inline) or JSONL (+ image files), streaming."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from qzoom_ray.synth.common import SynthRecord
from qzoom_ray.synth.generator import encode_image, record_row

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("answers", pa.list_(pa.string())),
        ("question_type", pa.string()),
        ("category", pa.string()),
        ("split", pa.string()),
        ("template", pa.string()),
        ("layout", pa.string()),
        ("metric", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("evidence_box", pa.list_(pa.int32())),
        ("answer_box", pa.list_(pa.int32())),
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("glyph_px", pa.int32()),
        ("min_legible_tokens", pa.int64()),
    ]
)

#: Rows per Parquet row group: ultra-hr images are several MB, so flush often to bound memory.
ROW_GROUP = 32


def write_parquet(records: Iterable[tuple[str, SynthRecord]], path: str | Path, image_format: str = "auto") -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, buffer = 0, []
    with pq.ParquetWriter(str(path), SCHEMA) as writer:
        for rid, rec in records:
            data, _ = encode_image(rec, image_format)
            buffer.append(record_row(rec, rid, data))
            n += 1
            if len(buffer) >= ROW_GROUP:
                writer.write_table(pa.Table.from_pylist(buffer, schema=SCHEMA))
                buffer = []
        if buffer or n == 0:
            writer.write_table(pa.Table.from_pylist(buffer, schema=SCHEMA))
    return n


def write_jsonl(records: Iterable[tuple[str, SynthRecord]], path: str | Path, image_format: str = "auto") -> int:
    """JSONL with an ``image_path`` column relative to the file's folder (how the batch job resolves it)."""
    path = Path(path)
    img_dir = path.parent / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for rid, rec in records:
            data, ext = encode_image(rec, image_format)
            name = f"{rid}.{ext}"
            (img_dir / name).write_bytes(data)
            row = record_row(rec, rid)
            row = {"id": rid, "image_path": os.path.join("images", name), **{k: v for k, v in row.items() if k != "id"}}
            fh.write(json.dumps(row) + "\n")
            n += 1
    return n
