"""The job's closing summary, computed from what was actually written (resumed parts included)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qzoom_ray.pipeline import schema as S
from qzoom_ray.pipeline.io import OutputDir

SUMMARY_FILE = "_qzoom_summary.json"
_COLUMNS = [S.ID, "route", "zoomed", "escalated", S.ERROR, "coarse_visual_tokens", "roi_visual_tokens",
            "escalated_visual_tokens", "full_res_visual_tokens"]


@dataclass
class JobSummary:
    records: int  # rows in the output folder
    unique_ids: int
    records_this_run: int
    zoomed: int
    errors: int
    zoom_rate: float  # zoomed / records answered without error
    escalated: int  # answered again at a larger budget (engine.escalation)
    wall_s: float  # this run, pipeline start to last file written
    records_per_s: float  # this run
    visual_tokens: int  # coarse + RoI tokens actually spent, escalated records' discarded answers included
    full_res_visual_tokens: int  # what the same images would cost at full resolution
    top_errors: list[tuple[str, int]]
    crop_rereads: int = 0  # of the escalated: answered from their RoI crop alone (escalation.reread_crop_below)

    def to_text(self) -> str:
        ratio = self.visual_tokens / self.full_res_visual_tokens if self.full_res_visual_tokens else float("nan")
        lines = [
            f"records      {self.records} ({self.unique_ids} unique ids, {self.records_this_run} this run)",
            f"zoomed       {self.zoomed} ({self.zoom_rate:.1%} of answered records)",
            f"errors       {self.errors}",
            *([f"escalated    {self.escalated} (answered again: {self.crop_rereads} from their RoI crop, "
               f"{self.escalated - self.crop_rereads} at a larger budget)"] if self.escalated else []),
            f"throughput   {self.records_per_s:.2f} records/s ({self.wall_s:.1f} s this run)",
            f"visual tok.  {self.visual_tokens} spent vs {self.full_res_visual_tokens} at full resolution "
            f"({ratio:.1%})",
        ]
        lines += [f"  error x{n}: {msg}" for msg, n in self.top_errors]
        return "\n".join(lines)


def read_output(out: OutputDir) -> pa.Table:
    tables = []
    for path in out.parquet_files():
        with out.open(path) as fh:
            f = pq.ParquetFile(fh)
            # Files written before a column existed (a resumed older output) read as nulls there.
            present = [c for c in _COLUMNS if c in f.schema_arrow.names]
            t = f.read(columns=present)
        for c in _COLUMNS:
            if c not in present:
                t = t.append_column(c, pa.nulls(t.num_rows, S.COLUMN_TYPES[c]))
        tables.append(t.select(_COLUMNS))
    if not tables:
        return pa.table({c: pa.array([], S.COLUMN_TYPES[c]) for c in _COLUMNS})
    return pa.concat_tables(tables, promote_options="default")


def summarise(table: pa.Table, records_this_run: int, wall_s: float) -> JobSummary:
    n = table.num_rows
    errors_col = table.column(S.ERROR)
    errors = n - errors_col.null_count
    zoomed = int(pc.sum(pc.fill_null(table.column("zoomed"), False)).as_py() or 0)

    def total(name: str) -> int:
        return int(pc.sum(pc.fill_null(table.column(name), 0)).as_py() or 0)

    counts: dict[str, int] = {}
    for msg in errors_col.drop_null().to_pylist():
        key = msg if len(msg) <= 120 else msg[:117] + "..."
        counts[key] = counts.get(key, 0) + 1
    answered = n - errors
    return JobSummary(
        records=n,
        unique_ids=len(pc.unique(table.column(S.ID))),
        records_this_run=records_this_run,
        zoomed=zoomed,
        errors=errors,
        zoom_rate=zoomed / answered if answered else 0.0,
        escalated=int(pc.sum(pc.fill_null(table.column("escalated"), False)).as_py() or 0),
        wall_s=wall_s,
        records_per_s=records_this_run / wall_s if wall_s > 0 else 0.0,
        visual_tokens=total("coarse_visual_tokens") + total("roi_visual_tokens") + total("escalated_visual_tokens"),
        full_res_visual_tokens=total("full_res_visual_tokens"),
        top_errors=sorted(counts.items(), key=lambda kv: -kv[1])[:5],
        crop_rereads=(int(pc.sum(pc.fill_null(pc.equal(table.column("route"), "crop_reread"), False)).as_py() or 0)
                      if "route" in table.column_names else 0),
    )


def write_summary(out: OutputDir, summary: JobSummary) -> None:
    out.write_text(SUMMARY_FILE, json.dumps(asdict(summary), indent=2))
