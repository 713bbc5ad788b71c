"""Engine objects <-> Arrow row values, for work that crosses a stage (process) boundary.

Arrays travel as raw little-endian bytes plus their shapes in sibling columns; the prefix state
(zoom_transfer=kv) is one ``torch.save`` blob because it mixes dtypes (bf16 on GPU) and shapes.
Torch is imported lazily so the CPU stages and the driver never load it for this module.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from qzoom_ray import geometry
from qzoom_ray.model.state import EngineRecord, EngineResult, PreparedRecord, PreparedRoi, ZoomRequest
from qzoom_ray.pipeline import schema as S


def prepared_to_row(p: PreparedRecord, keep_pixels: bool = True) -> dict[str, Any]:
    return {
        S.INPUT_IDS: p.input_ids.astype(np.int64, copy=False).tobytes(),
        S.PIXELS: p.pixel_values.astype(np.float32, copy=False).tobytes() if keep_pixels else None,
        S.GRID: list(p.grid_thw),
        S.IMAGE_START: p.image_start,
        S.MIN_PIXELS: p.min_pixels,
        S.MAX_PIXELS: p.max_pixels,
        S.GATE_THRESH: p.gate_thresh,
        S.ROI_THRESH: p.roi_thresh,
        S.MAX_NEW_TOKENS: p.max_new_tokens,
        "image_width": p.image_wh[0],
        "image_height": p.image_wh[1],
        "coarse_visual_tokens": p.num_image_tokens,
        "prep_s": p.prep_s,
    }


def _patches(raw: bytes, grid: tuple[int, ...]) -> np.ndarray:
    """``(t*h*w, patch_dim)`` float32 patches; the grid gives the row count, so no shape column is needed."""
    return np.frombuffer(raw, dtype=np.float32).reshape(int(np.prod(grid)), -1)


def prepared_from_row(row: dict[str, Any]) -> PreparedRecord:
    """Rebuild a PreparedRecord; without pixels (kv mode after the coarse pass) pixel_values is empty."""
    grid = tuple(int(v) for v in row[S.GRID])
    raw = row.get(S.PIXELS)
    pixels = _patches(raw, grid) if raw is not None else np.zeros((0, 1), np.float32)
    return PreparedRecord(
        record=EngineRecord(id=row[S.ID], image=None, question=row.get(S.QUESTION) or ""),
        image_wh=(int(row["image_width"]), int(row["image_height"])),
        # A writable copy (a few KB): the engine hands it to torch.from_numpy.
        input_ids=np.frombuffer(row[S.INPUT_IDS], dtype=np.int64).copy(),
        pixel_values=pixels,
        grid_thw=grid,  # type: ignore[arg-type]
        image_start=int(row[S.IMAGE_START]),
        min_pixels=int(row[S.MIN_PIXELS]),
        max_pixels=int(row[S.MAX_PIXELS]),
        gate_thresh=float(row[S.GATE_THRESH]),
        roi_thresh=float(row[S.ROI_THRESH]),
        max_new_tokens=int(row[S.MAX_NEW_TOKENS]),
        prep_s=float(row.get("prep_s") or 0.0),
    )


def encode_prefix(prefix: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(
        {
            "k": [k.contiguous().cpu() for k, _ in prefix.kv],
            "v": [v.contiguous().cpu() for _, v in prefix.kv],
            "hidden_k": prefix.hidden_k.contiguous().cpu(),
            "global_features": prefix.global_features.contiguous().cpu(),
        },
        buf,
    )
    return buf.getvalue()


def decode_prefix(blob: bytes, device: Any) -> Any:
    import torch

    from qzoom_ray.model.state import PrefixState

    d = torch.load(io.BytesIO(blob), map_location=device, weights_only=True)
    return PrefixState(
        kv=list(zip(d["k"], d["v"], strict=True)), hidden_k=d["hidden_k"], global_features=d["global_features"]
    )


def request_to_row(req: ZoomRequest, transfer_kv: bool) -> dict[str, Any]:
    wh = req.prepared.image_wh
    return {
        S.NEEDS_ZOOM: True,
        S.BOX_GRID: list(req.box_grid),
        "roi_box_px": [int(v) for v in req.box_px],
        "roi_box_norm": list(geometry.normalise_box(req.box_px, wh)),
        "gate_score": req.gate_score,
        "coarse_s": req.coarse_s,
        S.PREFIX_STATE: encode_prefix(req.prefix) if transfer_kv and req.prefix is not None else None,
    }


def request_from_row(row: dict[str, Any], prepared: PreparedRecord, prefix: Any = None) -> ZoomRequest:
    return ZoomRequest(
        prepared=prepared,
        gate_score=row.get("gate_score"),
        box_grid=tuple(int(v) for v in row[S.BOX_GRID]),  # type: ignore[arg-type]
        box_px=tuple(int(v) for v in row["roi_box_px"]),  # type: ignore[arg-type]
        roi_map=None,
        prefix=prefix,
        coarse_s=float(row.get("coarse_s") or 0.0),
    )


def roi_to_row(roi: PreparedRoi) -> dict[str, Any]:
    return {
        S.ROI_PIXELS: roi.pixel_values.astype(np.float32, copy=False).tobytes(),
        S.ROI_GRID: list(roi.grid_thw),
        "crop_s": roi.prep_s,
    }


def roi_from_row(row: dict[str, Any]) -> PreparedRoi:
    grid = tuple(int(v) for v in row[S.ROI_GRID])
    return PreparedRoi(
        pixel_values=_patches(row[S.ROI_PIXELS], grid),
        grid_thw=grid,  # type: ignore[arg-type]
        prep_s=float(row.get("crop_s") or 0.0),
    )


def result_to_row(res: EngineResult) -> dict[str, Any]:
    """Result columns of a finished record (the engine's per-stage timings split into columns)."""
    t = res.timings or {}
    row: dict[str, Any] = {
        "answer": res.answer,
        "route": res.route,
        "zoomed": res.zoomed,
        "gate_score": res.gate_score,
        "roi_box_px": list(res.roi_box_px) if res.roi_box_px else None,
        "roi_box_norm": list(res.roi_box_norm) if res.roi_box_norm else None,
        "roi_visual_tokens": res.roi_visual_tokens,
        "output_tokens": res.output_tokens,
        "answer_logprob": res.answer_logprob,
        "escalated": res.escalated,
        "escalated_visual_tokens": res.escalated_visual_tokens,
        "coarse_s": t.get("coarse_s"),
        "zoom_s": t.get("zoom_s"),
        "decode_s": t.get("decode_s"),
        S.ERROR: res.error,
    }
    if res.image_width:
        row.update(image_width=res.image_width, image_height=res.image_height)
        row["coarse_visual_tokens"] = res.coarse_visual_tokens
    return row
