"""Arguments of the Serve application (`build_app(args: ServeArgs)`), validated before anything starts.

`ServeArgs` is what the `args:` block of `configs/serve.yaml` holds. `LiveConfig` travels separately as
the coarse and zoom deployments' `user_config`, so thresholds and budgets change with `serve deploy`
without restarting a replica (Serve then only calls `reconfigure`).
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from qzoom_ray.config import EngineConfig, StrictModel

MiB = 1024 * 1024


class AuthConfig(StrictModel):
    enabled: bool = Field(
        True,
        description="Require `Authorization: Bearer <token>` on every route except /healthz. Turn off only "
        "for a loopback-only local test; Serve itself has no authentication.",
    )
    token_env: str = Field(
        "QZOOM_API_KEYS",
        description="Environment variable (on the Ray nodes) holding the accepted tokens, comma-separated. "
        "Tokens are never read from this config, so they stay out of git and of `serve status`.",
    )


class LimitsConfig(StrictModel):
    max_body_bytes: int = Field(
        16 * MiB, gt=0, description="Request bodies larger than this are cut off while streaming (413)."
    )
    max_image_bytes: int = Field(
        10 * MiB, gt=0, description="Largest encoded image, inline (decoded base64) or fetched."
    )
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="Largest image by its header size (decompression-bomb guard)."
    )
    max_question_chars: int = Field(
        4096, gt=0, description="Longest question (text of the last user message)."
    )
    max_tokens: int = Field(
        1024, ge=1, description="Largest `max_tokens` / `max_completion_tokens` accepted."
    )
    max_messages: int = Field(64, ge=1, description="Most messages in one request.")
    allow_qzoom_overrides: bool = Field(
        True,
        description="Accept a request's `qzoom: {gate_thresh, roi_thresh}` overrides. False: 400, so "
        "clients cannot force every request through the (dearer) zoom pass.",
    )


class RemoteImageConfig(StrictModel):
    allowlist: list[str] = Field(
        default_factory=list,
        description="URL prefixes (scheme://host[:port]/path/) that image_url may point to. Empty: only "
        "data: URIs are accepted. Host and port must match exactly; redirects are not followed.",
    )
    allow_http: bool = Field(
        False, description="Allow plain-http entries in the allowlist (tests, private nets)."
    )
    timeout_s: float = Field(5.0, gt=0, description="Total time allowed for one fetch.")

    @model_validator(mode="after")
    def _entries_parse(self) -> RemoteImageConfig:
        for entry in self.allowlist:
            parts = urlsplit(entry)
            schemes = ("https", "http") if self.allow_http else ("https",)
            if parts.scheme not in schemes:
                raise ValueError(f"allowlist entry {entry!r}: scheme must be one of {schemes}")
            if not parts.hostname or parts.username or parts.password or parts.query or parts.fragment:
                raise ValueError(f"allowlist entry {entry!r}: needs a host and no user, query or fragment")
        return self


class LiveConfig(StrictModel):
    """The deployments' `user_config`: applied by `reconfigure`, no replica restart."""

    gate_thresh: float | None = Field(None, ge=0.0, description="tau_gate; None: the engine config's.")
    roi_thresh: float | None = Field(None, ge=0.0, description="tau_roi; None: the engine config's.")
    min_pixels: int | None = Field(None, gt=0, description="Global-view lower pixel budget; None: engine's.")
    max_pixels: int | None = Field(None, gt=0, description="Global-view upper pixel budget; None: engine's.")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Default when a request sets no max_tokens; None: the engine config's."
    )
    max_batch_size: int = Field(8, ge=1, description="@serve.batch: most requests per forward pass.")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, description="@serve.batch: wait for a fuller batch.")

    @model_validator(mode="after")
    def _budgets_ordered(self) -> LiveConfig:
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) > max_pixels ({self.max_pixels})")
        return self


class DeploymentOptions(StrictModel):
    num_cpus: float = Field(0.5, ge=0.0, description="Logical CPUs per replica.")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per replica (1 for the model deployments on GPU).")
    max_ongoing_requests: int = Field(16, ge=1, description="Requests a replica works on at once.")
    max_queued_requests: int = Field(
        64, ge=1, description="Requests waiting for a replica, per caller; beyond it callers get 429/503."
    )
    backpressure_status: Literal[429, 503] = Field(429, description="HTTP status of a rejection when full.")
    retry_after_s: float = Field(1.0, ge=0.0, description="Retry-After sent with a rejection.")
    autoscaling: dict[str, Any] = Field(
        default_factory=lambda: {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
        description="Serve AutoscalingConfig fields (min_replicas, max_replicas, target_ongoing_requests, "
        "upscale_delay_s, downscale_delay_s, downscale_to_zero_delay_s, ...).",
    )

    @field_validator("autoscaling")
    @classmethod
    def _autoscaling_valid(cls, value: dict[str, Any]) -> dict[str, Any]:
        from ray.serve.config import AutoscalingConfig  # Serve's own model gives Serve's own messages

        AutoscalingConfig(**value)
        return value


def _ingress_defaults() -> DeploymentOptions:
    # The ingress is async and cheap (JSON, base64, an image header), so one replica holds many requests.
    return DeploymentOptions(
        num_cpus=0.25,
        max_ongoing_requests=64,
        max_queued_requests=128,
        backpressure_status=503,
        autoscaling={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
    )


def _zoom_defaults() -> DeploymentOptions:
    # Only gated requests reach the zoom pass, so it may sit at zero replicas while traffic is easy.
    return DeploymentOptions(
        autoscaling={
            "min_replicas": 0,
            "initial_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 4,
        }
    )


class ServeArgs(StrictModel):
    engine: EngineConfig = Field(
        default_factory=EngineConfig, description="Model, zoom and generation config."
    )
    model_name: str = Field(
        "qzoom", min_length=1, description="The id served by /v1/models; requests must use it."
    )
    reuse_prefix: bool = Field(
        True,
        description="Ship the coarse pass's layer 0..K-1 KV prefix to the zoom replica (saves compute, "
        "costs transfer). False: the zoom replica recomputes it (identical answer).",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    remote_images: RemoteImageConfig = Field(default_factory=RemoteImageConfig)
    live: LiveConfig = Field(
        default_factory=LiveConfig, description="Initial user_config of coarse and zoom."
    )
    ingress: DeploymentOptions = Field(default_factory=_ingress_defaults)
    coarse: DeploymentOptions = Field(default_factory=DeploymentOptions)
    zoom: DeploymentOptions = Field(default_factory=_zoom_defaults)

    def engine_for_serving(self) -> EngineConfig:
        """The engine config with the request limits folded in, so both layers enforce the tighter one."""
        eng = self.engine
        return eng.model_copy(
            update={
                "max_image_pixels": min(eng.max_image_pixels, self.limits.max_image_pixels),
                "max_question_chars": min(eng.max_question_chars, self.limits.max_question_chars),
            }
        )
