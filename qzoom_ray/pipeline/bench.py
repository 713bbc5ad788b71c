"""Benchmark: the Ray job's records/s vs the engine's in-process loop, and KV transfer vs recompute.

Used by ``jobs/bench_pipeline.py``. Same records, same model and engine config for every variant.
Figures on a 2-core CPU box with the tiny model are dominated by fixed costs (actor start, model
load); the KV measurement is per zoomed record and scales with model size (see docs/batch-job.md).
"""

from __future__ import annotations

import io
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from qzoom_ray.pipeline.config import BatchJobConfig


def synth_records(n: int, zoom_every: int = 3, seed: int = 0) -> pa.Table:
    """Random JPEGs of varied sizes; every ``zoom_every``-th record is forced through the zoom pass."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        w, h = 200 + 37 * (i % 9), 160 + 23 * (i % 7)
        buf = io.BytesIO()
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(buf, "JPEG")
        images.append(buf.getvalue())
    return pa.table(
        {
            "id": [f"b{i}" for i in range(n)],
            "question": ["What is the value of Total?"] * n,
            "image": pa.array(images, pa.binary()),
            "gate_thresh": [0.0 if i % zoom_every == 0 else 2.0 for i in range(n)],
        }
    )


@dataclass
class KvMeasurement:
    zoomed: int
    prefix_bytes_per_record: float
    recompute_s: float  # zoom pass with prefix=None (layers 0..K-1 and the global ViT recomputed)
    transfer_s: float  # serialise + deserialise the prefix state, then zoom pass reusing it
    serialise_s: float  # the (de)serialisation part of transfer_s


def measure_kv_transfer(cfg: BatchJobConfig, table: pa.Table, repeats: int = 3) -> KvMeasurement:
    from dataclasses import replace

    from qzoom_ray.model.engine import QZoomEngine
    from qzoom_ray.model.state import EngineRecord, ZoomRequest
    from qzoom_ray.pipeline.codec import decode_prefix, encode_prefix

    engine = QZoomEngine(cfg.engine)
    rows = table.to_pylist()
    recs = [EngineRecord(r["id"], r["image"], r["question"], gate_thresh=r["gate_thresh"]) for r in rows]
    preps = [p for p in (engine.prepare(r) for r in recs) if not hasattr(p, "route")]
    reqs = [o for o in engine.coarse(preps, keep_prefix=True) if isinstance(o, ZoomRequest)]
    items = [(r, engine.prepare_roi(r)) for r in reqs]
    engine.zoom(items, reuse_prefix=True)  # warm-up
    best_re = best_tr = best_ser = float("inf")
    blobs: list[bytes] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.zoom([(replace(r, prefix=None), roi) for r, roi in items], reuse_prefix=False)
        best_re = min(best_re, time.perf_counter() - t0)
        t0 = time.perf_counter()
        blobs = [encode_prefix(r.prefix) for r, _ in items]
        moved = [(replace(r, prefix=decode_prefix(b, engine.device)), roi) for (r, roi), b in zip(items, blobs, strict=True)]
        t1 = time.perf_counter()
        engine.zoom(moved, reuse_prefix=True)
        best_tr = min(best_tr, time.perf_counter() - t0)
        best_ser = min(best_ser, t1 - t0)
    return KvMeasurement(len(items), sum(map(len, blobs)) / max(1, len(blobs)), best_re, best_tr, best_ser)


def in_process_rate(cfg: BatchJobConfig, table: pa.Table) -> float:
    from qzoom_ray.model.engine import QZoomEngine
    from qzoom_ray.model.state import EngineRecord

    engine = QZoomEngine(cfg.engine)
    rows = table.to_pylist()
    recs = [EngineRecord(r["id"], r["image"], r["question"], gate_thresh=r["gate_thresh"]) for r in rows]
    t0 = time.perf_counter()
    engine.generate(recs)
    return len(recs) / (time.perf_counter() - t0)


class _Lines(list):
    """Printed as they come (a run takes minutes on CPU), and returned joined at the end."""

    def append(self, line: str) -> None:
        print(line, flush=True)
        super().append(line)


def run_benchmark(cfg: BatchJobConfig, records: int, modes: list[str]) -> str:
    from qzoom_ray.pipeline.runner import run_batch

    table = synth_records(records)
    lines = _Lines()
    lines.append(f"records: {records} ({(np.arange(records) % 3 == 0).sum()} forced to zoom), model {cfg.engine.model.path}")
    kv = measure_kv_transfer(cfg, table.slice(0, min(records, 24)))
    per = 1000 / max(1, kv.zoomed)
    lines.append(
        f"zoom pass, {kv.zoomed} records: recompute {kv.recompute_s * per:.1f} ms/rec | kv transfer "
        f"{kv.transfer_s * per:.1f} ms/rec (of which (de)serialise {kv.serialise_s * per:.1f}) | "
        f"prefix state {kv.prefix_bytes_per_record / 1024:.0f} KiB/rec"
    )
    base = in_process_rate(cfg, table)
    lines.append(f"in-process engine.generate: {base:.2f} records/s")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.parquet"
        pq.write_table(table, src)
        for mode in modes:
            data = cfg.model_dump()
            data["input"]["path"] = str(src)
            data["output"]["path"] = str(Path(tmp) / f"out-{mode}")
            data["colocated"] = mode == "colocated"
            data["zoom_transfer"] = "kv" if mode == "kv" else "recompute"
            summary = run_batch(BatchJobConfig.model_validate(data))
            lines.append(
                f"ray job [{mode}]: {summary.records_per_s:.2f} records/s ({summary.wall_s:.1f} s incl. actor "
                f"start), ratio to in-process {summary.records_per_s / base:.2f}"
            )
    return "\n".join(lines)
