"""Choosing tau_gate and tau_roi on a validation set (beyond the paper, which hand-tuned them per task).

One pass answers every record directly (and records its gate score); one pass per candidate tau_roi
answers every record with the RoI path forced on. Any (tau_gate, tau_roi) is then scored offline:
a record zooms iff gate >= tau_gate, and takes the zoomed answer for that tau_roi, else the direct
one. Targets: the fewest zooms whose accuracy stays within ``max_drop`` of the reference (the
baseline at the top budget), or the best accuracy under a zoom-rate budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from qzoom_ray.config import engine_section
from qzoom_ray.eval.metrics import score

NEVER = 1.01  # a gate threshold above any probability: no record zooms


@dataclass
class CalibrationTable:
    gate: np.ndarray  # (N,) gate probability per record
    direct: np.ndarray  # (N,) score of the direct answer
    zoomed: dict[float, np.ndarray]  # tau_roi -> (N,) score with the RoI path forced on
    reference_accuracy: float | None = None  # e.g. the baseline at the top budget
    meta: dict[str, Any] = field(default_factory=dict)


def gate_candidates(gate: np.ndarray) -> list[float]:
    """Thresholds between consecutive distinct gate scores (robust to rounding), plus 0 and 'never'."""
    u = np.unique(np.asarray(gate, dtype=np.float64))
    mids = ((u[:-1] + u[1:]) / 2).tolist() if u.size > 1 else []
    return sorted({0.0, *mids, NEVER})


def score_pair(table: CalibrationTable, tau_gate: float, tau_roi: float) -> tuple[float, float]:
    """(accuracy, zoom rate) of a threshold pair."""
    zoom = table.gate >= tau_gate
    acc = float(np.where(zoom, table.zoomed[tau_roi], table.direct).mean())
    return acc, float(zoom.mean())


def choose_thresholds(
    table: CalibrationTable,
    target: Literal["accuracy", "zoom_rate"] = "accuracy",
    max_drop: float = 0.01,
    max_zoom_rate: float = 0.3,
) -> dict[str, Any]:
    """The chosen pair and the whole (tau_gate, tau_roi) -> (accuracy, zoom rate) frontier.

    accuracy: fewest zooms with accuracy >= reference - max_drop (reference: ``reference_accuracy``,
    else the best pair); ties -> higher accuracy, then the higher (more selective) tau_roi. A reference no
    pair reaches is replaced by the best pair's accuracy (``target_met`` false): the most accurate pair
    itself often buys its last half point with many more zooms.
    zoom_rate: best accuracy with zoom rate <= max_zoom_rate; ties -> fewer zooms.
    """
    grid = [(g, r, *score_pair(table, g, r)) for r in sorted(table.zoomed) for g in gate_candidates(table.gate)]
    best_acc = max(acc for _, _, acc, _ in grid)
    reference = table.reference_accuracy if table.reference_accuracy is not None else best_acc
    if target == "accuracy":
        ok = [c for c in grid if c[2] >= reference - max_drop - 1e-12]
        met = bool(ok)
        if not ok:  # unreachable: within max_drop of what is reachable, and say so
            ok = [c for c in grid if c[2] >= best_acc - max_drop - 1e-12]
        pick = min(ok, key=lambda c: (c[3], -c[2], -c[1]))
    else:
        ok = [c for c in grid if c[3] <= max_zoom_rate + 1e-12]
        met = bool(ok)
        pick = max(ok, key=lambda c: (c[2], -c[3], c[1])) if ok else min(grid, key=lambda c: (c[3], -c[2]))
    g, r, acc, rate = pick
    return {
        "tau_gate": float(g), "tau_roi": float(r), "accuracy": acc, "zoom_rate": rate, "target": target,
        "target_met": met, "reference_accuracy": reference, "max_drop": max_drop, "max_zoom_rate": max_zoom_rate,
        "direct_accuracy": float(table.direct.mean()), "n": int(table.gate.size),
        "frontier": [{"tau_gate": c[0], "tau_roi": c[1], "accuracy": c[2], "zoom_rate": c[3]} for c in grid],
    }


def collect_table(loaded: Any, rows: list[Any], min_tokens: int, max_tokens: int, roi_grid: list[float],
                  reference_budget: int | None = None, batch_size: int = 8, max_new_tokens: int = 32,
                  roi_thresh_mode: str = "absolute", roi_margin: float = 0.0,
                  roi_max_downscale: float | None = None) -> CalibrationTable:
    """Run the passes on ``rows`` (:class:`~qzoom_ray.eval.data.LabelledRow`) with one shared model;
    ``roi_thresh_mode`` is how the ``roi_grid`` candidates are read (``ZoomConfig.roi_thresh_mode``), every
    box is grown by ``roi_margin`` (``ZoomConfig.roi_margin``) and capped by ``roi_max_downscale``
    (``ZoomConfig.roi_max_downscale``)."""
    from qzoom_ray.config import EngineConfig
    from qzoom_ray.model.engine import QZoomEngine
    from qzoom_ray.model.state import EngineRecord

    px = loaded.adapter.token_px**2
    base = {"generation": {"max_new_tokens": max_new_tokens}, "max_batch_size": batch_size,
            "model": {"path": loaded.source}}
    box_rule = {"roi_thresh_mode": roi_thresh_mode, "roi_margin": roi_margin, "roi_max_downscale": roi_max_downscale}
    engine = QZoomEngine(EngineConfig.model_validate({**base, "zoom": {"mode": "qzoom", **box_rule}}), loaded=loaded)

    def run(gate_thresh: float, roi_thresh: float):
        recs = [EngineRecord(r.id, r.image, r.question, min_pixels=min_tokens * px, max_pixels=max_tokens * px,
                             gate_thresh=gate_thresh, roi_thresh=roi_thresh) for r in rows]
        return engine.generate(recs)

    def scores(results) -> np.ndarray:
        return np.array([score(None if res.error else res.answer, r.answers, r.metric, r.choices)
                         for r, res in zip(rows, results, strict=True)])

    direct = run(NEVER + 1.0, roi_grid[0])
    gate = np.array([res.gate_score if res.gate_score is not None else 1.0 for res in direct])
    zoomed = {float(t): scores(run(0.0, float(t))) for t in roi_grid}
    ref = None
    if reference_budget:
        bl = QZoomEngine(EngineConfig.model_validate({**base, "zoom": {"mode": "baseline"}}), loaded=loaded)
        lo = min(min_tokens, reference_budget) * px
        res = bl.generate([EngineRecord(r.id, r.image, r.question, min_pixels=lo, max_pixels=reference_budget * px)
                           for r in rows])
        ref = float(scores(res).mean())
    return CalibrationTable(gate, scores(direct), zoomed, ref,
                            {"min_tokens": min_tokens, "max_tokens": max_tokens, "reference_budget": reference_budget,
                             **box_rule})


def direct_route_of(flag: str | None, config_in: str | Path | None) -> str | None:
    """The direct route calibration must answer with: ``flag`` when given ('none' for no route), else the one
    ``config_in`` serves (``model.direct_route_path``). A pair chosen on the checkpoint's own direct answers would
    be wrong for a config that answers ungated records with another decoder."""
    if flag is not None:
        return None if flag.strip().lower() in ("", "none") else flag
    if config_in is None or not Path(config_in).exists():
        return None
    data = yaml.safe_load(Path(config_in).read_text()) or {}
    return (engine_section(data).get("model") or {}).get("direct_route_path")


def write_thresholds(config_in: str | Path, config_out: str | Path, tau_gate: float, tau_roi: float,
                     note: str = "", roi_thresh_mode: str | None = None, roi_margin: float | None = None,
                     budget: int | None = None, roi_max_downscale: float | None = None) -> Path:
    """Set ``zoom.gate_thresh`` / ``zoom.roi_thresh`` (and ``roi_thresh_mode`` / ``roi_margin`` when given: the
    pair was chosen under them) at the top level, or under ``engine:``, of a YAML config. With ``budget`` the pair
    goes to ``zoom.thresholds_by_budget[budget]`` instead; the mode, margin and cap are shared by every budget."""
    src = Path(config_in)
    data = (yaml.safe_load(src.read_text()) or {}) if src.exists() else {}
    holder = engine_section(data)
    zoom = holder.setdefault("zoom", {})
    pair = {"gate_thresh": round(float(tau_gate), 6), "roi_thresh": round(float(tau_roi), 6)}
    if budget is None:
        zoom.update(pair)
    else:
        by_budget = zoom.setdefault("thresholds_by_budget", {})
        by_budget[int(budget)] = pair
        zoom["thresholds_by_budget"] = dict(sorted(by_budget.items()))
    if roi_thresh_mode is not None:
        zoom["roi_thresh_mode"] = roi_thresh_mode
    if roi_margin is not None:
        zoom["roi_margin"] = float(roi_margin)
    if roi_max_downscale is not None:
        zoom["roi_max_downscale"] = float(roi_max_downscale)
    out = Path(config_out)
    header = f"# tau_gate / tau_roi written by jobs/calibrate.py{': ' + note if note else ''}\n"
    out.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return out
