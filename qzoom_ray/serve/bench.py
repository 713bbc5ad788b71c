"""A bounded HTTP load generator for the endpoint: N requests at C-way concurrency, then it stops.

Stdlib HTTP only (one keep-alive connection per worker thread), so it adds no dependency and can
point at any deployment. Used by jobs/bench_serve.py and the slow load test.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np


def chat_body(
    image: bytes,
    question: str,
    *,
    model: str = "qzoom",
    max_tokens: int | None = None,
    gate_thresh: float | None = None,
    mime: str = "image/png",
) -> dict:
    """An OpenAI chat-completions body with one inline image."""
    uri = f"data:{mime};base64,{base64.b64encode(image).decode()}"
    body: dict = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": question},
                ],
            }
        ],
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if gate_thresh is not None:
        body["qzoom"] = {"gate_thresh": gate_thresh}
    return body


def random_png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    arr = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def make_bodies(
    n: int = 8, zoom_fraction: float = 0.5, max_tokens: int = 8, model: str = "qzoom"
) -> list[bytes]:
    """``n`` distinct request bodies; ``zoom_fraction`` of them force the zoom route (gate 0), the
    rest force the direct route (gate 2), so both deployments see traffic whatever the model's gate."""
    sizes = [(320, 240), (240, 320), (400, 300), (224, 224)]
    n_zoom = round(n * zoom_fraction)
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        body = chat_body(
            random_png(w, h, i),
            f"What is written in region {i}?",
            model=model,
            max_tokens=max_tokens,
            gate_thresh=0.0 if i < n_zoom else 2.0,
        )
        out.append(json.dumps(body).encode())
    return out


@dataclass
class LoadReport:
    requests: int
    concurrency: int
    wall_s: float
    latencies_ms: list[float] = field(repr=False)
    statuses: Counter
    transport_errors: int

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def rejected(self) -> int:
        """Backpressure: 429/503 with Retry-After, the intended answer to overload."""
        return self.statuses.get(429, 0) + self.statuses.get(503, 0)

    @property
    def server_errors(self) -> int:
        return sum(c for s, c in self.statuses.items() if s >= 500 and s != 503) + self.transport_errors

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s if self.wall_s else 0.0

    def summary(self) -> str:
        return (
            f"requests={self.requests} concurrency={self.concurrency} ok={self.ok} "
            f"rejected(429/503)={self.rejected} server_errors={self.server_errors} "
            f"statuses={dict(sorted(self.statuses.items()))} wall={self.wall_s:.1f}s "
            f"req/s={self.rps:.1f} p50={self.percentile_ms(50):.0f}ms p99={self.percentile_ms(99):.0f}ms"
        )


def run_load(
    url: str,
    bodies: list[bytes],
    *,
    requests: int = 500,
    concurrency: int = 16,
    token: str | None = None,
    timeout_s: float = 120.0,
    path: str = "/v1/chat/completions",
    stop: threading.Event | None = None,
    on_response: Callable[[int], None] | None = None,
) -> LoadReport:
    """Send ``requests`` POSTs (cycling through ``bodies``) from ``concurrency`` threads and wait."""
    parts = urlsplit(url)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: Counter = Counter()
    transport = [0]

    def worker() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)
        try:
            while stop is None or not stop.is_set():
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    conn.request("POST", path, body=bodies[i % len(bodies)], headers=headers)
                    resp = conn.getresponse()
                    resp.read()
                    status = resp.status
                except (OSError, http.client.HTTPException):
                    conn.close()  # reconnect on the next request
                    with lock:
                        transport[0] += 1
                    continue
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1000)
                    statuses[status] += 1
                if on_response:
                    on_response(status)
        finally:
            conn.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    done = sum(statuses.values()) + transport[0]
    return LoadReport(done, concurrency, time.perf_counter() - t0, latencies, statuses, transport[0])


class ReplicaSampler:
    """Samples `serve.status()` replica counts in a background thread while load runs."""

    def __init__(self, sample: Callable[[], dict[str, int]], interval_s: float = 0.5):
        self.sample, self.interval_s = sample, interval_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.is_set():
            # A status call can fail while replicas move; the next sample will do.
            with contextlib.suppress(Exception):
                self.samples.append((time.monotonic() - self._t0, self.sample()))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> ReplicaSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, counts in self.samples:
            for name, n in counts.items():
                out[name] = max(out.get(name, 0), n)
        return out

    def timeline(self) -> str:
        """Changes only: ``t=3.5s {'CoarseServer': 2, ...}``."""
        lines, last = [], None
        for t, counts in self.samples:
            if counts != last:
                lines.append(f"t={t:.1f}s {counts}")
                last = counts
        return "\n".join(lines)


def run_bench(
    url: str,
    token: str | None,
    *,
    requests: int = 500,
    concurrency: int = 16,
    zoom_fraction: float = 0.5,
    max_tokens: int = 8,
    model: str = "qzoom",
    sample_replicas: Callable[[], dict[str, int]] | None = None,
) -> tuple[LoadReport, ReplicaSampler | None]:
    """One bounded load run, optionally sampling replica counts (when this process drives the app)."""
    bodies = make_bodies(16, zoom_fraction=zoom_fraction, max_tokens=max_tokens, model=model)
    if sample_replicas is None:
        return run_load(url, bodies, requests=requests, concurrency=concurrency, token=token), None
    with ReplicaSampler(sample_replicas) as sampler:
        report = run_load(url, bodies, requests=requests, concurrency=concurrency, token=token)
    return report, sampler
