"""Zooming on a region the caller gives (a normalised box) instead of the twig's: no gate, no RoI map.

With ground-truth evidence boxes this is the RPN's upper bound (``evaluate.py --oracle-budgets``); stage 2's
``source: pseudo_labels`` uses it to crop at the stage-1 pseudo-RoI.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from qzoom_ray import geometry
from qzoom_ray.model.state import EngineRecord, EngineResult, PreparedRecord, PreparedRoi, ZoomRequest

if TYPE_CHECKING:
    from qzoom_ray.model.engine import QZoomEngine


def request_for_box(engine: QZoomEngine, prep: PreparedRecord, box_norm: Sequence[float]) -> ZoomRequest:
    """The RoI positions use the box's cells on the global grid, the crop its pixels (grown to min_roi_px)."""
    x0, y0, x1, y1 = (float(v) for v in box_norm)
    box_grid = geometry.norm_box_to_grid((x0, y0, x1, y1), prep.merged_grid)
    w, h = prep.image_wh
    box_px = geometry.grow_box_to_min_size((x0 * w, y0 * h, x1 * w, y1 * h), prep.image_wh, engine.config.zoom.min_roi_px)
    return ZoomRequest(prepared=prep, gate_score=None, box_grid=box_grid, box_px=box_px, roi_map=None, prefix=None)


def zoom_at(engine: QZoomEngine, records: Sequence[EngineRecord], boxes_norm: Sequence[Sequence[float]]) -> list[EngineResult]:
    """A bad record or box gets ``error`` set; order is kept; zoom passes run in batches of max_batch_size.

    A long list is answered ``generate_window`` records at a time, as ``engine.generate`` does: each prepared
    record holds its decoded page until answered (1000 benchmark pages at once peaked at 23 GiB).
    """
    if len(records) != len(boxes_norm):
        raise ValueError(f"{len(records)} records but {len(boxes_norm)} boxes")
    window = max(engine.config.generate_window, engine.config.max_batch_size)
    if len(records) > window:
        return [res for start in range(0, len(records), window)
                for res in zoom_at(engine, records[start : start + window], boxes_norm[start : start + window])]
    results: list[EngineResult | None] = [None] * len(records)
    items: list[tuple[int, ZoomRequest, PreparedRoi]] = []
    for i, (rec, box) in enumerate(zip(records, boxes_norm, strict=True)):
        prep = engine.prepare(rec)
        if isinstance(prep, EngineResult):
            results[i] = prep
            continue
        try:
            req = request_for_box(engine, prep, box)
            items.append((i, req, engine.prepare_roi(req)))
        except Exception as exc:  # noqa: BLE001 - one bad box must not sink the batch
            results[i] = EngineResult(id=rec.id, error=f"{type(exc).__name__}: {exc}")
    step = engine.config.max_batch_size
    for start in range(0, len(items), step):
        chunk = items[start : start + step]
        answers = engine.zoom([(req, roi) for _, req, roi in chunk], reuse_prefix=False)
        for (i, _, _), res in zip(chunk, answers, strict=True):
            results[i] = res
    return results  # type: ignore[return-value]
