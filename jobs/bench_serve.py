"""Bounded load test of the endpoint: N requests at C-way concurrency, then a summary; stops by itself.

    .venv/bin/python jobs/bench_serve.py                          # starts the app locally (tiny model, CPU)
    .venv/bin/python jobs/bench_serve.py --url http://host:8000 --token $QZOOM_API_KEYS

Exit status 1 when any request ended in a server error (5xx other than a 503 backpressure answer).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--zoom-fraction", type=float, default=0.5, help="share of requests forced to zoom")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--url", help="an already running endpoint; default: start one locally")
    parser.add_argument("--token", default=None, help="bearer token for --url")
    parser.add_argument("--port", type=int, default=8000)
    opts = parser.parse_args()

    from qzoom_ray.serve.bench import run_bench
    from qzoom_ray.serve.local import local_cpu_args, replica_counts, start_local, stop_local

    url, token, sampler_fn = opts.url, opts.token, None
    try:
        if url is None:
            token = os.environ.setdefault("QZOOM_API_KEYS", secrets.token_urlsafe(24)).split(",")[0]
            url = start_local(local_cpu_args(), port=opts.port)
            sampler_fn = replica_counts
            print(f"started locally at {url}; replicas {replica_counts()}")
        report, sampler = run_bench(
            url,
            token,
            requests=opts.requests,
            concurrency=opts.concurrency,
            zoom_fraction=opts.zoom_fraction,
            max_tokens=opts.max_tokens,
            sample_replicas=sampler_fn,
        )
        print(report.summary())
        if sampler is not None:
            print(f"peak replicas {sampler.peak()}\nreplica timeline:\n{sampler.timeline()}")
        return 1 if report.server_errors else 0
    finally:
        if opts.url is None:
            stop_local()


if __name__ == "__main__":
    sys.exit(main())
