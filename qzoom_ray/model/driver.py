"""In-process driver: prepare, batch, route and isolate failures so that one record never sinks a batch."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from qzoom_ray.model.state import EngineRecord, EngineResult, PreparedRecord, ZoomRequest

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
        results = _escalate(engine, records, results, decoded, return_logits)
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
    engine: QZoomEngine, record: EngineRecord, error: str | None, answer_logprob: float | None
) -> EngineRecord | None:
    """The record to answer again (same record at the larger budget), or None where its answer stands.

    The one rule the in-process driver, the batch job's stages and the endpoint share.
    """
    step = escalation_step(engine, record)
    if step is None or not is_unsure(step[1], error, answer_logprob):
        return None
    return dataclasses.replace(record, max_pixels=step[0] * engine.adapter.token_px**2)


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


def _escalate(
    engine: QZoomEngine,
    records: Sequence[EngineRecord],
    results: list[EngineResult],
    decoded: dict[int, Any],
    return_logits: bool,
) -> list[EngineResult]:
    """Re-answer the unsure records at their larger budget; what the first answers cost stays on the record.

    ``decoded``: the first pass's decoded images by record index, so a retry does not decode them again.
    """
    todo, again = [], []
    for i, (rec, res) in enumerate(zip(records, results, strict=True)):
        retry = escalated_record(engine, rec, res.error, res.answer_logprob)
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
