"""Helpers of the batch-job tests: input tables, hostile records, job configs, output readers."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import TEST_MAX_PIXELS, TEST_MIN_PIXELS, make_image_bytes
from PIL import Image

from qzoom_ray.pipeline.config import BatchJobConfig

QUESTION = "What is the value of Total?"


def good_rows(n: int, prefix: str = "r") -> list[dict]:
    """Well-formed records; every third one forced through the zoom pass (per-record gate threshold)."""
    return [
        {
            "id": f"{prefix}{i}",
            "question": QUESTION,
            "image": make_image_bytes(180 + 17 * (i % 7), 150 + 11 * (i % 5), i, "JPEG"),
            "gate_thresh": 0.0 if i % 3 == 0 else 2.0,
            "answer": f"truth-{i}",  # a ground-truth column: passes through as input_answer
        }
        for i in range(n)
    ]


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny file that declares a huge image: rejected on the header, before any pixel is decoded."""
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def hostile_rows(tmp: Path) -> list[dict]:
    good = make_image_bytes(200, 160, 99, "PNG")
    empty = tmp / "empty.png"
    empty.write_bytes(b"")
    base = {"question": QUESTION, "gate_thresh": 2.0, "answer": None}
    return [
        {**base, "id": "corrupt", "image": b"this is not an image at all"},
        {**base, "id": "truncated", "image": good[: len(good) // 3]},
        {**base, "id": "empty_bytes", "image": b""},
        {**base, "id": "empty_file", "image": None, "image_path": str(empty)},
        {**base, "id": "missing_path", "image": None, "image_path": str(tmp / "nope.jpg")},
        {**base, "id": "bomb", "image": bomb_png()},
        {**base, "id": "aspect", "image": make_image_bytes(2000, 4, 1, "PNG")},
        {**base, "id": "empty_question", "image": good, "question": "   "},
        {**base, "id": "no_image", "image": None},
    ]


HOSTILE_ERRORS = {
    "corrupt": "unrecognised or corrupt",
    "truncated": "truncated",
    "empty_bytes": "empty image",
    "empty_file": "empty image",
    "missing_path": "not found",
    "bomb": "decompression bomb",
    "aspect": "aspect ratio",
    "empty_question": "empty question",
    "no_image": "no image",
}


INPUT_SCHEMA = pa.schema(
    [("id", pa.string()), ("question", pa.string()), ("image", pa.binary()), ("image_path", pa.string()),
     ("gate_thresh", pa.float64()), ("answer", pa.string())]
)


def rows_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in INPUT_SCHEMA.names} for r in rows], schema=INPUT_SCHEMA)


def write_parquet(rows: list[dict], path: Path | str, filesystem=None) -> None:
    pq.write_table(rows_table(rows), str(path), filesystem=filesystem)


def job_config(model_dir: str, input_path: str, output_path: str, **overrides) -> BatchJobConfig:
    """A small, fast job: test pixel budgets, 4 new tokens, actor CPUs summing to <= 1 (2-CPU Ray)."""
    data: dict = {
        "engine": {
            "model": {"path": model_dir},
            "zoom": {"min_pixels": TEST_MIN_PIXELS, "max_pixels": TEST_MAX_PIXELS},
            "generation": {"max_new_tokens": 4},
            "max_batch_size": 4,
        },
        "input": {"path": input_path},
        "output": {"path": output_path, "min_rows_per_file": 4},
        "pools": {
            "prepare": {"num_cpus": 0.25, "batch_size": 4, "torch_threads": 1},
            "coarse": {"num_cpus": 0.25, "batch_size": 4, "torch_threads": 1},
            "crop": {"num_cpus": 0.25, "batch_size": 4, "torch_threads": 1},
            "zoom": {"num_cpus": 0.25, "batch_size": 4, "torch_threads": 1},
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            for k, v in value.items():
                data[key][k] = {**data[key][k], **v} if isinstance(v, dict) and isinstance(data[key].get(k), dict) else v
        else:
            data[key] = value
    return BatchJobConfig.model_validate(data)


def write_config(cfg: BatchJobConfig, path: Path) -> Path:
    path.write_text(cfg.to_yaml())
    return path


def read_output(path: str | os.PathLike, filesystem=None) -> pa.Table:
    """All rows of an output folder (local, or bucket/prefix with an fsspec filesystem)."""
    import pyarrow.dataset as pads

    return pads.dataset(str(path), format="parquet", filesystem=filesystem, exclude_invalid_files=False).to_table()


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    return env


def load_summary(path: Path) -> dict:
    return json.loads((path / "_qzoom_summary.json").read_text())
