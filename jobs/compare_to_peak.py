"""How far Q-Zoom is from the baseline's peak, with paired bootstrap intervals, over one or more evaluation runs.

    python jobs/compare_to_peak.py --runs runs/eval-a,runs/eval-b
    python jobs/compare_to_peak.py --runs runs/eval-a,runs/eval-b --qzoom-budget 128 --report runs/peak-gap.json

For each run (a jobs/evaluate.py output folder) and each Q-Zoom budget in it: the accuracy gap to the run's
most accurate baseline budget (or --reference-budget) and the speed-up in model time, both with intervals from
resampling records (the same records for both settings). With several runs a pooled row follows: the records of
every run together, each against its own run's reference, so a one-point target is judged on all of them.
evaluate.py writes the same table for one run into summary.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, help="comma-separated jobs/evaluate.py output folders")
    p.add_argument("--qzoom-budget", type=int, help="only this Q-Zoom budget (default: every one in the runs)")
    p.add_argument("--reference-budget", type=int, help="baseline Max-N to compare with (default: each run's peak)")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--level", type=float, default=0.95, help="interval coverage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", help="write every row (JSON) here")
    return p.parse_args(argv)


def read_predictions(run_dir: str | Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    path = Path(run_dir) / "predictions.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a jobs/evaluate.py output folder")
    return pq.read_table(path, columns=["method", "budget", "id", "score", "model_s"]).to_pylist()


def reference_of(rows: list[dict[str, Any]], budget: int | None, run: str) -> tuple[int, list[dict[str, Any]]]:
    """The baseline budget to compare with (default: the run's peak) and its answers."""
    from qzoom_ray.eval.escalation_runs import peak_budget

    by_budget: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if r["method"] == "baseline":
            by_budget.setdefault(int(r["budget"]), []).append(r)
    if not by_budget:
        raise ValueError(f"{run}: no baseline answers to compare with (--baseline-budgets)")
    budget = peak_budget(by_budget) if budget is None else budget
    if budget not in by_budget:
        raise ValueError(f"{run}: no baseline Max-{budget}; it has {sorted(by_budget)}")
    return budget, by_budget[budget]


def compare_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    from qzoom_ray.eval.paired import align_by_id, paired_gap

    runs = [r for r in args.runs.split(",") if r.strip()]
    aligned: dict[int, list[tuple[list[float], ...]]] = {}
    out = []
    for run in runs:
        rows = read_predictions(run)
        ref_budget, ref = reference_of(rows, args.reference_budget, run)
        budgets = sorted({int(r["budget"]) for r in rows if r["method"] == "qzoom"})
        if args.qzoom_budget is not None:
            if args.qzoom_budget not in budgets:
                raise ValueError(f"{run}: no Q-Zoom Max-{args.qzoom_budget}; it has {budgets}")
            budgets = [args.qzoom_budget]
        for b in budgets:
            pairs = align_by_id([r for r in rows if r["method"] == "qzoom" and r["budget"] == b], ref)
            aligned.setdefault(b, []).append(pairs)
            gap = paired_gap(*pairs, resamples=args.resamples, level=args.level, seed=args.seed)
            out.append({"run": run, "qzoom_budget": b, "baseline_budget": ref_budget, **gap.as_dict()})
    if len(runs) > 1:
        for b, parts in sorted(aligned.items()):
            if len(parts) < 2:
                continue
            pooled = tuple(sum((list(p[i]) for p in parts), []) for i in range(4))
            gap = paired_gap(*pooled, resamples=args.resamples, level=args.level, seed=args.seed)
            out.append({"run": f"pooled ({len(parts)} runs)", "qzoom_budget": b, "baseline_budget": None,
                        **gap.as_dict()})
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows = compare_runs(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from qzoom_ray.eval.report import against_peak_text

    print(against_peak_text(rows))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
