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


def peak_budget(by_budget: dict[int, list[dict[str, Any]]]) -> int:
    """The baseline's peak: its most accurate budget (the cheaper one on a tie)."""
    return max(by_budget, key=lambda b: (sum(r["score"] for r in by_budget[b]) / len(by_budget[b]), -b))


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
    if reference_budget is None:
        reference_budget = peak_budget(by_budget)
    if reference_budget not in by_budget:
        raise ValueError(f"{run_dir}: no baseline Max-{reference_budget}; it has {sorted(by_budget)}")
    ref = sorted(by_budget[reference_budget], key=lambda r: r["id"])
    if [r["id"] for r in ref] != ids:
        raise ValueError(f"{run_dir}: the baseline answered other records than Q-Zoom")
    seconds = tuple(float(r["model_s"] or 0.0) for r in ref)
    return ladder, Reference(f"baseline Max-{reference_budget}", 100.0 * sum(r["score"] for r in ref) / len(ref),
                             sum(seconds), tuple(float(r["score"]) for r in ref), seconds)


def read_rereads(run_dir: str | Path) -> dict[int, Rung]:
    """The crop re-reads of a run (``evaluate.py --crop-rereads``) by Q-Zoom budget, aligned with
    :func:`read_run`'s ladder (records sorted by id); a record without a re-read at a budget is an error there.
    Empty for a run without re-reads."""
    path = Path(run_dir) / "predictions.parquet"
    names = set(pq.read_schema(path).names)
    rows = pq.read_table(path, columns=[c for c in _COLUMNS if c in names]).to_pylist()
    budgets = sorted({int(r["budget"]) for r in rows if r["method"] == "qzoom"})
    if not budgets:
        return {}
    ids = sorted(r["id"] for r in rows if r["method"] == "qzoom" and r["budget"] == budgets[0])
    out = {}
    for b in budgets:
        got = {r["id"]: r for r in rows if r["method"] == "qzoom_reread" and int(r["budget"]) == b}
        if not got:
            continue
        if not set(got) <= set(ids):
            raise ValueError(f"{run_dir}: Max-{b} re-reads of records Q-Zoom did not answer")
        missing = {"score": 0.0, "answer_logprob": None, "model_s": 0.0, "error": "no re-read"}
        out[b] = _rung([got.get(i, missing) for i in ids])
    return out


def averaged_repeats(
    repeats: list[tuple[dict[int, Rung], Reference, dict[int, Rung]]], names: list[str]
) -> tuple[dict[int, Rung], Reference, dict[int, Rung]]:
    """Runs of one set repeated for timing, as one run whose model times are the repeats' means.

    A 2-core CPU's timings drift by 15-20 % between runs of the same work, enough to move a setting across a
    speed-up rule; averaging repeats narrows that. The answers must be the same in every repeat (the engine is
    deterministic), or the runs are not repeats of one set.
    """
    (ladder, ref, rereads), rest = repeats[0], repeats[1:]
    if not rest:
        return repeats[0]

    def mean_rung(rungs: list[Rung], what: str) -> Rung:
        first = rungs[0]
        for other, name in zip(rungs[1:], names[1:], strict=True):
            same = (other.score.shape == first.score.shape and (other.score == first.score).all()
                    and (other.error == first.error).all())
            if not same:
                raise ValueError(f"{name}: {what} answers differ from {names[0]}'s: not a repeat of the same run")
        return Rung(first.score, first.logprob, sum(r.seconds for r in rungs) / len(rungs), first.error)

    for (lad, _, rr), name in zip(rest, names[1:], strict=True):
        if sorted(lad) != sorted(ladder) or sorted(rr) != sorted(rereads):
            raise ValueError(f"{name}: other budgets than {names[0]}: not a repeat of the same run")
    ladder = {b: mean_rung([r[0][b] for r in repeats], f"Max-{b}") for b in ladder}
    rereads = {b: mean_rung([r[2][b] for r in repeats], f"Max-{b} re-read") for b in rereads}
    refs = [r[1] for r in repeats]
    if any(r.record_scores != ref.record_scores or r.name != ref.name for r in refs):
        raise ValueError(f"the references of {', '.join(names)} differ: not repeats of the same run")
    record_seconds = tuple(sum(vals) / len(vals) for vals in zip(*(r.record_seconds for r in refs), strict=True))
    return ladder, Reference(ref.name, ref.accuracy, sum(record_seconds), ref.record_scores, record_seconds), rereads


def write_escalation(config_in: str | Path, config_out: str | Path, block: dict[str, Any], note: str = "") -> Path:
    """Set ``escalation`` at the top level, or under ``engine:``, of a YAML config; the rest is kept."""
    src = Path(config_in)
    data = (yaml.safe_load(src.read_text()) or {}) if src.exists() else {}
    engine_section(data)["escalation"] = block
    out = Path(config_out)
    header = f"# escalation written by {note}\n" if note else ""
    out.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return out


#: Prediction columns that group records in the loss table (``eval.losses``), where a run has them.
GROUP_COLUMNS = ("split", "category", "question_type")


def record_groups(run_dir: str | Path) -> list[str]:
    """Each record's group ("ordinary/document/fine"), in :func:`read_run`'s order (records sorted by id)."""
    path = Path(run_dir) / "predictions.parquet"
    names = set(pq.read_schema(path).names)
    cols = [c for c in GROUP_COLUMNS if c in names]
    rows = pq.read_table(path, columns=["method", "budget", "id", *cols]).to_pylist()
    qzoom = [r for r in rows if r["method"] == "qzoom"]
    if not qzoom:
        raise ValueError(f"{run_dir}: no Q-Zoom answers")
    first = min(int(r["budget"]) for r in qzoom)
    at = sorted((r for r in qzoom if int(r["budget"]) == first), key=lambda r: r["id"])
    return ["/".join(str(r[c]) for c in cols if r.get(c) is not None) or "all" for r in at]
