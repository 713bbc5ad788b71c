"""RoI gallery: one self-contained HTML page to trust or debug the gate and the RPN.

Per record: the image with the RoI map as a heatmap overlay, the chosen RoI box (red) and the
ground-truth evidence box (green); crops of both boxes at native resolution (what the zoom pass
saw vs. what it needed); the question, the ground truth and the baseline and Q-Zoom answers with
their scores, route, gate score and visual tokens. Images are inlined as base64 thumbnails.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from qzoom_ray.eval.data import LabelledRow
from qzoom_ray.eval.evaluate import BASELINE, QZOOM

EVIDENCE_RGB = (0, 200, 0)
ROI_RGB = (230, 0, 0)

CSS = """
body{font-family:system-ui,sans-serif;margin:16px;background:#fafafa;color:#222}
.grid{display:flex;flex-wrap:wrap;gap:14px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px;width:520px}
.card img{max-width:100%;display:block}
.crops{display:flex;gap:8px;margin-top:6px}.crops div{font-size:11px;color:#555}
.q{font-weight:600;white-space:pre-wrap;margin:6px 0}
table{font-size:13px;border-collapse:collapse;width:100%}td,th{padding:2px 6px;text-align:left;border-bottom:1px solid #eee}
.ok{color:#070;font-weight:600}.bad{color:#b00;font-weight:600}.meta{font-size:12px;color:#555}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px -2px 10px}
"""


def _data_uri(img: Image.Image, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, fmt, quality=85)
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def _heat_rgba(roi_map: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """Colour the map (jet), alpha rising with the value, resized to ``size`` (the map covers the whole image)."""
    from matplotlib import colormaps

    m = np.asarray(roi_map, dtype=np.float32)
    # Min-max stretch: an untrained map is nearly flat (all ~0.5); the caption gives the raw range.
    lo, hi = (float(m.min()), float(m.max())) if m.size else (0.0, 0.0)
    norm = (m - lo) / (hi - lo) if hi - lo > 1e-6 else np.zeros_like(m)
    small = Image.fromarray(norm, mode="F").resize(size, Image.Resampling.BILINEAR)
    v = np.clip(np.asarray(small), 0.0, 1.0)
    rgba = (colormaps["jet"](v) * 255).astype(np.uint8)
    rgba[..., 3] = (v * 150).astype(np.uint8)
    return Image.fromarray(rgba, mode="RGBA")


def overlay(image: Image.Image, roi_map: np.ndarray | None, roi_box: Sequence[int] | None,
            evidence_box: Sequence[int] | None, thumb: int = 480) -> Image.Image:
    """Thumbnail of ``image`` with the heatmap and both boxes drawn in thumbnail coordinates."""
    w, h = image.size
    view = image.convert("RGB").copy()
    view.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
    sx, sy = view.width / w, view.height / h
    if roi_map is not None:
        view = Image.alpha_composite(view.convert("RGBA"), _heat_rgba(roi_map, view.size)).convert("RGB")
    draw = ImageDraw.Draw(view)
    for box, colour in ((evidence_box, EVIDENCE_RGB), (roi_box, ROI_RGB)):
        if box is not None:
            draw.rectangle((box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy), outline=colour, width=3)
    return view


def crop_thumb(image: Image.Image, box: Sequence[int], size: int = 240) -> Image.Image:
    c = image.crop(tuple(int(v) for v in box))
    c.thumbnail((size, size), Image.Resampling.LANCZOS)
    return c


def _answer_cell(p: dict[str, Any] | None) -> str:
    if p is None:
        return "<td>-</td><td></td>"
    cls = "ok" if p["score"] >= 0.5 else "bad"
    text = html.escape(str(p["prediction"] if p["error"] is None else f"error: {p['error']}"))
    return f"<td>{text}</td><td class='{cls}'>{p['score']:.2f}</td>"


def _card(row: LabelledRow, base: dict[str, Any] | None, qz: dict[str, Any] | None, thumb: int) -> str:
    image = Image.open(io.BytesIO(row.image))
    image.load()
    roi_map = None
    if qz is not None and qz.get("roi_map") is not None and qz.get("roi_map_shape"):
        roi_map = np.asarray(qz["roi_map"], dtype=np.float32).reshape(qz["roi_map_shape"])
    roi_box = qz.get("roi_box") if qz else None
    view = overlay(image, roi_map, roi_box, row.evidence_box, thumb)
    crops = []
    for label, box in (("evidence (native px)", row.evidence_box), ("RoI crop (native px)", roi_box)):
        if box is not None:
            crops.append(f"<div>{label}<br><img src='{_data_uri(crop_thumb(image, box))}'></div>")
    groups = " · ".join(html.escape(v) for v in row.groups.values())
    meta = []
    if qz is not None:
        gate = "-" if qz["gate_score"] is None else f"{qz['gate_score']:.3f}"
        meta.append(f"route <b>{html.escape(qz['route'])}</b>, gate {gate}, tokens {qz['coarse_tokens']}+{qz['roi_tokens']}")
        if qz.get("roi_iou") is not None:
            meta.append(f"IoU {qz['roi_iou']:.2f}, evidence centre in RoI: {bool(qz['roi_centre_hit'])}")
        if roi_map is not None:
            meta.append(f"map {roi_map.shape[0]}x{roi_map.shape[1]}, range {float(roi_map.min()):.3f}..{float(roi_map.max()):.3f}")
    base_label = f"Baseline Max-{base['budget']}" if base else "Baseline"
    qz_label = f"Q-Zoom Max-{qz['budget']}" if qz else "Q-Zoom"
    return (
        f"<div class='card'><div class='meta'>{html.escape(row.id)} · {groups} · {image.width}x{image.height}</div>"
        f"<img src='{_data_uri(view)}'><div class='crops'>{''.join(crops)}</div>"
        f"<div class='q'>{html.escape(row.question)}</div>"
        f"<table><tr><th>ground truth</th><td colspan=2>{html.escape(' | '.join(row.answers))}</td></tr>"
        f"<tr><th>{base_label}</th>{_answer_cell(base)}</tr><tr><th>{qz_label}</th>{_answer_cell(qz)}</tr></table>"
        f"<div class='meta'>{'<br>'.join(meta)}</div></div>"
    )


def _pick_budget(preds: Sequence[dict[str, Any]], method: str, wanted: int | None) -> int | None:
    budgets = sorted({p["budget"] for p in preds if p["method"] == method})
    if wanted is not None:
        if wanted not in budgets:
            raise ValueError(f"no {method} predictions at Max-{wanted}; available: {budgets}")
        return wanted
    return budgets[-1] if budgets else None


def build_gallery(
    rows: Sequence[LabelledRow],
    predictions: Sequence[dict[str, Any]],
    out: str | Path,
    baseline_budget: int | None = None,
    qzoom_budget: int | None = None,
    limit: int = 24,
    only: str = "all",
    thumb: int = 480,
) -> Path:
    """Write the page; ``only``: all | zoomed | wrong (Q-Zoom score < 0.5) | disagree (answers differ in score)."""
    b_budget = _pick_budget(predictions, BASELINE, baseline_budget)
    q_budget = _pick_budget(predictions, QZOOM, qzoom_budget)
    index = {(p["method"], p["budget"], p["id"]): p for p in predictions}
    cards = []
    for row in rows:
        base = index.get((BASELINE, b_budget, row.id))
        qz = index.get((QZOOM, q_budget, row.id))
        if only == "zoomed" and not (qz and qz["zoomed"]):
            continue
        if only == "wrong" and not (qz and qz["score"] < 0.5):
            continue
        if only == "disagree" and not (base and qz and (base["score"] >= 0.5) != (qz["score"] >= 0.5)):
            continue
        cards.append(_card(row, base, qz, thumb))
        if len(cards) >= limit:
            break
    title = f"Q-Zoom RoI gallery: baseline Max-{b_budget} vs Q-Zoom Max-{q_budget}"
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style></head><body>"
        f"<h2>{title}</h2><div class='legend'>{len(cards)} records ({html.escape(only)})"
        f"<span style='background:rgb{ROI_RGB}'></span>RoI box <span style='background:rgb{EVIDENCE_RGB}'></span>"
        "evidence box; heatmap: RoI map (jet, stretched min..max)</div><div class='grid'>"
        + "".join(cards)
        + "</div></body></html>"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
