"""Summaries of an evaluation run: the per-setting table, the paper's speedup numbers, the Pareto plot.

Speedups (spec §7, results §1c-1d):

* matched accuracy: the baseline's peak-accuracy point (ties: its fastest) against Q-Zoom's fastest
  point whose accuracy is within ``match_tolerance`` points of that peak;
* paper fixed budget: Q-Zoom at a fixed budget (1024 for Doc/OCR, 576 for HR in the paper) against
  the baseline at its largest budget (Max-4096 in the paper);
* token reduction = 1 - Q-Zoom visual tokens / baseline visual tokens of the same two points;
* gain at max fidelity = best Q-Zoom accuracy - best baseline accuracy;
* against the peak (beyond the paper): every Q-Zoom setting's accuracy gap and speed-up against the baseline's
  peak with paired bootstrap intervals (``eval.paired``), since a few hundred records cannot resolve one point.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from qzoom_ray.eval.confidence import write_confidence
from qzoom_ray.eval.evaluate import BASELINE, ORACLE, QZOOM, REREAD, EvalSettings, SettingRun
from qzoom_ray.eval.paired import align_by_id, paired_gap

GROUPS = ("question_type", "split", "category")


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarise(run: SettingRun) -> dict[str, Any]:
    preds = run.predictions
    n = len(preds)
    model_s = sum(p["model_s"] for p in preds)
    row: dict[str, Any] = {
        "method": run.method,
        "budget": run.budget,
        "n": n,
        "accuracy": 100 * (_mean([p["score"] for p in preds]) or 0.0),
    }
    for g in GROUPS:
        for value in sorted({p[g] for p in preds if p.get(g) is not None}):
            row[f"{g}={value}"] = 100 * (_mean([p["score"] for p in preds if p.get(g) == value]) or 0.0)
    row.update(
        {
            "records_per_s_wall": n / run.wall_s if run.wall_s else math.nan,
            "records_per_s_model": n / model_s if model_s else math.nan,
            "wall_s": run.wall_s,
            "model_s": model_s,
            "visual_tokens": _mean([p["visual_tokens"] for p in preds]),
            "coarse_tokens": _mean([p["coarse_tokens"] for p in preds]),
            "roi_tokens": _mean([p["roi_tokens"] for p in preds]),
            "gate_rate": _mean([float(p["zoomed"]) for p in preds]),
            "fallback_rate": _mean([float(p["route"].startswith("fallback")) for p in preds]),
            "roi_iou": _mean([p["roi_iou"] for p in preds]),
            "roi_centre_hit": _mean([p["roi_centre_hit"] for p in preds]),
            "roi_coverage": _mean([p["roi_coverage"] for p in preds]),
            "errors": sum(1 for p in preds if p["error"]),
        }
    )
    if any(p.get("escalated") for p in preds):
        row["escalation_rate"] = _mean([float(bool(p.get("escalated"))) for p in preds])
    return row


def _rate(row: dict[str, Any], basis: str) -> float:
    return row[f"records_per_s_{basis}"]


def tradeoff(rows: Sequence[dict[str, Any]], settings: EvalSettings) -> dict[str, Any]:
    basis = settings.rate_basis
    base = [r for r in rows if r["method"] == BASELINE]
    qz = [r for r in rows if r["method"] == QZOOM]
    out: dict[str, Any] = {"rate_basis": basis, "match_tolerance": settings.match_tolerance}
    if not base or not qz:
        return out
    peak_acc = max(r["accuracy"] for r in base)
    peak = max((r for r in base if r["accuracy"] == peak_acc), key=lambda r: _rate(r, basis))
    out["baseline_peak"] = {"budget": peak["budget"], "accuracy": peak_acc, "records_per_s": _rate(peak, basis)}
    # Matching a baseline that never answers right (e.g. a random model) would be meaningless.
    matched = [r for r in qz if r["accuracy"] >= peak_acc - settings.match_tolerance] if peak_acc > 0 else []
    if matched:
        best = max(matched, key=lambda r: _rate(r, basis))
        out["matched"] = _compare(best, peak, basis)
    top = max(base, key=lambda r: r["budget"])
    fixed = settings.paper_qzoom_budget or 1024
    fixed_rows = [r for r in qz if r["budget"] == fixed]
    if fixed_rows:
        out["paper_fixed"] = _compare(fixed_rows[0], top, basis)
    out["gain_at_max_fidelity"] = max(r["accuracy"] for r in qz) - peak_acc
    return out


def _compare(q: dict[str, Any], b: dict[str, Any], basis: str) -> dict[str, Any]:
    return {
        "qzoom_budget": q["budget"],
        "baseline_budget": b["budget"],
        "qzoom_accuracy": q["accuracy"],
        "baseline_accuracy": b["accuracy"],
        "speedup": _rate(q, basis) / _rate(b, basis) if _rate(b, basis) else math.nan,
        "token_reduction": 1 - q["visual_tokens"] / b["visual_tokens"] if b["visual_tokens"] else math.nan,
    }


def _fmt(value: Any, key: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in ("gate_rate", "fallback_rate", "roi_iou", "roi_centre_hit", "roi_coverage", "escalation_rate"):
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:.1f}" if key in ("accuracy", "visual_tokens") or "=" in key else f"{value:.3g}"
    return str(value)


MD_COLUMNS = ["method", "budget", "n", "accuracy"]
MD_TAIL = ["records_per_s_wall", "records_per_s_model", "visual_tokens", "gate_rate", "roi_iou", "roi_centre_hit", "errors"]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    groups = [k for k in rows[0] if "=" in k] if rows else []
    for r in rows[1:]:
        groups += [k for k in r if "=" in k and k not in groups]
    cols = MD_COLUMNS + groups + MD_TAIL
    if any("escalation_rate" in r for r in rows):
        cols.insert(cols.index("gate_rate") + 1, "escalation_rate")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), c) for c in cols) + " |")
    return "\n".join(lines)


def against_peak(runs: Sequence[SettingRun], t: dict[str, Any]) -> list[dict[str, Any]]:
    """Each Q-Zoom setting against the baseline's peak on the records both answered (``eval.paired``)."""
    if "baseline_peak" not in t:
        return []
    budget = t["baseline_peak"]["budget"]
    ref = next(r for r in runs if r.method == BASELINE and r.budget == budget)
    return [
        {"qzoom_budget": r.budget, "baseline_budget": budget,
         **paired_gap(*align_by_id(r.predictions, ref.predictions)).as_dict()}
        for r in runs
        if r.method == QZOOM and r.predictions
    ]


def against_peak_text(rows: Sequence[dict[str, Any]]) -> str:
    """The paired comparison as a markdown table; rows with a ``run`` key (``jobs/compare_to_peak.py``) get a
    run column, and a row whose ``baseline_budget`` is None reads as each run's own peak."""
    if not rows:
        return ""
    pct = round(100 * rows[0]["level"])
    by_run = any("run" in r for r in rows)
    head = ["run"] * by_run + ["Q-Zoom", "baseline", "records", "differing", "gap (points)", "speed-up (model time)"]
    lines = [
        f"Q-Zoom against the baseline's peak, paired on the same records ({pct} % bootstrap intervals):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        lo, hi = r["gap_interval"]
        slo, shi = r["speedup_interval"]
        speed = "-" if math.isnan(r["speedup"]) else f"{r['speedup']:.2f}x [{slo:.2f}, {shi:.2f}]"
        base = "each run's peak" if r["baseline_budget"] is None else f"Max-{r['baseline_budget']}"
        cells = [str(r.get("run", ""))] * by_run + [
            f"Max-{r['qzoom_budget']}", base, str(r["n"]), str(r["discordant"]),
            f"{r['gap_points']:+.1f} [{lo:+.1f}, {hi:+.1f}]", speed]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tradeoff_text(t: dict[str, Any]) -> str:
    lines = [f"records/s basis: {t['rate_basis']}"]
    if "baseline_peak" in t:
        p = t["baseline_peak"]
        lines.append(f"baseline peak: Max-{p['budget']} {p['accuracy']:.1f}% at {p['records_per_s']:.3g} rec/s")
    for key, label in (("matched", "speedup at matched accuracy"), ("paper_fixed", "paper fixed-budget speedup")):
        if key in t:
            m = t[key]
            lines.append(
                f"{label}: {m['speedup']:.2f}x (Q-Zoom Max-{m['qzoom_budget']} {m['qzoom_accuracy']:.1f}% vs "
                f"baseline Max-{m['baseline_budget']} {m['baseline_accuracy']:.1f}%), "
                f"token reduction {100 * m['token_reduction']:.1f}%"
            )
        elif "baseline_peak" in t and key == "matched":
            why = "the baseline peak is 0%" if t["baseline_peak"]["accuracy"] <= 0 else (
                f"no Q-Zoom point within {t['match_tolerance']} points of the peak")
            lines.append(f"{label}: none ({why})")
    if "gain_at_max_fidelity" in t:
        lines.append(f"gain at max fidelity: {t['gain_at_max_fidelity']:+.1f} points")
    return "\n".join(lines)


def pareto_plot(rows: Sequence[dict[str, Any]], t: dict[str, Any], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    basis = t["rate_basis"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method, colour, marker in ((BASELINE, "tab:blue", "o"), (QZOOM, "tab:red", "s")):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])
        if not pts:
            continue
        xs, ys = [_rate(r, basis) for r in pts], [r["accuracy"] for r in pts]
        ax.plot(xs, ys, marker=marker, color=colour, label="Q-Zoom" if method == QZOOM else "Baseline")
        for r, x, y in zip(pts, xs, ys, strict=True):
            label = f"Max-{r['budget']}"
            if r.get("escalation_rate"):
                label += f", {r['escalation_rate']:.0%} re-answered"
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
    # The evidence-box rows skip the coarse pass, so their speed is not comparable: a level, not a point.
    for r in sorted((r for r in rows if r["method"] == ORACLE), key=lambda r: r["budget"]):
        ax.axhline(r["accuracy"], color="tab:gray", linestyle=":", linewidth=1)
        ax.annotate(f"evidence box, Max-{r['budget']}", (0.01, r["accuracy"]), xycoords=("axes fraction", "data"),
                    xytext=(0, 3), textcoords="offset points", fontsize=7, color="tab:gray")
    # Crop re-reads answer the zoomed records only: neither a point nor a level of the whole set.
    rows_xy = [r for r in rows if r["method"] not in (ORACLE, REREAD)]
    rates = [_rate(r, basis) for r in rows_xy if _rate(r, basis) > 0]
    if rates and max(rates) / min(rates) > 5:
        ax.set_xscale("log")  # budget ladders span an order of magnitude in speed
    accs = [r["accuracy"] for r in rows if r["method"] != REREAD]
    ax.set_ylim(max(0.0, min(accs) - 5), min(100.0, max(accs) + 5))
    notes = []
    if "matched" in t:
        notes.append(f"{t['matched']['speedup']:.2f}x speedup at matched accuracy")
    if "gain_at_max_fidelity" in t:
        notes.append(f"{t['gain_at_max_fidelity']:+.1f} pts at max fidelity")
    if notes:
        ax.text(0.98, 0.03, "\n".join(notes), transform=ax.transAxes, ha="right", va="bottom", fontsize=8)
    ax.set_xlabel(f"records/s ({basis})")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(textwrap.fill(title, 80) if title else "Accuracy vs throughput", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(runs: Sequence[SettingRun], settings: EvalSettings, out_dir: str | Path, title: str = "") -> dict[str, Any]:
    """summary.csv, summary.md, tradeoff.json, pareto.png, predictions.parquet and, where the answers carry
    log-probabilities, confidence.json / confidence.png under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [summarise(r) for r in runs]
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    t = tradeoff(rows, settings)
    t["against_peak"] = against_peak(runs, t)
    md = (f"**{title}**\n\n" if title else "") + markdown_table(rows) + "\n\n" + tradeoff_text(t) + "\n"
    if t["against_peak"]:
        md += "\n" + against_peak_text(t["against_peak"]) + "\n"
    (out / "summary.md").write_text(md, encoding="utf-8")
    (out / "tradeoff.json").write_text(json.dumps(t, indent=2), encoding="utf-8")
    preds = [p for r in runs for p in r.predictions]
    if preds:
        pq.write_table(pa.Table.from_pylist(preds), out / "predictions.parquet")
    if rows:
        pareto_plot(rows, t, out / "pareto.png", title)
    write_confidence(runs, out)
    return {"rows": rows, "tradeoff": t, "markdown": md}
