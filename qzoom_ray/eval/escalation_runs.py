"""Reading evaluation runs into escalation ladders, and writing the chosen escalation into a config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from qzoom_ray.config import engine_section
from qzoom_ray.eval.escalation import Rung

_COLUMNS = ["method", "budget", "id", "score", "answer_logprob", "model_s", "error", "escalated"]


@dataclass(frozen=True)
class Reference:
    name: str
    accuracy: float  # %
    seconds: float  # model time over the set
    record_scores: tuple[float, ...] = ()  # per record, in the ladder's order (for paired intervals)
    record_seconds: tuple[float, ...] = ()


def _rung(rows: list[dict[str, Any]]) -> Rung:
    return Rung.of([r["score"] for r in rows], [r["answer_logprob"] for r in rows],
                   [r["model_s"] or 0.0 for r in rows], [r["error"] is not None for r in rows])


def read_run(run_dir: str | Path, reference_budget: int | None = None) -> tuple[dict[int, Rung], Reference]:
    """The Q-Zoom ladder (records in one order at every budget) and the baseline reference of one run.

    Refuses a run whose Q-Zoom answers were already escalated: its answers at a budget are then not that budget's.
    """
    path = Path(run_dir) / "predictions.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a jobs/evaluate.py output folder")
    names = set(pq.read_schema(path).names)
    rows = pq.read_table(path, columns=[c for c in _COLUMNS if c in names]).to_pylist()
    qzoom = [r for r in rows if r["method"] == "qzoom"]
    if any(r.get("escalated") for r in qzoom):
        raise ValueError(f"{run_dir}: the Q-Zoom answers were escalated; run jobs/evaluate.py with --no-escalation")
    budgets = sorted({int(r["budget"]) for r in qzoom})
    if len(budgets) < 2:
        raise ValueError(f"{run_dir}: escalation needs Q-Zoom answers at two budgets or more, found {budgets}")
    ids = sorted(r["id"] for r in qzoom if r["budget"] == budgets[0])
    ladder = {}
    for b in budgets:
        at = sorted((r for r in qzoom if r["budget"] == b), key=lambda r: r["id"])
        if [r["id"] for r in at] != ids:
            raise ValueError(f"{run_dir}: Q-Zoom Max-{b} did not answer the records Max-{budgets[0]} did")
        ladder[b] = _rung(at)
    base = [r for r in rows if r["method"] == "baseline"]
    by_budget: dict[int, list[dict[str, Any]]] = {}
    for r in base:
        by_budget.setdefault(int(r["budget"]), []).append(r)
    if not by_budget:
        raise ValueError(f"{run_dir}: no baseline answers to judge against (--baseline-budgets)")
    if reference_budget is None:  # the peak: the most accurate baseline budget (the cheaper one on a tie)
        reference_budget = max(by_budget, key=lambda b: (sum(r["score"] for r in by_budget[b]) / len(by_budget[b]), -b))
    if reference_budget not in by_budget:
        raise ValueError(f"{run_dir}: no baseline Max-{reference_budget}; it has {sorted(by_budget)}")
    ref = sorted(by_budget[reference_budget], key=lambda r: r["id"])
    if [r["id"] for r in ref] != ids:
        raise ValueError(f"{run_dir}: the baseline answered other records than Q-Zoom")
    seconds = tuple(float(r["model_s"] or 0.0) for r in ref)
    return ladder, Reference(f"baseline Max-{reference_budget}", 100.0 * sum(r["score"] for r in ref) / len(ref),
                             sum(seconds), tuple(float(r["score"]) for r in ref), seconds)


def write_escalation(config_in: str | Path, config_out: str | Path, block: dict[str, Any], note: str = "") -> Path:
    """Set ``escalation`` at the top level, or under ``engine:``, of a YAML config; the rest is kept."""
    src = Path(config_in)
    data = (yaml.safe_load(src.read_text()) or {}) if src.exists() else {}
    engine_section(data)["escalation"] = block
    out = Path(config_out)
    header = f"# escalation written by {note}\n" if note else ""
    out.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return out
