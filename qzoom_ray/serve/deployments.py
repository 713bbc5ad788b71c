"""The three deployments: `QZoomIngress` (HTTP) -> `CoarseServer` -> (gated only) `ZoomServer`.

The model deployments are thin adapters: `@serve.batch` gathers concurrent requests into one engine
call, which runs in a worker thread so the replica's event loop keeps answering health checks and
reporting the queue lengths autoscaling reads. Thresholds and budgets arrive through `reconfigure`.
"""

# No `from __future__ import annotations`: Serve rewrites the route signatures of a class-based
# FastAPI ingress and then cannot resolve string annotations (the body became a query parameter).
import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from qzoom_ray.config import EngineConfig
from qzoom_ray.model.driver import reread_max_pixels
from qzoom_ray.serve import handoff
from qzoom_ray.serve.api import (
    ApiError,
    ChatCompletionRequest,
    check_unsupported,
    completion_from_result,
    error_body,
    error_response,
    question_and_image,
    requested_max_tokens,
)
from qzoom_ray.serve.config import LiveConfig, ServeArgs
from qzoom_ray.serve.guard import GuardPolicy, RequestGuard, load_tokens
from qzoom_ray.serve.handoff import CoarseJob, Outcome
from qzoom_ray.serve.media import UrlAllowlist, load_image_bytes

logger = logging.getLogger(__name__)


def _isolated(
    fn: Callable[[Sequence], list], items: Sequence, on_error: Callable[[Any, Exception], Any]
) -> list:
    """Run a batch; if it raises, retry item by item so one bad request never fails its neighbours."""
    from qzoom_ray.model.driver import run_isolated

    return run_isolated(fn, items, on_error)


def _failed(record_id: str, exc: Exception) -> Outcome:
    from qzoom_ray.model.engine import error_result

    logger.error("request %s failed: %s: %s", record_id, type(exc).__name__, exc)
    return Outcome(handoff.FAILED, result=error_result(record_id, f"{type(exc).__name__}: {exc}"))


class _ModelServer:
    """Shared by both model deployments: the engine, the live config and the batch settings."""

    def __init__(self, engine: dict[str, Any], reuse_prefix: bool):
        from qzoom_ray.model.engine import QZoomEngine  # torch import stays out of the ingress' path

        self.engine = QZoomEngine(EngineConfig.model_validate(engine))
        self.reuse_prefix = reuse_prefix
        self.live = LiveConfig()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.live = LiveConfig.model_validate(user_config)
        self.run.set_max_batch_size(self.live.max_batch_size)
        self.run.set_batch_wait_timeout_s(self.live.batch_wait_timeout_s)
        logger.info("%s reconfigured: %s", type(self).__name__, self.live.model_dump())

    def check_health(self) -> None:
        # The engine has no background state that can rot; a replica that answers is healthy.
        return None


@serve.deployment(name="CoarseServer")
class CoarseServer(_ModelServer):
    """Prepare + coarse pass: finishes direct answers, returns shippable zoom requests for the rest."""

    async def __call__(self, job: CoarseJob) -> Outcome:
        return await self.run(job)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def run(self, jobs: list[CoarseJob]) -> list[Outcome]:
        return await asyncio.to_thread(self._run_sync, jobs)

    def _run_sync(self, jobs: list[CoarseJob]) -> list[Outcome]:
        from qzoom_ray.model.state import EngineResult, ZoomRequest

        live = self.live  # one snapshot per batch, so a concurrent reconfigure cannot split a batch
        outcomes: list[Outcome | None] = [None] * len(jobs)
        preps, where, escalate_to = [], [], []
        for i, job in enumerate(jobs):
            try:
                record = handoff.engine_record(job, live)
                out = self.engine.prepare(record)
            except Exception as exc:
                outcomes[i] = _failed(job.id, exc)
                continue
            if isinstance(out, EngineResult):
                outcomes[i] = Outcome(handoff.REJECTED, result=out)
            else:
                preps.append(out)
                where.append(i)
                escalate_to.append(handoff.escalation_step(self.engine, record) or (None, None, None))
        if preps:
            results = _isolated(
                lambda b: self.engine.coarse(b, keep_prefix=self.reuse_prefix),
                preps,
                lambda p, exc: _failed(p.record.id, exc),
            )
            for i, prep, res, esc in zip(where, preps, results, escalate_to, strict=True):
                if isinstance(res, Outcome):
                    outcomes[i] = res
                elif isinstance(res, ZoomRequest):
                    outcomes[i] = Outcome(
                        handoff.ZOOM, zoom=handoff.shippable(res), max_new_tokens=prep.max_new_tokens,
                        escalate_max_pixels=esc[0], escalate_below=esc[1], reread_below=esc[2],
                        reread_max_pixels=None if esc[2] is None
                        else reread_max_pixels(self.engine, prep.record, res.box_px),
                    )
                else:
                    outcomes[i] = Outcome(
                        handoff.DONE,
                        result=handoff.compact_result(res),
                        prompt_tokens=handoff.prompt_tokens_of(prep),
                        max_new_tokens=prep.max_new_tokens,
                        escalate_max_pixels=esc[0],
                        escalate_below=esc[1],
                        reread_below=esc[2],
                    )
        return outcomes  # type: ignore[return-value]


@serve.deployment(name="ZoomServer")
class ZoomServer(_ModelServer):
    """RoI crop + spliced zoom pass for gated requests only."""

    async def __call__(self, request: Any) -> Outcome:
        return await self.run(request)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def run(self, requests: list[Any]) -> list[Outcome]:
        return await asyncio.to_thread(self._run_sync, requests)

    def _run_sync(self, requests: list[Any]) -> list[Outcome]:
        from qzoom_ray.images import load_image

        cfg = self.engine.config
        outcomes: list[Outcome | None] = [None] * len(requests)
        items, where = [], []
        for i, req in enumerate(requests):
            try:
                image = load_image(
                    req.prepared.record.image,
                    max_pixels=cfg.max_image_pixels,
                    max_aspect_ratio=cfg.max_aspect_ratio,
                )
                req.prefix = handoff.prefix_to(req.prefix, self.engine.device)
                # Arrays arrive read-only (zero-copy from the object store); torch warns on those.
                req.prepared.input_ids = req.prepared.input_ids.copy()
                items.append((req, self.engine.prepare_roi(req, image=image)))
                where.append(i)
            except Exception as exc:
                outcomes[i] = _failed(req.prepared.record.id, exc)
        if items:
            results = _isolated(
                lambda b: self.engine.zoom(b, reuse_prefix=self.reuse_prefix),
                items,
                lambda item, exc: _failed(item[0].prepared.record.id, exc),
            )
            for i, (req, roi), res in zip(where, items, results, strict=True):
                outcomes[i] = (
                    res
                    if isinstance(res, Outcome)
                    else Outcome(
                        handoff.DONE,
                        result=handoff.compact_result(res),
                        prompt_tokens=handoff.prompt_tokens_of(req, roi.num_tokens),
                        max_new_tokens=req.prepared.max_new_tokens,
                    )
                )
        return outcomes  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ ingress
api = FastAPI(title="qzoom-ray", docs_url=None, redoc_url=None, openapi_url=None)
api.add_middleware(RequestGuard)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI answers 422 with its own shape; OpenAI clients expect 400 and {"error": {...}}.
    first = exc.errors()[0] if exc.errors() else {}
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    msg = f"invalid request: {loc + ': ' if loc else ''}{first.get('msg', 'malformed body')}"
    return JSONResponse(
        error_body(msg, "invalid_request_error", "invalid_request", loc or None), status_code=400
    )


@api.exception_handler(HTTPException)
async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
    kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    return JSONResponse(
        error_body(str(exc.detail), kind, code),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


@api.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error")
    return JSONResponse(
        error_body("internal server error", "server_error", "internal_error"), status_code=500
    )


@serve.deployment(name="QZoomIngress")
@serve.ingress(api)
class QZoomIngress:
    def __init__(self, coarse: DeploymentHandle, zoom: DeploymentHandle, args: dict[str, Any]):
        self.args = ServeArgs.model_validate(args)
        self.coarse, self.zoom = coarse, zoom
        self.allowlist = UrlAllowlist(self.args.remote_images.allowlist)
        api.state.guard = GuardPolicy(load_tokens(self.args.auth), self.args.limits.max_body_bytes)
        self.created = int(time.time())

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        card = {
            "id": self.args.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "qzoom-ray",
        }
        return {"object": "list", "data": [card]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> JSONResponse:
        args = self.args
        check_unsupported(body, args.model_name)
        question, url = question_and_image(body, args.limits)
        max_tokens = requested_max_tokens(body, args.limits)
        image = await load_image_bytes(url, args.limits, args.remote_images, self.allowlist)
        opts = body.qzoom
        if opts is not None and not args.limits.allow_qzoom_overrides:
            raise ApiError(400, "per-request qzoom overrides are disabled on this server", param="qzoom")
        job = CoarseJob(
            id=uuid.uuid4().hex,
            image=image,
            question=question,
            max_new_tokens=max_tokens,
            gate_thresh=opts.gate_thresh if opts else None,
            roi_thresh=opts.roi_thresh if opts else None,
        )
        outcome = await handoff.answer_with_escalation(job, self._answer_once)
        if outcome.kind == handoff.REJECTED:
            # The engine's own checks failed (decode, aspect ratio, size for the processor, question).
            raise ApiError(
                400, outcome.result.error or "request rejected", param="messages", code="invalid_input"
            )
        if outcome.kind != handoff.DONE:
            raise ApiError(500, "internal error while answering", type="server_error", code="internal_error")
        completion = completion_from_result(
            outcome.result, args.model_name, outcome.prompt_tokens, outcome.max_new_tokens
        )
        return JSONResponse(completion.model_dump(mode="json"))

    async def _answer_once(self, job: CoarseJob) -> Outcome:
        """The coarse replica, then the zoom replica for a gated request."""
        args = self.args
        outcome = await self._call(self.coarse, job, args.coarse.retry_after_s)
        if outcome.kind == handoff.ZOOM:
            budget = outcome.max_new_tokens
            escalate = (outcome.escalate_max_pixels, outcome.escalate_below, outcome.reread_below,
                        outcome.reread_max_pixels)
            outcome = await self._call(self.zoom, outcome.zoom, args.zoom.retry_after_s)
            outcome.max_new_tokens = outcome.max_new_tokens or budget
            (outcome.escalate_max_pixels, outcome.escalate_below, outcome.reread_below,
             outcome.reread_max_pixels) = escalate
        return outcome

    @staticmethod
    async def _call(handle: DeploymentHandle, item: Any, retry_after_s: float) -> Outcome:
        retry = {"Retry-After": str(max(1, round(retry_after_s)))}
        try:
            return await handle.remote(item)
        except BackPressureError as exc:
            if exc.retry_after_s is not None:
                retry = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
            raise ApiError(
                exc.status_code if exc.status_code in (429, 503) else 429,
                "the server is at capacity; retry after the Retry-After delay",
                type="rate_limit_error",
                code="overloaded",
                headers=retry,
            ) from None
        except DeploymentUnavailableError:
            raise ApiError(
                503,
                "the model deployment is unavailable; retry later",
                type="server_error",
                code="unavailable",
                headers=retry,
            ) from None
