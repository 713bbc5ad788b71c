"""Start and stop the app on a local, loopback-only Ray (jobs/serve.py, the bench and the tests)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from qzoom_ray.serve.config import ServeArgs

APP_NAME = "qzoom"
_AUTH_TOKEN = Path.home() / ".ray" / "auth_token"
_token_preexisted: bool | None = None

#: Loopback-only single-node Ray without token auth or usage reporting (see platform notes §3).
LOCAL_RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def start_local(
    args: ServeArgs,
    *,
    port: int = 8000,
    num_cpus: int | None = 2,
    ray_address: str | None = None,
) -> str:
    """Start Ray (unless already up) and Serve on 127.0.0.1:``port``, deploy, return the base URL.

    Environment variables (including the API tokens) must be set before this call: the Ray workers,
    and so the replicas, inherit the environment of the process that starts Ray.
    """
    import ray
    from ray import serve

    from qzoom_ray.serve.app import build_app

    global _token_preexisted
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    if _token_preexisted is None:
        _token_preexisted = _AUTH_TOKEN.exists()
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address)
        else:
            # address="local": a bare ray.init() would join any cluster `ray start` left on this machine.
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def stop_local() -> None:
    """Tear down Serve and Ray; never raises, so it is safe in a ``finally``."""
    import ray
    from ray import serve

    with contextlib.suppress(Exception):
        serve.shutdown()
    with contextlib.suppress(Exception):
        ray.shutdown()
    # A token ray.init wrote flips later clusters into token mode; remove it only if we created it.
    global _token_preexisted
    if _token_preexisted is False:
        _AUTH_TOKEN.unlink(missing_ok=True)
    _token_preexisted = None


def replica_counts(app_name: str = APP_NAME) -> dict[str, int]:
    """RUNNING replicas per deployment of ``app_name``, from ``serve.status()``."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {name: d.replica_states.get("RUNNING", 0) for name, d in app.deployments.items()}


def wait_for(predicate, timeout_s: float, interval_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def local_cpu_args(**overrides) -> ServeArgs:
    """ServeArgs for a small CPU box with the embedded tiny model: small pixel budgets, fractional CPUs
    so ingress + coarse + zoom (and their autoscaled copies) fit on 2 cores, one torch thread each."""
    data = {
        "engine": {
            "zoom": {"min_pixels": 64 * 28 * 28, "max_pixels": 256 * 28 * 28},
            "generation": {"max_new_tokens": 16},
            "torch_threads": 1,
        },
        "ingress": {"num_cpus": 0.1},
        "coarse": {"num_cpus": 0.25},
        "zoom": {
            "num_cpus": 0.25,
            "autoscaling": {
                "min_replicas": 0,
                "initial_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 4,
            },
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return ServeArgs.model_validate(data)
