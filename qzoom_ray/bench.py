"""Helpers shared by the benchmark jobs: deterministic records and timing."""

from __future__ import annotations

import io
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from qzoom_ray.model.state import EngineRecord, EngineResult

QUESTIONS = [
    "What is the value of 'Total'?",
    "Which code is on the red triangle?",
    "How many shapes are there?",
    "What colour is the largest circle?",
]


def synthetic_page(width: int, height: int, seed: int) -> bytes:
    """A page-like image: light background, blocks of dark 'text' strokes and a few coloured shapes."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.rectangle([x, y, x + int(rng.integers(20, 200)), y + 6], fill=(30, 30, 30))
    for _ in range(5):
        x, y, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(10, 60))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bench_records(n: int, seed: int = 0) -> list[EngineRecord]:
    """``n`` records with varied sizes (600..2000 px sides) and aspect ratios."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = int(rng.integers(600, 2000)), int(rng.integers(600, 2000))
        out.append(EngineRecord(f"bench-{i}", synthetic_page(w, h, seed + i), QUESTIONS[i % len(QUESTIONS)]))
    return out


def measure(engine, records: Sequence[EngineRecord], repeats: int) -> tuple[float, list[EngineResult]]:
    """Best records/s over ``repeats`` runs of ``engine.generate`` (prep included, as a user sees it)."""
    best, results = 0.0, []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        results = engine.generate(records)
        rate = len(records) / (time.perf_counter() - t0)
        best = max(best, rate)
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"benchmark records failed: {errors[:3]}")
    return best, results


def model_seconds(results: Sequence[EngineResult]) -> float:
    """Device-side time (coarse + zoom + decode; each record's amortised share, summed)."""
    return sum(r.timings.get(k, 0.0) for r in results for k in ("coarse_s", "zoom_s", "decode_s"))


def token_table(runs: dict[str, tuple[float, list[EngineResult]]]) -> str:
    lines = [f"{'setting':<24} {'records/s':>10} {'visual tok/rec':>15} {'coarse':>8} {'roi':>8} {'zoom':>6}"]
    for name, (rate, res) in runs.items():
        n = len(res)
        coarse = sum(r.coarse_visual_tokens for r in res) / n
        roi = sum(r.roi_visual_tokens for r in res) / n
        zoom = sum(r.zoomed for r in res) / n
        lines.append(f"{name:<24} {rate:>10.2f} {coarse + roi:>15.1f} {coarse:>8.1f} {roi:>8.1f} {zoom:>6.0%}")
    return "\n".join(lines)
