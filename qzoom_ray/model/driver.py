"""In-process driver: prepare, batch, route and isolate failures so that one record never sinks a batch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

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
    return [results[i] for i in range(len(records))]
