"""How well the answer's log-probability ranks right answers above wrong ones: accuracy against coverage.

For a review queue sorted by ``answer_logprob``, the question is how right the answers kept without
review are. ``coverage_accuracy`` answers it for a run's predictions (pure, testable); the plot draws
one curve per setting, and ``confidence.json`` keeps the numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qzoom_ray.eval.evaluate import ORACLE, REREAD

#: Coverages reported in confidence.json: the most confident 10 %, 25 %, ... of the records.
REPORTED_COVERAGES = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def _confidence(logprob: float | None) -> float:
    # A record without an answer (an error) is the least confident of all.
    return -math.inf if logprob is None or math.isnan(logprob) else logprob


def coverage_accuracy(
    scores: Sequence[float], logprobs: Sequence[float | None], coverages: Sequence[float]
) -> list[tuple[float, float]]:
    """(coverage, accuracy in %) of the ``ceil(coverage * n)`` most confident records, for each coverage.

    Ties in confidence are broken by input order, so the result does not depend on a sort's stability.
    """
    if len(scores) != len(logprobs):
        raise ValueError(f"{len(scores)} scores but {len(logprobs)} log-probabilities")
    n = len(scores)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: (-_confidence(logprobs[i]), i))
    prefix = [0.0]
    for i in order:
        prefix.append(prefix[-1] + float(scores[i]))
    out = []
    for c in coverages:
        if not 0.0 < c <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {c}")
        k = max(1, math.ceil(c * n - 1e-9))
        out.append((c, 100.0 * prefix[k] / k))
    return out


def confidence_curves(runs: Sequence[Any], coverages: Sequence[float]) -> dict[str, list[tuple[float, float]]]:
    """One curve per setting that recorded ``answer_logprob`` (the evidence-box rows are left out)."""
    curves = {}
    for run in runs:
        preds = run.predictions
        if run.method in (ORACLE, REREAD) or not preds or all(p.get("answer_logprob") is None for p in preds):
            continue
        scores = [p["score"] for p in preds]
        curves[f"{run.method} Max-{run.budget}"] = coverage_accuracy(
            scores, [p.get("answer_logprob") for p in preds], coverages
        )
    return curves


def write_confidence(runs: Sequence[Any], out_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """``confidence.json`` (REPORTED_COVERAGES) and ``confidence.png`` (a fine grid) under ``out_dir``."""
    table = confidence_curves(runs, REPORTED_COVERAGES)
    if not table:
        return table
    (out_dir / "confidence.json").write_text(
        json.dumps({name: {f"{c:g}": round(a, 2) for c, a in pts} for name, pts in table.items()}, indent=2)
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [i / 50 for i in range(1, 51)]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, pts in confidence_curves(runs, grid).items():
        style = "-" if name.startswith("qzoom") else "--"
        ax.plot([100 * c for c, _ in pts], [a for _, a in pts], style, label=name)
    ax.set_xlabel("coverage: the most confident % of records (by answer_logprob)")
    ax.set_ylabel("accuracy of those records (%)")
    ax.set_title("Accuracy vs coverage: what a review queue sorted by confidence leaves unreviewed", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "confidence.png")
    plt.close(fig)
    return table
