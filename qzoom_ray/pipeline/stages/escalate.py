"""Escalation in the batch job: unsure answers are answered again (a crop re-read where configured, then a larger
budget), in the last model stage.

The rule is the engine's own (``model.driver``). The retry runs the whole engine in-process on the actor
that holds the last model stage (prepare, coarse, crop and zoom at the larger budget), so the pipeline
stays one linear pass: no filter + union (which would plan the upstream stages twice) and no second set
of pools. Only rows that may still escalate carry their image bytes that far; the rest drop them as before.
"""

from __future__ import annotations

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
_COLUMNS = (S.ID, S.QUESTION, S.IMAGE_BYTES, S.ERROR, "answer", "route", "zoomed", "gate_score", "roi_box_px",
            "roi_box_norm", "image_width", "image_height", "answer_logprob", "output_tokens", "escalated",
            "coarse_visual_tokens", "roi_visual_tokens", "escalated_visual_tokens", *TIME_COLUMNS,
            *S.OVERRIDE_COLUMNS)


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


def first_result(row: dict[str, Any]):
    """A finished row as the engine's result, as far as escalation reads and extends it."""
    from qzoom_ray.model.state import EngineResult

    lp = row.get("answer_logprob")
    box = row.get("roi_box_px")
    norm = row.get("roi_box_norm")
    return EngineResult(
        id=row[S.ID], answer=row.get("answer"), route=row.get("route") or "error", zoomed=bool(row.get("zoomed")),
        gate_score=row.get("gate_score"), roi_box_px=tuple(box) if box else None,
        roi_box_norm=tuple(norm) if norm else None, image_width=row.get("image_width"),
        image_height=row.get("image_height"), coarse_visual_tokens=row.get("coarse_visual_tokens") or 0,
        roi_visual_tokens=row.get("roi_visual_tokens") or 0, output_tokens=row.get("output_tokens") or 0,
        timings={c: row[c] for c in TIME_COLUMNS if row.get(c) is not None}, error=row.get(S.ERROR),
        # Escalation reads only the answer's log-probability, which the row keeps as the tokens' sum.
        token_logprobs=[] if lp is None else [lp], escalated=bool(row.get("escalated")),
        escalated_visual_tokens=row.get("escalated_visual_tokens") or 0,
    )


def escalate_table(engine: Any, table: pa.Table, device: str, decoded: dict[int, Any] | None = None) -> pa.Table:
    """Answer the unsure finished rows again (``driver.escalate_results``: a crop re-read of unsure zoomed
    answers where configured, then the larger budget); their columns say what every answer cost.

    A row whose retry fails keeps its first answer. Rows without image bytes (dropped upstream because
    they could not escalate) are left alone. ``decoded``: images this actor already decoded, by row
    index, so their retries do not decode the bytes again.
    """
    if not enabled(engine):
        return table
    from qzoom_ray.model import driver

    rows = rows_of(table, _COLUMNS)
    where, records, firsts, images = [], [], [], {}
    for i, row in enumerate(rows):
        if row.get(S.IMAGE_BYTES) is None or row.get("route") in (None, "error"):
            continue
        if decoded is not None and i in decoded:
            images[len(records)] = decoded[i]
        where.append(i)
        records.append(_record(row))
        firsts.append(first_result(row))
    if not records:
        return table
    try:
        results = driver.escalate_results(engine, records, firsts, images)
    except Exception:  # the first answers stand rather than the block failing
        logger.exception("escalation of %d rows failed; keeping their first answers", len(records))
        return table
    updates: list[dict[str, Any] | None] = [None] * len(rows)
    for i, first, res in zip(where, firsts, results, strict=True):
        if res is first:
            continue
        u = codec.result_to_row(res)
        for col in TIME_COLUMNS:  # the engine's timings of every answer the row got, the row's own included
            u[col] = res.timings.get(col)
        u.update(coarse_device=device, zoom_device=device if res.zoomed else None)
        updates[i] = u
    return apply_updates(table, updates)
