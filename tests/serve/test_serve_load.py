"""Bounded load on loopback: 500 requests at 16-way concurrency, 0 server errors (slow: ~1 min on 2 CPUs)."""

from __future__ import annotations

import pytest
from serve_helpers import TOKEN, running_app, serve_args_for

from qzoom_ray.serve.bench import run_bench
from qzoom_ray.serve.local import replica_counts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def url(tiny_model_dir):
    with running_app(serve_args_for(tiny_model_dir)) as base:
        yield base


def test_500_requests_at_16_way_concurrency(url):
    report, sampler = run_bench(
        url,
        TOKEN,
        requests=500,
        concurrency=16,
        zoom_fraction=0.5,
        max_tokens=6,
        sample_replicas=replica_counts,
    )
    print(f"\n{report.summary()}\npeak replicas {sampler.peak()}")
    assert report.requests == 500
    assert report.server_errors == 0 and report.ok == 500, report.summary()
