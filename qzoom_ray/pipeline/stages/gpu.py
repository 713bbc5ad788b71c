"""GPU stages: coarse pass, zoom pass, and the colocated pass (coarse + crop + zoom in one actor).

Each actor builds one ``QZoomEngine`` and runs it on micro-batches of the rows that need it; rows
already answered or failed pass through untouched. A failing micro-batch is retried record by record
(the engine driver's ``run_isolated``), so one bad record cannot sink its neighbours.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from qzoom_ray.config import EngineConfig
from qzoom_ray.pipeline import codec
from qzoom_ray.pipeline import schema as S
from qzoom_ray.pipeline.stages import escalate
from qzoom_ray.pipeline.stages.common import (
    apply_updates,
    device_tag,
    finalize_table,
    pending,
    rows_of,
    set_torch_threads,
)

logger = logging.getLogger(__name__)

PREPARED_COLUMNS = (
    S.ID, S.QUESTION, S.ERROR, "route", S.INPUT_IDS, S.PIXELS, S.GRID, S.IMAGE_START, S.MIN_PIXELS,
    S.MAX_PIXELS, S.GATE_THRESH, S.ROI_THRESH, S.MAX_NEW_TOKENS, "image_width", "image_height", "prep_s",
)
ZOOM_COLUMNS = (*PREPARED_COLUMNS, S.NEEDS_ZOOM, S.BOX_GRID, "roi_box_px", "gate_score", "coarse_s",
                S.PREFIX_STATE, S.ROI_PIXELS, S.ROI_GRID, "crop_s")
#: Internal columns a finished row no longer needs (nulled to keep later blocks small).
_SPENT = {S.PIXELS: None, S.INPUT_IDS: None, S.PREFIX_STATE: None, S.ROI_PIXELS: None, S.IMAGE_BYTES: None}
#: The same, for a row that may still be answered again (escalation): its image bytes travel on.
_SPENT_BUT_BYTES = {k: v for k, v in _SPENT.items() if k != S.IMAGE_BYTES}


class _EngineStage:
    def __init__(self, engine_config: dict, torch_threads: int | None = None, finalize: dict | None = None):
        from qzoom_ray.model.engine import QZoomEngine

        self.engine = QZoomEngine(EngineConfig.model_validate(engine_config))
        set_torch_threads(torch_threads)  # after the engine, which applies the engine config's threads
        self.device = device_tag(self.engine)
        # The last stage shapes rows into the output schema itself: a separate task stage would not fuse
        # with this actor stage and would cost a CPU slot on small machines.
        self.finalize = finalize

    def process(self, table: pa.Table) -> pa.Table:
        raise NotImplementedError

    def __call__(self, table: pa.Table) -> pa.Table:
        out = self.process(table)
        return finalize_table(out, **self.finalize) if self.finalize else out

    def escalate_and_free(self, table: pa.Table, decoded: dict[int, Any] | None = None) -> pa.Table:
        """The last model stage: re-answer unsure rows (``EngineConfig.escalation``), then drop all image bytes."""
        table = escalate.escalate_table(self.engine, table, self.device, decoded)
        if S.IMAGE_BYTES in table.column_names:
            i = table.column_names.index(S.IMAGE_BYTES)
            table = table.set_column(i, S.IMAGE_BYTES, pa.nulls(table.num_rows, S.COLUMN_TYPES[S.IMAGE_BYTES]))
        return table

    def _run(self, fn, items: list, on_error) -> list:
        """``fn`` over micro-batches of ``max_batch_size``, isolating failures per record."""
        from qzoom_ray.model.driver import chunks, run_isolated

        out: list = []
        for chunk in chunks(items, self.engine.config.max_batch_size):
            out.extend(run_isolated(fn, chunk, on_error))
        return out


def _error_result(rid: str, exc: Exception):
    from qzoom_ray.model.engine import error_result

    return error_result(rid, f"internal error: {type(exc).__name__}: {exc}")


class CoarsePass(_EngineStage):
    """Coarse pass: direct and fallback records are finished here; gated ones get a box (and maybe KV)."""

    def __init__(
        self, engine_config: dict, transfer_kv: bool = False, torch_threads: int | None = None, finalize: dict | None = None
    ):
        super().__init__(engine_config, torch_threads, finalize)
        self.transfer_kv = transfer_kv

    def coarse_updates(self, rows: list[dict[str, Any]], keep_prefix: bool) -> dict[int, Any]:
        """Engine outputs (EngineResult or ZoomRequest) by row index, for the pending rows."""
        from qzoom_ray.model.state import PreparedRecord

        todo = [(i, codec.prepared_from_row(r)) for i, r in enumerate(rows) if pending(r)]
        # Similar lengths together: less padding per micro-batch.
        todo.sort(key=lambda item: len(item[1].input_ids))
        outs = self._run(
            lambda batch: self.engine.coarse(batch, keep_prefix=keep_prefix),
            [p for _, p in todo],
            lambda p, exc: _error_result(p.record.id if isinstance(p, PreparedRecord) else "?", exc),
        )
        return {i: out for (i, _), out in zip(todo, outs, strict=True)}

    def process(self, table: pa.Table) -> pa.Table:
        from qzoom_ray.model.state import ZoomRequest

        rows = rows_of(table, (*PREPARED_COLUMNS, *S.OVERRIDE_COLUMNS))
        outs = self.coarse_updates(rows, keep_prefix=self.transfer_kv)
        updates: list[dict[str, Any] | None] = [None] * len(rows)
        for i, out in outs.items():
            if isinstance(out, ZoomRequest):
                u = codec.request_to_row(out, self.transfer_kv)
                if self.transfer_kv:  # the global ViT features travel in the prefix state
                    u[S.PIXELS] = None
            else:
                unsure = escalate.retry_record(self.engine, rows[i], out.error, out.answer_logprob) is not None
                u = {**codec.result_to_row(out), **(_SPENT_BUT_BYTES if unsure else _SPENT)}
            updates[i] = {**u, "coarse_device": self.device}
        return apply_updates(table, updates)


class ZoomPass(_EngineStage):
    """Zoom pass for gated rows; every other row passes through untouched."""

    def __init__(
        self, engine_config: dict, transfer_kv: bool = False, torch_threads: int | None = None, finalize: dict | None = None
    ):
        super().__init__(engine_config, torch_threads, finalize)
        self.transfer_kv = transfer_kv

    def process(self, table: pa.Table) -> pa.Table:
        rows = rows_of(table, ZOOM_COLUMNS)
        todo = []
        for i, r in enumerate(rows):
            if not (r.get(S.NEEDS_ZOOM) and r.get(S.ERROR) is None and r.get(S.ROI_PIXELS) is not None):
                continue
            blob = r.get(S.PREFIX_STATE)
            prefix = codec.decode_prefix(blob, self.engine.device) if blob is not None else None
            req = codec.request_from_row(r, codec.prepared_from_row(r), prefix)
            todo.append((i, (req, codec.roi_from_row(r))))
        reuse = self.transfer_kv and all(item[0].prefix is not None for _, item in todo)
        outs = self._run(
            lambda batch: self.engine.zoom(batch, reuse_prefix=reuse),
            [item for _, item in todo],
            lambda item, exc: _error_result(item[0].prepared.record.id, exc),
        )
        updates: list[dict[str, Any] | None] = [None] * len(rows)
        for (i, _), res in zip(todo, outs, strict=True):
            updates[i] = {**codec.result_to_row(res), **_SPENT_BUT_BYTES, S.NEEDS_ZOOM: False,
                          "zoom_device": self.device}
        return self.escalate_and_free(apply_updates(table, updates))


class CoarseZoomPass(CoarsePass):
    """Colocated mode: coarse, crop and zoom in one actor; the prefix KV never leaves the device."""

    def __init__(self, engine_config: dict, torch_threads: int | None = None, finalize: dict | None = None):
        super().__init__(engine_config, transfer_kv=False, torch_threads=torch_threads, finalize=finalize)

    def process(self, table: pa.Table) -> pa.Table:
        from qzoom_ray.images import load_image
        from qzoom_ray.model.state import ZoomRequest

        rows = rows_of(table, (*PREPARED_COLUMNS, S.IMAGE_BYTES))
        outs = self.coarse_updates(rows, keep_prefix=True)
        updates: list[dict[str, Any] | None] = [None] * len(rows)
        items, decoded = [], {}
        cfg = self.engine.config
        for i, out in outs.items():
            if not isinstance(out, ZoomRequest):
                updates[i] = {**codec.result_to_row(out), **_SPENT_BUT_BYTES, "coarse_device": self.device}
                continue
            try:
                image = load_image(rows[i][S.IMAGE_BYTES], max_pixels=cfg.max_image_pixels,
                                   max_aspect_ratio=cfg.max_aspect_ratio)
                items.append((i, (out, self.engine.prepare_roi(out, image))))
                decoded[i] = image
            except Exception as exc:
                res = _error_result(rows[i][S.ID], exc)
                updates[i] = {**codec.result_to_row(res), **_SPENT, "coarse_device": self.device}
        results = self._run(
            lambda batch: self.engine.zoom(batch, reuse_prefix=True),
            [item for _, item in items],
            lambda item, exc: _error_result(item[0].prepared.record.id, exc),
        )
        for (i, (req, roi)), res in zip(items, results, strict=True):
            u = codec.result_to_row(res)
            u.update(coarse_s=req.coarse_s, crop_s=roi.prep_s, coarse_device=self.device, zoom_device=self.device)
            updates[i] = {**u, **_SPENT_BUT_BYTES}
        return self.escalate_and_free(apply_updates(table, updates), decoded)
