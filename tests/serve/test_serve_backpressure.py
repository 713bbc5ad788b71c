"""Overload is answered with 429 + Retry-After in OpenAI's shape, never with a 5xx or an endless queue."""

from __future__ import annotations

import json

import pytest
from serve_helpers import TOKEN, running_app, serve_args_for

from qzoom_ray.serve.bench import make_bodies, run_load


@pytest.fixture(scope="module")
def url(tiny_model_dir):
    one = {"min_replicas": 1, "max_replicas": 1}
    args = serve_args_for(
        tiny_model_dir,
        # One request in flight and one waiting on the coarse replica: the rest must bounce.
        coarse={
            "num_cpus": 0.25,
            "max_ongoing_requests": 1,
            "max_queued_requests": 1,
            "retry_after_s": 3,
            "autoscaling": one,
        },
        # Every request here is direct, so the zoom deployment never needs a replica (saves a start).
        zoom={"num_cpus": 0.25, "autoscaling": {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1}},
        live={"max_batch_size": 1},
    )
    with running_app(args) as base:
        yield base


def test_overload_is_rejected_with_retry_after(url):
    import http.client
    from urllib.parse import urlsplit

    statuses = []
    report = run_load(
        url,
        make_bodies(4, zoom_fraction=0.0, max_tokens=4),
        requests=48,
        concurrency=16,
        token=TOKEN,
        on_response=statuses.append,
    )
    print(report.summary())
    assert report.server_errors == 0, report.summary()
    assert report.ok > 0 and report.statuses.get(429, 0) > 0, report.summary()
    assert set(report.statuses) <= {200, 429}, report.summary()

    # One rejected response in detail: OpenAI error shape and a Retry-After header.
    parts = urlsplit(url)
    body = make_bodies(1, zoom_fraction=0.0, max_tokens=4)[0]
    seen = None
    for _ in range(10):
        conns = [http.client.HTTPConnection(parts.hostname, parts.port, timeout=60) for _ in range(12)]
        for c in conns:
            c.request(
                "POST",
                "/v1/chat/completions",
                body=body,
                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
            )
        for c in conns:
            resp = c.getresponse()
            data = resp.read()
            if resp.status == 429 and seen is None:
                seen = (resp.getheader("Retry-After"), json.loads(data))
            c.close()
        if seen:
            break
    assert seen is not None, "no request was rejected under 12-way load on a 1+1 slot replica"
    retry_after, err = seen
    assert retry_after == "3"
    assert err["error"]["type"] == "rate_limit_error" and err["error"]["code"] == "overloaded"
