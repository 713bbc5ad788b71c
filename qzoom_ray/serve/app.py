"""The application builder: `build_app(args: ServeArgs) -> Application`.

`serve deploy configs/serve.yaml` imports `qzoom_ray.serve.app:build_app` and validates the YAML's
`args:` block against `ServeArgs` (Serve does so because of the annotation below; this module must
therefore not use ``from __future__ import annotations``, which would turn it into a string).
"""

from typing import Any

from ray.serve import Application
from ray.serve.config import BackpressureConfig

from qzoom_ray.serve.config import DeploymentOptions, ServeArgs
from qzoom_ray.serve.deployments import CoarseServer, QZoomIngress, ZoomServer


def deployment_options(opts: DeploymentOptions, user_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """`Deployment.options(...)` kwargs from our per-deployment config."""
    out: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus},
        "autoscaling_config": dict(opts.autoscaling),
        "max_ongoing_requests": opts.max_ongoing_requests,
        # A bounded queue plus a status and Retry-After: overload becomes a fast, retryable rejection.
        "max_queued_requests": opts.max_queued_requests,
        "backpressure_config": BackpressureConfig(
            status_code=opts.backpressure_status, retry_after_s=opts.retry_after_s
        ),
    }
    if user_config is not None:
        out["user_config"] = user_config
    return out


def build_app(args: ServeArgs) -> Application:
    if not isinstance(args, ServeArgs):  # `serve run module:build_app key=value` passes a plain dict
        args = ServeArgs.model_validate(args)
    engine = args.engine_for_serving().model_dump(mode="json")
    live = args.live.model_dump(mode="json")
    if args.live.max_batch_size > min(args.coarse.max_ongoing_requests, args.zoom.max_ongoing_requests):
        raise ValueError("live.max_batch_size must not exceed coarse/zoom max_ongoing_requests")
    coarse = CoarseServer.options(**deployment_options(args.coarse, live)).bind(engine, args.reuse_prefix)
    zoom = ZoomServer.options(**deployment_options(args.zoom, live)).bind(engine, args.reuse_prefix)
    ingress = QZoomIngress.options(**deployment_options(args.ingress))
    return ingress.bind(coarse, zoom, args.model_dump(mode="json"))
