"""Escalation in the batch job: unsure answers are answered again at a larger budget, in the last model stage.

The rule is the engine's own (``model.driver``). The retry runs the whole engine in-process on the actor
that holds the last model stage (prepare, coarse, crop and zoom at the larger budget), so the pipeline
stays one linear pass: no filter + union (which would plan the upstream stages twice) and no second set
of pools. Only rows that may still escalate carry their image bytes that far; the rest drop them as before.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pyarrow as pa

from qzoom_ray.pipeline import codec
from qzoom_ray.pipeline import schema as S
from qzoom_ray.pipeline.stages.common import apply_updates, rows_of

logger = logging.getLogger(__name__)

#: Per-stage time columns; an escalated row's are the sums over its answers (the retry's crop time is
#: in its ``prep_s``, as in the in-process engine's timings).
TIME_COLUMNS = ("prep_s", "coarse_s", "crop_s", "zoom_s", "decode_s")
_COLUMNS = (S.ID, S.QUESTION, S.IMAGE_BYTES, S.ERROR, "route", "answer_logprob", "coarse_visual_tokens",
            "roi_visual_tokens", "escalated_visual_tokens", *TIME_COLUMNS, *S.OVERRIDE_COLUMNS)


def enabled(engine: Any) -> bool:
    return engine.config.escalation is not None


def _record(row: dict[str, Any]):
    from qzoom_ray.model.state import EngineRecord

    overrides = {k: row.get(k) for k in S.OVERRIDE_COLUMNS if row.get(k) is not None}
    return EngineRecord(id=row[S.ID], image=row.get(S.IMAGE_BYTES), question=row.get(S.QUESTION) or "", **overrides)


def retry_record(engine: Any, row: dict[str, Any], error: str | None, answer_logprob: float | None):
    """The record to answer again for a finished row, or None where its answer stands."""
    from qzoom_ray.model import driver

    if not enabled(engine):
        return None
    return driver.escalated_record(engine, _record(row), error, answer_logprob)


def escalate_table(engine: Any, table: pa.Table, device: str, decoded: dict[int, Any] | None = None) -> pa.Table:
    """Answer the unsure finished rows again at their larger budget; their columns say what both cost.

    A row whose retry fails keeps its first answer. Rows without image bytes (dropped upstream because
    they could not escalate) are left alone. ``decoded``: images this actor already decoded, by row
    index, so their retries do not decode the bytes again.
    """
    if not enabled(engine):
        return table
    from qzoom_ray.model import driver

    rows = rows_of(table, _COLUMNS)
    todo, records = [], []
    for i, row in enumerate(rows):
        if row.get(S.IMAGE_BYTES) is None or row.get("route") in (None, "error"):
            continue
        rec = retry_record(engine, row, row.get(S.ERROR), row.get("answer_logprob"))
        if rec is not None:
            todo.append(i)
            records.append(rec if decoded is None or i not in decoded else dataclasses.replace(rec, image=decoded[i]))
    if not todo:
        return table
    try:
        results = driver.run_records(engine, records)  # follows chains (128 -> 256 -> 576)
    except Exception:  # the first answers stand rather than the block failing
        logger.exception("escalation of %d rows failed; keeping their first answers", len(records))
        return table
    updates: list[dict[str, Any] | None] = [None] * len(rows)
    for i, res in zip(todo, results, strict=True):
        if res.error is not None:
            logger.warning("escalated retry of %s failed (%s); keeping the first answer", res.id, res.error)
            continue
        row = rows[i]
        first_tokens = sum(row.get(c) or 0 for c in ("coarse_visual_tokens", "roi_visual_tokens",
                                                      "escalated_visual_tokens"))
        u = codec.result_to_row(res)
        for col in TIME_COLUMNS:
            u[col] = (row.get(col) or 0.0) + (res.timings.get(col) or 0.0)
        u.update(escalated=True, escalated_visual_tokens=first_tokens + res.escalated_visual_tokens,
                 coarse_device=device, zoom_device=device if res.zoomed else None)
        updates[i] = u
    return apply_updates(table, updates)
