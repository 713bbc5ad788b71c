"""What crosses replica boundaries: the coarse job, its outcome, and a zoom request made fit to ship.

Plain dataclasses, no Ray: the deployments are thin adapters around these functions and the engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from qzoom_ray.model.state import EngineRecord, EngineResult, PrefixState, ZoomRequest
from qzoom_ray.serve.config import LiveConfig

#: Outcome kinds. "rejected" is the client's fault (bad image, bad size), "failed" is ours.
DONE, ZOOM, REJECTED, FAILED = "done", "zoom", "rejected", "failed"


@dataclass
class CoarseJob:
    """One validated request, as the ingress hands it to the coarse deployment."""

    id: str
    image: bytes  # always encoded bytes: a str would be read by the engine as a local path
    question: str
    max_new_tokens: int | None = None
    gate_thresh: float | None = None
    roi_thresh: float | None = None


@dataclass
class Outcome:
    kind: str
    result: EngineResult | None = None
    zoom: ZoomRequest | None = None
    prompt_tokens: int = 0
    max_new_tokens: int = 0


def engine_record(job: CoarseJob, live: LiveConfig) -> EngineRecord:
    """Request overrides win over the live config, which wins over the engine config (None = defer)."""
    if not isinstance(job.image, bytes):
        raise TypeError("CoarseJob.image must be bytes")
    return EngineRecord(
        id=job.id,
        image=job.image,
        question=job.question,
        min_pixels=live.min_pixels,
        max_pixels=live.max_pixels,
        gate_thresh=job.gate_thresh if job.gate_thresh is not None else live.gate_thresh,
        roi_thresh=job.roi_thresh if job.roi_thresh is not None else live.roi_thresh,
        max_new_tokens=job.max_new_tokens or live.max_new_tokens,
    )


def prefix_to(prefix: PrefixState | None, device: torch.device | str) -> PrefixState | None:
    return None if prefix is None else prefix.to(device)


def shippable(request: ZoomRequest) -> ZoomRequest:
    """A copy of ``request`` fit to cross processes: compact CPU prefix, no decoded image.

    The zoom replica re-decodes the original bytes (still in ``prepared.record.image``), which are
    far smaller than the decoded RGB original. With a prefix, the global view's patches are not
    needed again (its ViT features travel in the prefix), so they are dropped too.
    """
    p = request.prepared
    # The engine's prefix tensors are compact copies; on CPU they pickle as they are, and a CUDA
    # tensor could not be unpickled on the CPU-only ingress.
    prefix = prefix_to(request.prefix, "cpu")
    pixel_values = p.pixel_values if prefix is None else np.zeros((0, p.pixel_values.shape[1]), np.float32)
    prepared = dataclasses.replace(p, image=None, pixel_values=pixel_values)
    return dataclasses.replace(request, prepared=prepared, prefix=prefix)


def prompt_tokens_of(request_or_prepared, roi_tokens: int = 0) -> int:
    """Prompt length: coarse sequence, plus the RoI tokens and their two vision markers when zoomed."""
    prepared = getattr(request_or_prepared, "prepared", request_or_prepared)
    return len(prepared.input_ids) + (roi_tokens + 2 if roi_tokens else 0)


def compact_result(result: EngineResult) -> EngineResult:
    """Drop what the ingress never shows (token ids, logits) before the result crosses processes."""
    return dataclasses.replace(result, token_ids=[], first_logits=None)
