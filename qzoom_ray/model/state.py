"""Per-request state, carried in plain objects between the engine's steps (never on a module)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# Routes a record can take through the engine.
ROUTE_DIRECT = "direct"  # gate below threshold: answered from the coarse pass
ROUTE_ZOOM = "zoom"  # answered from the spliced global + RoI sequence
ROUTE_EMPTY_MAP = "fallback_empty_map"  # gated, but no RoI cell above tau_roi: direct answer
ROUTE_BAD_CROP = "fallback_bad_crop"  # gated, but the crop cannot be encoded: direct answer
ROUTE_BASELINE = "baseline"  # plain single pass (no Q-Zoom)
ROUTE_CROP_REREAD = "crop_reread"  # an unsure zoomed answer, asked again on its RoI crop alone (escalation)
ROUTE_ERROR = "error"


@dataclass
class EngineRecord:
    """One question about one image. Optional fields override the engine config for this record."""

    id: str
    image: Any  # encoded bytes, a PIL image, or a local path
    question: str
    min_pixels: int | None = None
    max_pixels: int | None = None
    gate_thresh: float | None = None
    roi_thresh: float | None = None
    max_new_tokens: int | None = None


@dataclass
class EngineResult:
    id: str
    answer: str | None = None
    route: str = ROUTE_ERROR
    zoomed: bool = False
    gate_score: float | None = None
    roi_box_px: tuple[int, int, int, int] | None = None
    roi_box_norm: tuple[float, float, float, float] | None = None
    image_width: int | None = None
    image_height: int | None = None
    coarse_visual_tokens: int = 0
    roi_visual_tokens: int = 0
    output_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    roi_map: np.ndarray | None = None
    token_ids: list[int] = field(default_factory=list)
    #: Log-probability of each generated token (greedy, after the repetition penalty), EOS included.
    token_logprobs: list[float] = field(default_factory=list)
    #: Set when the answer comes from a re-run at a larger budget (``EngineConfig.escalation``).
    escalated: bool = False
    #: Visual tokens the first (discarded) answers of an escalated record spent.
    escalated_visual_tokens: int = 0
    #: First-step logits (vocab,), only when the caller asks for them (tests, debugging).
    first_logits: torch.Tensor | None = None

    @property
    def answer_logprob(self) -> float | None:
        """The answer's log-probability (sum over its tokens, EOS included): a confidence to rank or triage
        answers by. None when nothing was generated (errors)."""
        return float(sum(self.token_logprobs)) if self.token_logprobs else None

    @property
    def visual_tokens(self) -> int:
        return self.coarse_visual_tokens + self.roi_visual_tokens + self.escalated_visual_tokens


@dataclass
class PreparedRecord:
    """CPU-side output for one record: tokenised prompt and the global view's patches."""

    record: EngineRecord
    image_wh: tuple[int, int]  # original (width, height) in pixels
    input_ids: np.ndarray  # (seq,) int64, unpadded
    pixel_values: np.ndarray  # (patches, patch_dim) float32
    grid_thw: tuple[int, int, int]
    image_start: int  # index of the first image-pad token
    min_pixels: int
    max_pixels: int
    gate_thresh: float
    roi_thresh: float
    max_new_tokens: int
    prep_s: float = 0.0
    #: The decoded original (RGB PIL image) for the RoI crop; None once the record has crossed a
    #: process boundary (a pipeline re-decodes the compressed bytes for the few gated records).
    image: Any = None

    @property
    def num_image_tokens(self) -> int:
        _, h, w = self.grid_thw
        return (h // 2) * (w // 2)

    @property
    def merged_grid(self) -> tuple[int, int]:
        return self.grid_thw[1] // 2, self.grid_thw[2] // 2


@dataclass
class PrefixState:
    """What the coarse pass hands the zoom pass so that layers 0..K-1 of the prefix are not recomputed.

    Tensors cover the unpadded prefix (system prompt .. global <vision_end>) of one record.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer < K: (kv_heads, prefix_len, head_dim) each
    hidden_k: torch.Tensor  # (prefix_len, hidden) output of layer K-1
    global_features: torch.Tensor  # (num_image_tokens, hidden) ViT output of the global view

    def to(self, device: torch.device | str) -> PrefixState:
        """A copy on ``device`` (e.g. "cpu" before shipping it to another process or node)."""
        return PrefixState(
            kv=[(k.to(device), v.to(device)) for k, v in self.kv],
            hidden_k=self.hidden_k.to(device),
            global_features=self.global_features.to(device),
        )

    @property
    def nbytes(self) -> int:
        tensors = [t for kv in self.kv for t in kv] + [self.hidden_k, self.global_features]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class ZoomRequest:
    """A gated record with a usable RoI, waiting for its crop and second pass."""

    prepared: PreparedRecord
    gate_score: float | None
    box_grid: tuple[int, int, int, int]
    box_px: tuple[int, int, int, int]
    roi_map: np.ndarray | None
    prefix: PrefixState | None
    coarse_s: float = 0.0


@dataclass
class PreparedRoi:
    """The crop, processed with the same pixel budget as the global view."""

    pixel_values: np.ndarray
    grid_thw: tuple[int, int, int]
    prep_s: float = 0.0

    @property
    def merged_grid(self) -> tuple[int, int]:
        return self.grid_thw[1] // 2, self.grid_thw[2] // 2

    @property
    def num_tokens(self) -> int:
        h, w = self.merged_grid
        return h * w
