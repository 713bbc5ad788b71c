"""CPU-side steps: turn a record into model inputs, and a RoI box into crop patches."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from qzoom_ray import geometry
from qzoom_ray.config import BudgetThresholds, ZoomConfig
from qzoom_ray.images import ImageError, crop_image, load_image
from qzoom_ray.model.processor import build_prompt, image_size_kwargs
from qzoom_ray.model.state import EngineRecord, EngineResult, PreparedRecord, PreparedRoi, ZoomRequest

if TYPE_CHECKING:
    from qzoom_ray.model.engine import QZoomEngine


def _is_pil_backend(image_processor: object) -> bool:
    try:
        from transformers.image_processing_backends import PilBackend
    except ImportError:  # older transformers: no backends, leave resizing to the processor
        return False
    return isinstance(image_processor, PilBackend)


def presize_image(
    image: Image.Image, image_processor: object, min_pixels: int, max_pixels: int, max_aspect_ratio: float
) -> Image.Image:
    """``image`` resized to the size the processor would give it, with the processor's own filter.

    The PIL image processor turns the full-resolution image into arrays twice before it resizes (about
    half of ``prepare``'s time on large pages). Resizing the PIL image first is the same PIL call on the
    same pixels, so the patches are identical, and the processor's own resize becomes a copy. Other
    backends (torchvision) resize differently and are left to do it themselves.
    """
    if not getattr(image_processor, "do_resize", False) or not _is_pil_backend(image_processor):
        return image
    patch, merge = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
    if not isinstance(patch, int) or not isinstance(merge, int):
        return image
    factor = patch * merge  # the processor's own rounding unit, whatever the adapter assumes
    h, w = geometry.smart_resize(image.height, image.width, factor, min_pixels, max_pixels, max_aspect_ratio)
    if (w, h) == image.size:
        return image
    # The processor re-applies its rule to what it gets; if that would move the size again (clamped
    # extreme aspect ratios), the pre-resized image would not match, so let the processor do it all.
    if geometry.smart_resize(h, w, factor, min_pixels, max_pixels, max_aspect_ratio) != (h, w):
        return image
    resample = getattr(image_processor, "resample", None)
    return image.resize((w, h), resample=Image.Resampling.BILINEAR if resample is None else resample)


class RecordError(ValueError):
    """A record the engine cannot answer; the message is returned to the user in ``error``."""


def _validate_question(question: object, max_chars: int) -> str:
    if not isinstance(question, str) or not question.strip():
        raise RecordError("empty question")
    if len(question) > max_chars:
        raise RecordError(f"question too long ({len(question)} > {max_chars} characters)")
    return question.strip()


def prepare_record(engine: QZoomEngine, record: EngineRecord) -> PreparedRecord | EngineResult:
    t0 = time.perf_counter()
    cfg = engine.config
    try:
        question = _validate_question(record.question, cfg.max_question_chars)
        lo = record.min_pixels or cfg.zoom.min_pixels
        hi = record.max_pixels or cfg.zoom.max_pixels
        if lo > hi:
            raise RecordError(f"min_pixels ({lo}) > max_pixels ({hi})")
        image = load_image(record.image, max_pixels=cfg.max_image_pixels, max_aspect_ratio=cfg.max_aspect_ratio)
        # Fails early (and with our message) for sizes the processor would reject.
        geometry.smart_resize(
            image.height, image.width, engine.adapter.token_px, lo, hi, max_aspect_ratio=cfg.max_aspect_ratio
        )
        view = presize_image(image, engine.processor.image_processor, lo, hi, cfg.max_aspect_ratio)
        prompt = build_prompt(engine.processor, question, cfg.generation.prompt_suffix)
        out = engine.processor(text=[prompt], images=[view], return_tensors="np", **image_size_kwargs(lo, hi))
    except (ImageError, RecordError, ValueError) as exc:
        from qzoom_ray.model.engine import error_result

        return error_result(record.id, str(exc))
    input_ids = np.asarray(out["input_ids"][0], dtype=np.int64)
    image_start = int(np.flatnonzero(input_ids == engine.image_token_id)[0])
    default = budget_thresholds(cfg.zoom, hi, engine.adapter.token_px)
    return PreparedRecord(
        record=record,
        image_wh=(image.width, image.height),
        image=image,
        input_ids=input_ids,
        pixel_values=np.ascontiguousarray(out["pixel_values"], dtype=np.float32),
        grid_thw=tuple(int(v) for v in out["image_grid_thw"][0]),
        image_start=image_start,
        min_pixels=lo,
        max_pixels=hi,
        gate_thresh=default.gate_thresh if record.gate_thresh is None else record.gate_thresh,
        roi_thresh=default.roi_thresh if record.roi_thresh is None else record.roi_thresh,
        max_new_tokens=record.max_new_tokens or cfg.generation.max_new_tokens,
        prep_s=time.perf_counter() - t0,
    )


def budget_thresholds(zoom: ZoomConfig, max_pixels: int, token_px: int) -> BudgetThresholds:
    """The (tau_gate, tau_roi) pair calibrated for this upper budget, else the config's global pair."""
    entry = zoom.thresholds_by_budget.get(round(max_pixels / token_px**2))
    return entry or BudgetThresholds(gate_thresh=zoom.gate_thresh, roi_thresh=zoom.roi_thresh)


def roi_budget(
    engine: QZoomEngine, prepared: PreparedRecord, box_px: tuple[float, float, float, float] | None = None
) -> tuple[int, int]:
    """The crop's pixel budget: the global view's unless the config sets one for RoIs; with the crop's ``box_px``,
    lowered to ``ZoomConfig.roi_min_downscale``'s floor on the downscale."""
    from qzoom_ray.box_cap import crop_max_pixels

    zoom = engine.config.zoom
    lo, hi = zoom.roi_min_pixels or prepared.min_pixels, zoom.roi_max_pixels or prepared.max_pixels
    if box_px is not None:
        hi = crop_max_pixels(box_px, lo, hi, zoom.roi_min_downscale)
    return lo, hi


def prepare_roi(engine: QZoomEngine, request: ZoomRequest, image=None) -> PreparedRoi:
    """Crop the original image at the request's box and process it; ``image`` overrides the kept one."""
    t0 = time.perf_counter()
    source = image if image is not None else request.prepared.image
    if source is None:
        raise ValueError("prepare_roi needs the original image (pass image= after a process boundary)")
    crop = crop_image(source, request.box_px)
    lo, hi = roi_budget(engine, request.prepared, request.box_px)
    ip = engine.processor.image_processor
    crop = presize_image(crop, ip, lo, hi, engine.config.max_aspect_ratio)
    out = ip(images=[crop], return_tensors="np", **image_size_kwargs(lo, hi))
    return PreparedRoi(
        pixel_values=np.ascontiguousarray(out["pixel_values"], dtype=np.float32),
        grid_thw=tuple(int(v) for v in out["image_grid_thw"][0]),
        prep_s=time.perf_counter() - t0,
    )
