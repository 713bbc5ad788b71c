"""Resume a killed job into the same output folder: no row lost, none duplicated.

A manifest (``_qzoom_job.json``, ignored by Parquet readers because of the leading underscore) holds
the fingerprint of what decides the answers. A rerun with the same fingerprint reads the ids of every
complete Parquet file already written and skips them at the start of the pipeline; a file cut short
by the kill has no footer, so it cannot be read: it is deleted and its rows are done again. A
different fingerprint refuses to run instead of mixing two configs' answers in one dataset.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qzoom_ray.pipeline import schema as S
from qzoom_ray.pipeline.config import BatchJobConfig
from qzoom_ray.pipeline.io import OutputDir

logger = logging.getLogger(__name__)

MANIFEST = "_qzoom_job.json"


class ResumeError(RuntimeError):
    """The output folder cannot be resumed into with this config."""


@dataclass
class ResumeState:
    done_ids: pa.Array  # ids already in the output (string)
    files: list[str] = field(default_factory=list)  # complete files found
    removed: list[str] = field(default_factory=list)  # partial files deleted
    duplicates: int = 0  # ids found more than once (should stay 0)

    @property
    def rows_done(self) -> int:
        return len(self.done_ids)


def read_ids(out: OutputDir, path: str) -> pa.Array | None:
    """Ids of one written file, or None when the file is incomplete (killed mid-write)."""
    try:
        with out.open(path) as fh:
            return pq.ParquetFile(fh).read(columns=[S.ID]).column(S.ID).combine_chunks()
    except Exception as exc:  # ArrowInvalid for a missing footer, OSError for a truncated object
        logger.warning("unreadable output file %s (%s): treated as partial", path, exc)
        return None


def prepare_output(cfg: BatchJobConfig) -> ResumeState:
    """Check the manifest, collect the ids already done, and (re)write the manifest."""
    assert cfg.output.path
    out = OutputDir(cfg.output.path, cfg.storage)
    fingerprint = cfg.result_fingerprint()
    files = out.parquet_files()
    if out.exists(MANIFEST):
        old = json.loads(out.read_text(MANIFEST))
        if old.get("fingerprint") != fingerprint:
            raise ResumeError(
                f"{cfg.output.path} holds results of another config (fingerprint {old.get('fingerprint')}, "
                f"this config {fingerprint}); write to a new output folder"
            )
    elif files:
        raise ResumeError(f"{cfg.output.path} has Parquet files but no {MANIFEST}; refusing to mix outputs")
    if files and not cfg.output.resume:
        raise ResumeError(f"{cfg.output.path} is not empty and output.resume is false")

    state = ResumeState(done_ids=pa.array([], pa.string()))
    pieces = []
    for path in files:
        ids = read_ids(out, path)
        if ids is None:
            out.remove(path)
            state.removed.append(path)
        else:
            pieces.append(ids.cast(pa.string()))
            state.files.append(path)
    if pieces:
        all_ids = pa.concat_arrays(pieces)
        unique = pc.unique(all_ids)
        state.duplicates = len(all_ids) - len(unique)
        state.done_ids = unique
        if state.duplicates:
            logger.error("%d duplicate ids already in %s", state.duplicates, cfg.output.path)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    manifest = {
        "fingerprint": fingerprint,
        "model": cfg.engine.model.path,
        "input": cfg.input.path,
        "updated_at": now,
        "config": cfg.model_dump(mode="json", exclude={"storage"}),  # no credentials in the output
    }
    out.write_text(MANIFEST, json.dumps(manifest, indent=2))
    if state.files:
        logger.info("resuming: %d rows already in %d files", state.rows_done, len(state.files))
    return state
