"""Under load both model deployments scale up (zoom from zero), and back down once load stops.

Slow (about a minute): autoscaling is configured with short delays, but replicas still need a few
seconds each to start on 2 CPUs.
"""

from __future__ import annotations

import threading

import pytest
from serve_helpers import TOKEN, running_app, serve_args_for

from qzoom_ray.serve.bench import ReplicaSampler, make_bodies, run_load
from qzoom_ray.serve.local import replica_counts, wait_for

pytestmark = pytest.mark.slow

FAST = {"upscale_delay_s": 1, "downscale_delay_s": 3, "metrics_interval_s": 0.5, "look_back_period_s": 2}


@pytest.fixture(scope="module")
def url(tiny_model_dir):
    args = serve_args_for(
        tiny_model_dir,
        coarse={
            "num_cpus": 0.25,
            "max_ongoing_requests": 8,
            "max_queued_requests": 256,
            "autoscaling": {
                "min_replicas": 1,
                "initial_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 1,
                **FAST,
            },
        },
        zoom={
            "num_cpus": 0.25,
            "max_ongoing_requests": 8,
            "max_queued_requests": 256,
            "autoscaling": {
                "min_replicas": 0,
                "initial_replicas": 0,
                "max_replicas": 2,
                "target_ongoing_requests": 1,
                "downscale_to_zero_delay_s": 3,
                **FAST,
            },
        },
        live={"max_batch_size": 4},
    )
    with running_app(args) as base:
        yield base


def test_replicas_follow_load(url):
    start = replica_counts()
    assert start["CoarseServer"] == 1 and start["ZoomServer"] == 0, start

    stop = threading.Event()
    box = {}
    # Every request is forced through the zoom pass (gate 0), so both deployments see the load.
    bodies = make_bodies(8, zoom_fraction=1.0, max_tokens=4)
    load = threading.Thread(
        target=lambda: box.setdefault(
            "report", run_load(url, bodies, requests=5000, concurrency=16, token=TOKEN, stop=stop)
        )
    )
    with ReplicaSampler(replica_counts, 0.5) as sampler:
        load.start()
        try:
            scaled = wait_for(
                lambda: (
                    sampler.peak().get("CoarseServer", 0) >= 2 and sampler.peak().get("ZoomServer", 0) >= 2
                ),
                90,
                1.0,
            )
        finally:
            stop.set()
            load.join()
        down = wait_for(
            lambda: replica_counts() == {**replica_counts(), "CoarseServer": 1, "ZoomServer": 0}, 90, 1.0
        )
    report = box["report"]
    print(f"\n{report.summary()}\npeak {sampler.peak()}\n{sampler.timeline()}")
    assert report.server_errors == 0, report.summary()
    assert scaled, f"did not reach 2+2 replicas under load:\n{sampler.timeline()}"
    assert down, f"did not scale back to 1 coarse / 0 zoom:\n{sampler.timeline()}"
