"""Accuracy vs throughput: the baseline and Q-Zoom at ladders of pixel budgets, in one run.

Both methods run through engines that share ONE loaded model (``QZoomEngine(cfg, loaded=...)``),
with the same batch size, on the same machine, one setting after the other, so their records/s
are comparable. Per (method, budget) we keep every record's prediction, score, route, tokens,
timings and RoI geometry; :mod:`qzoom_ray.eval.report` turns them into tables, the Pareto plot
and the speedup numbers.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image
from pydantic import Field

from qzoom_ray.config import QWEN25_TOKEN_PX, EngineConfig, StrictModel
from qzoom_ray.eval.data import LabelledRow
from qzoom_ray.eval.metrics import score
from qzoom_ray.model.state import ROUTE_ZOOM, EngineRecord, EngineResult

logger = logging.getLogger(__name__)

BASELINE, QZOOM, ORACLE, REREAD = "baseline", "qzoom", "qzoom_oracle", "qzoom_reread"


class EvalSettings(StrictModel):
    baseline_budgets: list[int] = Field([64, 128, 256, 576, 1024], description="Max-N ladder of the baseline.")
    qzoom_budgets: list[int] = Field([64, 128, 256, 576, 1024], description="Max-N ladder of Q-Zoom.")
    batch_size: int = Field(1, ge=1, description="engine max_batch_size for every setting (paper: 1).")
    min_tokens: int | None = Field(
        None,
        description="Lower budget in tokens. None: the paper's rule, 256 (128 at Max-256), and half the "
        "budget below 256 so min <= max.",
    )
    warmup: int = Field(1, ge=0, description="Untimed batches per engine before its first timed setting.")
    rate_basis: Literal["model", "wall"] = Field(
        "model",
        description="records/s for the Pareto plot and the speedups. model: n / sum of the engine's "
        "coarse+zoom+decode time (the paper's timer around model.generate); wall: n / wall time of the "
        "whole setting, preprocessing included.",
    )
    match_tolerance: float = Field(1.0, ge=0.0, description="Accuracy points below the baseline peak that count as matched.")
    paper_qzoom_budget: int | None = Field(
        None, description="Fixed Q-Zoom budget of the paper's speedup (1024 Doc, 576 HR). None: 1024 if run."
    )
    save_roi_maps: bool = Field(True, description="Keep the RoI maps of Q-Zoom records (for the gallery).")
    oracle_budgets: list[int] = Field(
        [],
        description="Budgets of Q-Zoom's second pass on the ground-truth evidence box (every record zoomed, no gate, "
        "no twig): the accuracy the RPN could buy with perfect boxes. Rows without an evidence box get an error. "
        "Its records/s leave out the coarse pass and are not used for speedups.",
    )
    crop_rereads: bool = Field(
        False,
        description="After each Q-Zoom budget, ask every zoom-route record again on its RoI crop alone (the pass of "
        "EscalationConfig.reread_crop_below, asked of every zoomed record whatever its confidence), as method "
        "qzoom_reread: jobs/choose_escalation.py scores re-read thresholds from them. Only those records are "
        "in it, and it is not used for speedups. Needs a config without escalation.",
    )


def min_tokens_for(budget: int, min_tokens: int | None) -> int:
    if min_tokens is not None:
        return min(min_tokens, budget)
    if budget > 256:
        return 256
    return 128 if budget == 256 else max(1, budget // 2)


def box_metrics(roi: Sequence[int] | None, evidence: Sequence[int] | None) -> dict[str, float | None]:
    """IoU, 'evidence centre inside the RoI' and the share of the evidence box the RoI covers."""
    if roi is None or evidence is None:
        return {"roi_iou": None, "roi_centre_hit": None, "roi_coverage": None}
    ix0, iy0 = max(roi[0], evidence[0]), max(roi[1], evidence[1])
    ix1, iy1 = min(roi[2], evidence[2]), min(roi[3], evidence[3])
    inter = max(0, ix1 - ix0) * max(0, iy1 - iy0)
    area_r = max(0, roi[2] - roi[0]) * max(0, roi[3] - roi[1])
    area_e = max(0, evidence[2] - evidence[0]) * max(0, evidence[3] - evidence[1])
    union = area_r + area_e - inter
    cx, cy = (evidence[0] + evidence[2]) / 2, (evidence[1] + evidence[3]) / 2
    return {
        "roi_iou": inter / union if union else 0.0,
        "roi_centre_hit": float(roi[0] <= cx <= roi[2] and roi[1] <= cy <= roi[3]),
        "roi_coverage": inter / area_e if area_e else 0.0,
    }


@dataclass
class SettingRun:
    method: str
    budget: int
    wall_s: float
    predictions: list[dict[str, Any]]


def prediction_row(method: str, budget: int, row: LabelledRow, res: EngineResult, keep_map: bool) -> dict[str, Any]:
    t = res.timings or {}
    model_s = sum(t.get(k, 0.0) for k in ("coarse_s", "zoom_s", "decode_s"))
    out: dict[str, Any] = {
        "method": method,
        "budget": budget,
        "id": row.id,
        "question": row.question,
        "answer": row.answer,
        "prediction": res.answer,
        "metric": row.metric,
        "score": score(res.answer if not res.error else None, row.answers, row.metric, row.choices),
        **{g: row.groups.get(g) for g in ("question_type", "split", "category")},
        "route": res.route,
        "zoomed": bool(res.zoomed),
        "gate_score": res.gate_score,
        "roi_box": list(res.roi_box_px) if res.roi_box_px else None,
        "evidence_box": list(row.evidence_box) if row.evidence_box else None,
        "visual_tokens": res.visual_tokens,
        "coarse_tokens": res.coarse_visual_tokens,
        "roi_tokens": res.roi_visual_tokens,
        "output_tokens": res.output_tokens,
        "answer_logprob": res.answer_logprob,
        "escalated": bool(res.escalated),
        "prep_s": t.get("prep_s", 0.0),
        "model_s": model_s,
        "error": res.error,
        "roi_map": None,
        "roi_map_shape": None,
    }
    # Box metrics only where a crop was used: they judge the RPN, not the gate.
    out.update(box_metrics(res.roi_box_px if res.zoomed else None, row.evidence_box))
    if keep_map and res.roi_map is not None:
        out["roi_map"] = [float(v) for v in res.roi_map.ravel()]
        out["roi_map_shape"] = list(res.roi_map.shape)
    return out


def evidence_box_norm(row: LabelledRow) -> tuple[float, float, float, float] | None:
    """The row's evidence box as fractions of its image size (None without a box or a readable image)."""
    if not row.evidence_box:
        return None
    try:
        with Image.open(io.BytesIO(row.image)) as im:  # reads the header only
            w, h = im.size
    except Exception:  # noqa: BLE001 - an unreadable image is reported by the engine itself
        return None
    x0, y0, x1, y1 = row.evidence_box
    box = (max(0.0, x0 / w), max(0.0, y0 / h), min(1.0, x1 / w), min(1.0, y1 / h))
    return box if box[0] < box[2] and box[1] < box[3] else None


def _engine_config(config: EngineConfig, mode: str, batch_size: int, return_map: bool) -> EngineConfig:
    data = config.model_dump()
    data["zoom"]["mode"] = mode
    data["zoom"]["return_roi_map"] = return_map
    if mode == BASELINE:
        # The baseline ladder is the plain model at each budget, the reference the speedups are measured
        # against; escalation (EngineConfig.escalation) applies to the Q-Zoom rows only.
        data["escalation"] = None
    data["max_batch_size"] = batch_size
    return EngineConfig.model_validate(data)


def run_evaluation(
    rows: Sequence[LabelledRow],
    config: EngineConfig,
    settings: EvalSettings,
    progress: Callable[[str], None] | None = None,
    loaded: Any = None,
    baseline_config: EngineConfig | None = None,
) -> list[SettingRun]:
    """Run every (method, budget) over ``rows``; the model is loaded once and shared.

    ``baseline_config``: run the baseline ladder on another checkpoint (its own load), e.g. the base model
    a Q-Zoom checkpoint was trained from: stage 2 fine-tunes the decoder, so the Q-Zoom checkpoint in
    baseline mode is not the model the paper compares against.
    """
    from qzoom_ray.model.engine import QZoomEngine

    px = QWEN25_TOKEN_PX**2
    qzoom_cfg = _engine_config(config, QZOOM, settings.batch_size, settings.save_roi_maps)
    engines: dict[str, Any] = {}
    ladders = {BASELINE: settings.baseline_budgets, QZOOM: settings.qzoom_budgets}
    if baseline_config is not None:
        engines[BASELINE] = QZoomEngine(_engine_config(baseline_config, BASELINE, settings.batch_size, False))
        if settings.qzoom_budgets or settings.oracle_budgets:
            engines[QZOOM] = QZoomEngine(qzoom_cfg, loaded=loaded)
    else:
        engines[BASELINE] = QZoomEngine(_engine_config(config, BASELINE, settings.batch_size, False), loaded=loaded)
        if settings.qzoom_budgets or settings.oracle_budgets:  # the oracle rows zoom through the Q-Zoom engine
            engines[QZOOM] = QZoomEngine(qzoom_cfg, loaded=engines[BASELINE].loaded)
    if QZOOM in engines and engines[QZOOM].loaded.heads is None:
        logger.warning("the checkpoint has no Q-Zoom heads: only the baseline is evaluated")
        ladders[QZOOM] = []

    if settings.oracle_budgets and QZOOM in engines:
        ladders[ORACLE] = settings.oracle_budgets
    runs: list[SettingRun] = []
    for method, budgets in ladders.items():
        warm = settings.warmup
        for budget in budgets:
            lo = min_tokens_for(budget, settings.min_tokens)
            records = [
                EngineRecord(r.id, r.image, r.question, min_pixels=lo * px, max_pixels=budget * px) for r in rows
            ]
            engine = engines[QZOOM if method == ORACLE else method]
            if method == ORACLE:
                boxes = [evidence_box_norm(r) for r in rows]
                todo = [i for i, b in enumerate(boxes) if b is not None]
                t0 = time.perf_counter()
                answered = engine.zoom_at([records[i] for i in todo], [boxes[i] for i in todo])
                wall = time.perf_counter() - t0
                results = [EngineResult(id=r.id, error="no evidence box") for r in rows]
                for i, res in zip(todo, answered, strict=True):
                    results[i] = res
            else:
                for _ in range(warm):  # first calls pay one-off costs (allocator, kernels, lazy imports)
                    engine.generate(records[: settings.batch_size])
                warm = 0
                t0 = time.perf_counter()
                results = engine.generate(records)
                wall = time.perf_counter() - t0
            keep = method == QZOOM and settings.save_roi_maps
            preds = [prediction_row(method, budget, r, res, keep) for r, res in zip(rows, results, strict=True)]
            new = [SettingRun(method, budget, wall, preds)]
            if method == QZOOM and settings.crop_rereads:
                new.append(crop_reread_run(engine, rows, records, results, budget))
            runs += new
            if progress:
                for run in new:
                    n = max(1, len(run.predictions))
                    acc = 100 * sum(p["score"] for p in run.predictions) / n
                    progress(f"{run.method:<8} Max-{budget:<5} acc {acc:5.1f}  {n / run.wall_s:6.2f} rec/s (wall)"
                             + (f"  ({n} zoomed records)" if run.method == REREAD else ""))
    return runs


def crop_reread_run(engine: Any, rows: Sequence[LabelledRow], records: Sequence[EngineRecord],
                    results: Sequence[EngineResult], budget: int) -> SettingRun:
    """Every zoom-route record of a Q-Zoom setting asked again on its RoI crop alone (``driver.crop_record``)."""
    from qzoom_ray.images import load_image
    from qzoom_ray.model import driver

    if engine.config.escalation is not None:
        raise ValueError("crop re-reads are scored from plain answers: evaluate without escalation")
    todo, crops = [], []
    for i, (row, rec, res) in enumerate(zip(rows, records, results, strict=True)):
        if res.route != ROUTE_ZOOM or res.roi_box_px is None:  # only zoom-route answers have a crop
            continue
        image = load_image(row.image, max_pixels=engine.config.max_image_pixels,
                           max_aspect_ratio=engine.config.max_aspect_ratio)
        todo.append(i)
        crops.append(driver.crop_record(engine, rec, res, image))
    t0 = time.perf_counter()
    answered = engine.generate(crops) if crops else []
    wall = time.perf_counter() - t0
    preds = [prediction_row(REREAD, budget, rows[i], res, False) for i, res in zip(todo, answered, strict=True)]
    for p in preds:  # the box metrics would judge the crop's own (absent) RoI, not the record's
        p.update(box_metrics(None, None))
    return SettingRun(REREAD, budget, wall or 1e-9, preds)
