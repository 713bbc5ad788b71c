"""CPU stages: input normalisation (+ resume filter), image preparation, RoI crop preparation.

Each stage is a pure function of its input rows, so a batch retried after an actor crash gives the
same rows again. No exception leaves a stage because of one record: it becomes that row's ``error``.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from qzoom_ray import geometry
from qzoom_ray.config import EngineConfig
from qzoom_ray.pipeline import codec
from qzoom_ray.pipeline import schema as S
from qzoom_ray.pipeline.config import InputConfig
from qzoom_ray.pipeline.io import ImageReadError, image_root, read_image_bytes, resolve_uri
from qzoom_ray.pipeline.stages.common import ProcessorContext, apply_updates, rows_of, set_torch_threads

logger = logging.getLogger(__name__)

#: Qwen2.5-VL's own limits (4..16384 visual tokens): an image at its native resolution costs
#: smart_resize(h, w) within these, the "full resolution" figure of the summary.
FULL_RES_MIN_PIXELS = 4 * 28 * 28
FULL_RES_MAX_PIXELS = 16384 * 28 * 28

_done_cache: dict[str, Any] = {}


def _done_ids(done: Any) -> Any:
    """Resolve the set of already-written ids once per worker process (it can hold millions of ids)."""
    if done is None:
        return None
    import ray

    key = done.hex() if isinstance(done, ray.ObjectRef) else str(id(done))
    if key not in _done_cache:
        _done_cache.clear()
        _done_cache[key] = ray.get(done) if isinstance(done, ray.ObjectRef) else done
    return _done_cache[key]


def normalise_input(table: pa.Table, input_cfg: dict, done: Any = None) -> pa.Table:
    """Canonical ``id``/``question``/image columns; drops rows whose id is already in the output.

    The image bytes move to an internal column (not written out); a string image column or the
    ``image_path`` column becomes the URI to read in the prepare stage. Other columns pass through.
    """
    cfg = InputConfig.model_validate(input_cfg)
    n = table.num_rows
    ids = table.column(cfg.id_column).cast(pa.string()) if cfg.id_column in table.column_names else None
    if ids is None:
        raise ValueError(f"input has no id column {cfg.id_column!r}; columns: {table.column_names}")
    if cfg.id_column != S.ID:
        table = table.drop_columns([cfg.id_column])
    question = (
        table.column(cfg.question_column).cast(pa.string())
        if cfg.question_column in table.column_names
        else pa.nulls(n, pa.string())
    )
    if cfg.question_column != S.QUESTION and cfg.question_column in table.column_names:
        table = table.drop_columns([cfg.question_column])
    image_bytes, uri = pa.nulls(n, pa.large_binary()), pa.nulls(n, pa.string())
    if cfg.image_column in table.column_names:
        col = table.column(cfg.image_column)
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            image_bytes = col.cast(pa.large_binary())
            table = table.drop_columns([cfg.image_column])  # bytes are not copied to the output
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            uri = col.cast(pa.string())
    if cfg.image_path_column in table.column_names:
        uri = pc.coalesce(uri, table.column(cfg.image_path_column).cast(pa.string()))
    renames = {c: S.passthrough_name(c) for c in table.column_names}
    if any(k != v for k, v in renames.items()):
        table = table.rename_columns([renames[c] for c in table.column_names])
    root = image_root(cfg)
    uri = pa.array([resolve_uri(u, root) if u else None for u in uri.to_pylist()], pa.string())
    for name, arr in ((S.ID, ids), (S.QUESTION, question), (S.IMAGE_BYTES, image_bytes), (S.IMAGE_URI, uri)):
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, arr)
        else:
            table = table.append_column(name, arr)
    done_ids = _done_ids(done)
    if done_ids is not None and len(done_ids):
        table = table.filter(pc.invert(pc.is_in(table.column(S.ID), value_set=done_ids)))
    return table


class PrepareImages:
    """CPU: read bytes (path inputs), decode with EXIF/RGB and bomb/aspect guards, resize, tokenise."""

    def __init__(self, engine_config: dict, s3fs_kwargs: dict, torch_threads: int | None = None):
        """``s3fs_kwargs``: ``StorageConfig.s3fs_kwargs()`` resolved in the driver (its AWS_* env included)."""
        set_torch_threads(torch_threads)
        self.ctx = ProcessorContext(EngineConfig.model_validate(engine_config))
        self._s3fs_kwargs = s3fs_kwargs
        self._fs: Any = None

    def _fs_for(self, uri: str) -> Any:
        if self._fs is None and uri.startswith(("s3://", "s3a://")):
            import s3fs

            self._fs = s3fs.S3FileSystem(**self._s3fs_kwargs)
        return self._fs

    def _record(self, row: dict[str, Any]) -> tuple[Any, bytes | None]:
        from qzoom_ray.model.state import EngineRecord

        data = row.get(S.IMAGE_BYTES)
        uri = row.get(S.IMAGE_URI)
        if data is None and uri:
            data = read_image_bytes(uri, self._fs_for(uri))
        if data is None:
            raise ImageReadError("record has no image (neither bytes nor a path)")
        overrides = {k: row.get(k) for k in S.OVERRIDE_COLUMNS if row.get(k) is not None}
        return EngineRecord(id=row[S.ID], image=data, question=row.get(S.QUESTION) or "", **overrides), data

    def prepare_row(self, row: dict[str, Any]) -> dict[str, Any]:
        from qzoom_ray.model import preprocess
        from qzoom_ray.model.state import EngineResult

        try:
            record, data = self._record(row)
            out = preprocess.prepare_record(self.ctx, record)
        except ImageReadError as exc:
            return {"route": "error", S.ERROR: str(exc), S.IMAGE_BYTES: None}
        except Exception as exc:  # unexpected: report it on the row, never sink the batch
            logger.exception("prepare failed for %s", row.get(S.ID))
            return {"route": "error", S.ERROR: f"internal error: {type(exc).__name__}: {exc}", S.IMAGE_BYTES: None}
        if isinstance(out, EngineResult):
            return {"route": "error", S.ERROR: out.error, S.IMAGE_BYTES: None}
        update = codec.prepared_to_row(out)
        w, h = out.image_wh
        try:
            update["full_res_visual_tokens"] = geometry.visual_token_count(
                h, w, self.ctx.adapter.token_px, FULL_RES_MIN_PIXELS, FULL_RES_MAX_PIXELS
            )
        except ValueError:
            update["full_res_visual_tokens"] = None
        update[S.IMAGE_BYTES] = data  # path inputs: keep the bytes for the crop, no second read
        return update

    def __call__(self, table: pa.Table) -> pa.Table:
        cols = (S.ID, S.QUESTION, S.IMAGE_BYTES, S.IMAGE_URI, *S.OVERRIDE_COLUMNS)
        return apply_updates(table, [self.prepare_row(r) for r in rows_of(table, cols)])


class CropPrep:
    """CPU: for gated rows only, re-decode the original and crop + process the RoI; others untouched."""

    def __init__(self, engine_config: dict, torch_threads: int | None = None):
        set_torch_threads(torch_threads)
        self.ctx = ProcessorContext(EngineConfig.model_validate(engine_config))
        # With escalation the zoom stage may answer a row again from its image: the bytes travel on.
        self.drop_bytes = self.ctx.config.escalation is None

    def crop_row(self, row: dict[str, Any]) -> dict[str, Any]:
        from qzoom_ray.images import load_image
        from qzoom_ray.model import preprocess

        cfg = self.ctx.config
        try:
            image = load_image(
                row[S.IMAGE_BYTES], max_pixels=cfg.max_image_pixels, max_aspect_ratio=cfg.max_aspect_ratio
            )
            req = codec.request_from_row(row, codec.prepared_from_row(row))
            roi = preprocess.prepare_roi(self.ctx, req, image)
        except Exception as exc:  # the image decoded once already; anything here is unexpected
            logger.exception("crop failed for %s", row.get(S.ID))
            return {"route": "error", S.ERROR: f"internal error in crop: {type(exc).__name__}: {exc}",
                    S.NEEDS_ZOOM: False, S.IMAGE_BYTES: None, S.PREFIX_STATE: None, S.PIXELS: None}
        return {**codec.roi_to_row(roi), **({S.IMAGE_BYTES: None} if self.drop_bytes else {})}

    def __call__(self, table: pa.Table) -> pa.Table:
        cols = (S.ID, S.QUESTION, S.IMAGE_BYTES, S.NEEDS_ZOOM, S.BOX_GRID, "roi_box_px", "gate_score", "coarse_s",
                S.GRID, S.INPUT_IDS, S.IMAGE_START, S.MIN_PIXELS, S.MAX_PIXELS, S.GATE_THRESH, S.ROI_THRESH,
                S.MAX_NEW_TOKENS, "image_width", "image_height", "prep_s")
        # Only gated rows do work; the bytes of every other row are dropped here, they are no longer needed.
        spent = {S.IMAGE_BYTES: None} if self.drop_bytes else None
        updates = [self.crop_row(r) if r.get(S.NEEDS_ZOOM) else spent for r in rows_of(table, cols)]
        return apply_updates(table, updates)
