"""What crosses replica boundaries: the coarse job, its outcome, and a zoom request made fit to ship.

Plain dataclasses, no Ray: the deployments are thin adapters around these functions and the engine.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import torch

from qzoom_ray.model.state import EngineRecord, EngineResult, PrefixState, ZoomRequest
from qzoom_ray.serve.config import LiveConfig

logger = logging.getLogger(__name__)

#: Outcome kinds. "rejected" is the client's fault (bad image, bad size), "failed" is ours.
DONE, ZOOM, REJECTED, FAILED = "done", "zoom", "rejected", "failed"


@dataclass
class CoarseJob:
    """One validated request, as the ingress hands it to the coarse deployment."""

    id: str
    image: bytes  # always encoded bytes: a str would be read by the engine as a local path
    question: str
    max_new_tokens: int | None = None
    gate_thresh: float | None = None
    roi_thresh: float | None = None
    #: Set on an escalated retry (``EngineConfig.escalation``): the larger global-view budget to answer at.
    max_pixels: int | None = None


@dataclass
class Outcome:
    kind: str
    result: EngineResult | None = None
    zoom: ZoomRequest | None = None
    prompt_tokens: int = 0
    max_new_tokens: int = 0
    #: Set by the coarse replica when escalation is configured for the request's budget: the budget
    #: (max_pixels) to answer again at if the final answer turns out unsure.
    escalate_max_pixels: int | None = None
    escalate_below: float | None = None
    #: Set with the two above when unsure zoomed answers are first re-read on their crop
    #: (``EscalationConfig.reread_crop_below``): the re-read stands unless its log-probability is below this.
    reread_below: float | None = None
    #: Set with ``reread_below`` on a zoomed request: the crop re-read's budget (``driver.reread_max_pixels``).
    reread_max_pixels: int | None = None


def engine_record(job: CoarseJob, live: LiveConfig) -> EngineRecord:
    """Request overrides win over the live config, which wins over the engine config (None = defer)."""
    if not isinstance(job.image, bytes):
        raise TypeError("CoarseJob.image must be bytes")
    return EngineRecord(
        id=job.id,
        image=job.image,
        question=job.question,
        min_pixels=live.min_pixels,
        max_pixels=job.max_pixels or live.max_pixels,
        gate_thresh=job.gate_thresh if job.gate_thresh is not None else live.gate_thresh,
        roi_thresh=job.roi_thresh if job.roi_thresh is not None else live.roi_thresh,
        max_new_tokens=job.max_new_tokens or live.max_new_tokens,
    )


def escalation_step(engine, record: EngineRecord) -> tuple[int, float, float | None] | None:
    """(max_pixels to re-answer at, the log-probability below which to, the crop re-read's threshold or None)
    for this request, or None."""
    from qzoom_ray.model.driver import escalation_step as step_of

    step = step_of(engine, record)
    if step is None:
        return None
    return step[0] * engine.adapter.token_px**2, step[1], engine.config.escalation.reread_crop_below


def crop_job(job: CoarseJob, result: EngineResult, max_pixels: int | None = None) -> CoarseJob:
    """The request again, about the RoI crop of its zoomed answer alone, never zoomed (``driver.crop_record``);
    ``max_pixels``: the re-read's budget (None: the request's)."""
    import io

    from qzoom_ray.images import crop_image, load_image
    from qzoom_ray.model.driver import NO_ZOOM

    if result.roi_box_px is None:
        raise ValueError("a crop re-read needs the answer's RoI box")
    crop = crop_image(load_image(job.image), result.roi_box_px)
    buf = io.BytesIO()
    crop.save(buf, format="PNG")
    return dataclasses.replace(job, image=buf.getvalue(), gate_thresh=NO_ZOOM, max_pixels=max_pixels or job.max_pixels)


async def _reread(job: CoarseJob, result: EngineResult, max_pixels: int | None,
                  answer_once: Callable[[CoarseJob], Awaitable[Outcome]]) -> Outcome | None:
    """The crop re-read's outcome, or None where it could not be had (the answer we have stands)."""
    import asyncio

    try:
        again = await answer_once(await asyncio.to_thread(crop_job, job, result, max_pixels))
    except Exception as exc:  # e.g. at capacity, or a box the image cannot give: keep the answer we have
        logger.warning("crop re-read of %s failed (%s: %s); keeping the first answer", job.id, type(exc).__name__, exc)
        return None
    return again if again.kind == DONE and again.result is not None and again.result.error is None else None


async def answer_with_escalation(job: CoarseJob, answer_once: Callable[[CoarseJob], Awaitable[Outcome]]) -> Outcome:
    """Answer ``job``; while the answer is unsure and a larger budget is configured, answer it again there (an
    unsure zoomed answer is first re-read on its crop where ``reread_below`` is set, as ``driver.escalate_results``).

    ``answer_once`` runs the coarse (and, when gated, zoom) replicas for one job; the coarse replica says
    on the outcome where and below what log-probability this request escalates (``EngineConfig.escalation``).
    The retry keeps the first answer if it fails, and the returned result carries what the earlier
    answers cost: visual tokens, timings and prompt tokens.
    """
    from qzoom_ray.model.driver import is_unsure, merge_escalated, merge_reread
    from qzoom_ray.model.state import ROUTE_CROP_REREAD, ROUTE_ZOOM

    outcome, current = await answer_once(job), job
    while (
        outcome.kind == DONE
        and outcome.result is not None
        and outcome.escalate_max_pixels is not None
        and outcome.escalate_below is not None
        and is_unsure(outcome.escalate_below, outcome.result.error, outcome.result.answer_logprob)
    ):
        if outcome.reread_below is not None and outcome.result.route == ROUTE_ZOOM:
            reread = await _reread(current, outcome.result, outcome.reread_max_pixels, answer_once)
            if reread is not None:
                outcome = dataclasses.replace(outcome, result=merge_reread(outcome.result, reread.result),
                                              prompt_tokens=outcome.prompt_tokens + reread.prompt_tokens)
            sure = outcome.result.route == ROUTE_CROP_REREAD and not is_unsure(
                outcome.reread_below, outcome.result.error, outcome.result.answer_logprob)
            if sure:
                break
        current = dataclasses.replace(job, max_pixels=outcome.escalate_max_pixels)
        try:
            again = await answer_once(current)
        except Exception as exc:  # e.g. the zoom deployment at capacity: the answer we have is still an answer
            logger.warning("escalated retry of %s failed (%s: %s); keeping the first answer", job.id,
                           type(exc).__name__, exc)
            break
        if again.kind != DONE or again.result is None:
            break  # keep the answer we have rather than lose the request to its retry
        again.result = merge_escalated(outcome.result, again.result)
        again.prompt_tokens += outcome.prompt_tokens
        outcome = again
    return outcome


def prefix_to(prefix: PrefixState | None, device: torch.device | str) -> PrefixState | None:
    return None if prefix is None else prefix.to(device)


def shippable(request: ZoomRequest) -> ZoomRequest:
    """A copy of ``request`` fit to cross processes: compact CPU prefix, no decoded image.

    The zoom replica re-decodes the original bytes (still in ``prepared.record.image``), which are
    far smaller than the decoded RGB original. With a prefix, the global view's patches are not
    needed again (its ViT features travel in the prefix), so they are dropped too.
    """
    p = request.prepared
    # The engine's prefix tensors are compact copies; on CPU they pickle as they are, and a CUDA
    # tensor could not be unpickled on the CPU-only ingress.
    prefix = prefix_to(request.prefix, "cpu")
    pixel_values = p.pixel_values if prefix is None else np.zeros((0, p.pixel_values.shape[1]), np.float32)
    prepared = dataclasses.replace(p, image=None, pixel_values=pixel_values)
    return dataclasses.replace(request, prepared=prepared, prefix=prefix)


def prompt_tokens_of(request_or_prepared, roi_tokens: int = 0) -> int:
    """Prompt length: coarse sequence, plus the RoI tokens and their two vision markers when zoomed."""
    prepared = getattr(request_or_prepared, "prepared", request_or_prepared)
    return len(prepared.input_ids) + (roi_tokens + 2 if roi_tokens else 0)


def compact_result(result: EngineResult) -> EngineResult:
    """Drop what the ingress never shows (token ids, logits) before the result crosses processes."""
    return dataclasses.replace(result, token_ids=[], first_logits=None)
