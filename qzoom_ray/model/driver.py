"""In-process driver: prepare, batch, route and isolate failures so that one record never sinks a batch."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from qzoom_ray.model.state import (
    ROUTE_CROP_REREAD,
    ROUTE_ZOOM,
    EngineRecord,
    EngineResult,
    PreparedRecord,
    ZoomRequest,
)

if TYPE_CHECKING:
    from qzoom_ray.model.engine import QZoomEngine

logger = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_isolated(
    fn: Callable[[Sequence[T]], list[R]], batch: Sequence[T], on_error: Callable[[T, Exception], R]
) -> list[R]:
    """Run ``fn`` on the batch; if it raises, retry one item at a time and turn failures into errors."""
    try:
        return fn(batch)
    except Exception as exc:  # a bad record must not sink its neighbours
        if len(batch) == 1:
            logger.exception("record failed")
            return [on_error(batch[0], exc)]
        logger.warning("batch of %d failed (%s); retrying records one by one", len(batch), exc)
        return [r for item in batch for r in run_isolated(fn, [item], on_error)]


def _record_id(item) -> str:
    if isinstance(item, PreparedRecord):
        return item.record.id
    if isinstance(item, tuple):
        return item[0].prepared.record.id
    return item.prepared.record.id


def _internal_error(item, exc: Exception) -> EngineResult:
    from qzoom_ray.model.engine import error_result

    return error_result(_record_id(item), f"internal error: {type(exc).__name__}: {exc}")


def run_records(
    engine: QZoomEngine, records: Sequence[EngineRecord], return_logits: bool = False
) -> list[EngineResult]:
    window = max(engine.config.generate_window, engine.config.max_batch_size)
    if len(records) > window:
        # Every prepared record holds its decoded image until its window is answered: 600 large pages at once
        # took over 24 GiB. Batches still sort by length, within each window.
        return [res for part in chunks(records, window) for res in run_records(engine, part, return_logits)]
    results, decoded = _run_once(engine, records, return_logits)
    if engine.config.escalation is not None:
        results = escalate_results(engine, records, results, decoded, return_logits)
    return results


def escalation_step(engine: QZoomEngine, record: EngineRecord) -> tuple[int, float] | None:
    """(the budget Max-M to re-answer at, the log-probability below which to) for this record, or None."""
    esc = engine.config.escalation
    if esc is None:
        return None
    px = engine.adapter.token_px**2
    return esc.step(round((record.max_pixels or engine.config.zoom.max_pixels) / px))


def is_unsure(below_logprob: float, error: str | None, answer_logprob: float | None) -> bool:
    """An answer to re-answer: no error, and a log-probability below the step's threshold."""
    return error is None and answer_logprob is not None and answer_logprob < below_logprob


def escalated_record(
    engine: QZoomEngine, record: EngineRecord, error: str | None, answer_logprob: float | None,
    reread: bool = False,
) -> EngineRecord | None:
    """The record to answer again (same record at the larger budget), or None where its answer stands.

    ``reread``: the answer is a crop re-read's (``EscalationConfig.reread_crop_below``), judged by that
    threshold instead of the step's. The one rule the in-process driver, the batch job's stages and the
    endpoint share.
    """
    step = escalation_step(engine, record)
    if step is None:
        return None
    below = engine.config.escalation.reread_crop_below if reread else step[1]
    if below is None or not is_unsure(below, error, answer_logprob):
        return None
    return dataclasses.replace(record, max_pixels=step[0] * engine.adapter.token_px**2)


#: A per-record gate threshold above any probability: the crop re-read is answered directly.
NO_ZOOM = 2.0


def reread_max_pixels(engine: QZoomEngine, record: EngineRecord, box_px: Sequence[float]) -> int:
    """The crop re-read's upper budget: the record's, lowered so the crop is read at no more than
    1/``ZoomConfig.reread_min_downscale`` of its source resolution."""
    from qzoom_ray.box_cap import crop_max_pixels

    zoom = engine.config.zoom
    lo, hi = record.min_pixels or zoom.min_pixels, record.max_pixels or zoom.max_pixels
    return crop_max_pixels(tuple(box_px), min(lo, hi), hi, zoom.reread_min_downscale)


def crop_record(engine: QZoomEngine, record: EngineRecord, result: EngineResult, image: Any) -> EngineRecord | None:
    """The question about the RoI crop of a zoom-route answer alone, as its own image at the record's budget
    (:func:`reread_max_pixels`), never zoomed; None for an answer from another route. ``image``: the record's
    decoded source image (the RoI box is in its pixels)."""
    from qzoom_ray.images import crop_image

    if result.route != ROUTE_ZOOM or result.roi_box_px is None:
        return None
    return dataclasses.replace(record, image=crop_image(image, result.roi_box_px), gate_thresh=NO_ZOOM,
                               max_pixels=reread_max_pixels(engine, record, result.roi_box_px))


def wants_reread(engine: QZoomEngine, record: EngineRecord, result: EngineResult) -> bool:
    """Whether this answer is re-read on its crop first: the config asks for re-reads, the answer came from the
    zoom route, and it is unsure by its step's threshold."""
    esc = engine.config.escalation
    if esc is None or esc.reread_crop_below is None or result.route != ROUTE_ZOOM or result.roi_box_px is None:
        return False
    step = escalation_step(engine, record)
    return step is not None and is_unsure(step[1], result.error, result.answer_logprob)


def merge_reread(first: EngineResult, reread: EngineResult) -> EngineResult:
    """The first result with the crop re-read's answer; its box and gate stay, the re-read's visual tokens and
    timings are added. A failed re-read keeps the first answer."""
    if reread.error is not None:
        return first
    return dataclasses.replace(
        first,
        answer=reread.answer,
        route=ROUTE_CROP_REREAD,
        output_tokens=reread.output_tokens,
        token_ids=reread.token_ids,
        token_logprobs=reread.token_logprobs,
        first_logits=reread.first_logits,
        escalated=True,
        escalated_visual_tokens=first.escalated_visual_tokens + reread.visual_tokens,
        timings=summed_timings(first.timings, reread.timings),
    )


def summed_timings(*timings: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for t in timings:
        for key, value in t.items():
            if value is not None:
                out[key] = out.get(key, 0.0) + value
    return out


def merge_escalated(first: EngineResult, second: EngineResult) -> EngineResult:
    """The retry's answer, carrying what the first answers cost; a failed retry keeps the first answer."""
    if second.error is not None:
        return first
    return dataclasses.replace(
        second,
        escalated=True,
        escalated_visual_tokens=first.visual_tokens + second.escalated_visual_tokens,
        timings=summed_timings(first.timings, second.timings),
    )


def escalate_results(
    engine: QZoomEngine,
    records: Sequence[EngineRecord],
    results: list[EngineResult],
    decoded: dict[int, Any],
    return_logits: bool = False,
) -> list[EngineResult]:
    """Re-read unsure zoomed answers on their crop, then re-answer the still unsure records at their larger
    budget; what the earlier answers cost stays on the record. The in-process driver and the batch job's last
    model stage both answer through this.

    ``decoded``: decoded images by record index, so a retry does not decode them again (the others are decoded
    from ``record.image`` when needed).
    """
    results = _reread_crops(engine, records, results, decoded, return_logits)
    todo, again = [], []
    for i, (rec, res) in enumerate(zip(records, results, strict=True)):
        retry = escalated_record(engine, rec, res.error, res.answer_logprob, reread=res.route == ROUTE_CROP_REREAD)
        if retry is not None:
            todo.append(i)
            again.append(dataclasses.replace(retry, image=decoded.get(i, rec.image)))
    if not todo:
        return results
    # run_records, not _run_once: a chain (128 -> 256 -> 576) escalates again where it is configured.
    second = run_records(engine, again, return_logits)
    out = list(results)
    for i, res in zip(todo, second, strict=True):
        out[i] = merge_escalated(results[i], res)
    return out


def _reread_crops(
    engine: QZoomEngine,
    records: Sequence[EngineRecord],
    results: list[EngineResult],
    decoded: dict[int, Any],
    return_logits: bool,
) -> list[EngineResult]:
    """Unsure zoomed answers asked again on their RoI crop alone (``EscalationConfig.reread_crop_below``)."""
    from qzoom_ray.images import load_image

    cfg = engine.config
    todo, crops = [], []
    for i, (rec, res) in enumerate(zip(records, results, strict=True)):
        if not wants_reread(engine, rec, res):
            continue
        try:
            image = decoded.get(i)
            if image is None:
                image = load_image(rec.image, max_pixels=cfg.max_image_pixels, max_aspect_ratio=cfg.max_aspect_ratio)
            crop = crop_record(engine, rec, res, image)
        except Exception:  # a box that cannot be cut keeps the first answer, and may still escalate
            logger.exception("crop re-read of %s could not be prepared", rec.id)
            continue
        if crop is not None:
            todo.append(i)
            crops.append(crop)
    if not todo:
        return results
    # _run_once: the re-read is never zoomed, and whether it escalates further is decided by the caller.
    second, _ = _run_once(engine, crops, return_logits)
    out = list(results)
    for i, res in zip(todo, second, strict=True):
        out[i] = merge_reread(results[i], res)
    return out


def _run_once(
    engine: QZoomEngine, records: Sequence[EngineRecord], return_logits: bool = False
) -> tuple[list[EngineResult], dict[int, Any]]:
    """Results in input order, and the decoded image of every record that got past ``prepare``."""
    results: dict[int, EngineResult] = {}
    prepared: list[tuple[int, PreparedRecord]] = []
    for i, rec in enumerate(records):
        out = engine.prepare(rec)
        if isinstance(out, EngineResult):
            results[i] = out
        else:
            prepared.append((i, out))
    # Similar lengths together: less padding per batch. Results go back to input order below.
    prepared.sort(key=lambda item: len(item[1].input_ids))
    index_of = {id(p): i for i, p in prepared}
    size = engine.config.max_batch_size
    pending: list[tuple[int, ZoomRequest]] = []

    def run_zoom(batch: list[tuple[int, ZoomRequest]]) -> None:
        items = []
        for i, req in batch:
            try:
                items.append((i, (req, engine.prepare_roi(req))))
            except Exception as exc:
                results[i] = _internal_error(req, exc)
        if not items:
            return
        outs = run_isolated(
            lambda b: engine.zoom([it for _, it in b], return_logits=return_logits),
            items,
            lambda item, exc: _internal_error(item[1], exc),
        )
        for (i, _), out in zip(items, outs, strict=True):
            results[i] = out

    for batch in chunks([p for _, p in prepared], size):
        outs = run_isolated(
            lambda b: engine.coarse(b, keep_prefix=True, return_logits=return_logits), batch, _internal_error
        )
        for prep, out in zip(batch, outs, strict=True):
            if isinstance(out, ZoomRequest):
                pending.append((index_of[id(prep)], out))
            else:
                results[index_of[id(prep)]] = out
        # Zoom as soon as a full batch is waiting: at most ~2 batches of prefix KV are alive at once.
        while len(pending) >= size:
            run_zoom(pending[:size])
            pending = pending[size:]
    if pending:
        run_zoom(pending)
    decoded = {i: p.image for i, p in prepared if p.image is not None}
    return [results[i] for i in range(len(records))], decoded
