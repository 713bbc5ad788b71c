"""Pydantic configuration models, loaded from YAML with unknown keys rejected.

Each consumer receives only its own slice (``EngineConfig`` for the engine, and so on), the way
``ray.data.llm`` hands each stage only the fields it needs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

T = TypeVar("T", bound="StrictModel")

#: One LLM visual token of Qwen2.5-VL covers 28x28 source pixels (14 px patches, 2x2 merge).
QWEN25_TOKEN_PX = 28


class StrictModel(BaseModel):
    """Base for every config: unknown keys are an error, not a silent no-op."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)

    @classmethod
    def from_yaml(cls: type[T], path: str | Path) -> T:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        return cls.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def fingerprint(self) -> str:
        """Short stable hash of the resolved config (used to guard resumes and label outputs)."""
        return fingerprint_of(self.model_dump(mode="json"))


def fingerprint_of(data: dict[str, Any]) -> str:
    """Short stable hash of a config's JSON dump."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def engine_section(data: dict[str, Any]) -> dict[str, Any]:
    """The engine config inside a loaded YAML: its ``engine:`` section (a job config), else the whole file."""
    return data["engine"] if isinstance(data.get("engine"), dict) else data


def with_absolute_init(cfg: Any) -> Any:
    """``cfg`` with ``init_from`` as an absolute path when it names a local folder.

    Ray Train workers run in their own working directory, where a relative path would be taken for
    a hub id; a hub id (no such local folder) is passed on untouched.
    """
    init = getattr(cfg, "init_from", None)
    if init and Path(init).exists() and not Path(init).is_absolute():
        return cfg.model_copy(update={"init_from": str(Path(init).resolve())})
    return cfg


class ModelConfig(StrictModel):
    path: str = Field(
        "embedded:tiny",
        description="Local directory or hub id of a Q-Zoom checkpoint (released layout) or a stock "
        "Qwen2.5-VL. 'embedded:tiny' is the tiny Q-Zoom model trained on the synthetic benchmark that ships "
        "with the package ('embedded:tiny-base': its base model; 'embedded:tiny-random': random weights).",
    )
    heads_path: str | None = Field(
        None,
        description="Directory with qzoom_heads.safetensors + qzoom_config.json, for a stock backbone "
        "whose Q-Zoom heads were trained by this project and saved apart. None: heads come from `path`.",
    )
    processor_path: str | None = Field(
        None,
        description="Where to load the tokenizer/processor from (the authors load it from the base repo, "
        "e.g. Qwen/Qwen2.5-VL-7B-Instruct). None: same as `path`.",
    )
    revision: str | None = Field(None, description="Hub revision when `path` is a hub id.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on cuda, float32 on cpu."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="auto: flash_attention_2 on cuda when flash-attn is installed, else sdpa."
    )
    require_heads: bool = Field(
        True,
        description="Fail when the checkpoint has no Q-Zoom heads. False lets a stock model run baseline mode.",
    )
    direct_route_path: str | None = Field(
        None,
        description="Beyond the paper: a checkpoint (local dir, hub id or 'embedded:NAME') whose decoder layers, final "
        "norm and lm_head answer the records the gate sends direct (and fallbacks); the zoom pass keeps the "
        "checkpoint's own. Point it at the base model stage 2 started from, and a record that is not zoomed gets "
        "exactly the base model's answer. Its vision tower, embeddings and layers below twig_K must equal the "
        "checkpoint's (checked at load). Costs one more copy of the decoder in memory. None: one decoder.",
    )
    linear_patch_embed: bool = Field(
        True,
        description="Run the vision tower's patch Conv3d (kernel == stride) as one matrix product: the same "
        "weights and function, without PyTorch's slow Conv3d path for that shape (qzoom_ray/model/patch_embed.py).",
    )


class BudgetThresholds(StrictModel):
    gate_thresh: float = Field(..., ge=0.0, description="tau_gate at this budget.")
    roi_thresh: float = Field(..., ge=0.0, description="tau_roi at this budget (read by roi_thresh_mode).")


class ZoomConfig(StrictModel):
    mode: Literal["qzoom", "baseline"] = Field(
        "qzoom", description="qzoom: gate + RoI zoom. baseline: plain single pass at the pixel budget."
    )
    gate_thresh: float = Field(
        0.1, ge=0.0, description="tau_gate: records whose gate probability is >= this zoom. >1 disables zoom."
    )
    roi_thresh: float = Field(0.1, ge=0.0, description="tau_roi: threshold on the blurred sigmoid RoI map.")
    roi_thresh_mode: Literal["absolute", "peak_relative"] = Field(
        "absolute",
        description="absolute: the box bounds cells > tau_roi (the paper). peak_relative: cells >= tau_roi x the "
        "map's peak, so tau_roi in (0, 1] sets the box's tightness around the peak.",
    )
    roi_margin: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="Beyond the paper: each side of the RoI box moves out by this share of the image's width/height "
        "(stage 2 tunes on pseudo-RoI boxes with a margin of context). 0: the paper's tight box.",
    )
    roi_max_downscale: float | None = Field(
        None,
        ge=1.0,
        description="Beyond the paper: a box larger than this squared times the crop's pixel budget shrinks to that "
        "area (same aspect) where the RoI map is densest, so the crop is read at >= 1/roi_max_downscale of source "
        "resolution. None: the paper's box, however large.",
    )
    roi_min_downscale: float | None = Field(
        None,
        ge=1.0,
        description="Beyond the paper: a crop is never read above 1/roi_min_downscale of source resolution: a box "
        "smaller than this squared times the crop's pixel budget is encoded with fewer tokens. A model trained on "
        "whole pages read at or below their budget may never have seen glyphs at source size (docs/training.md, "
        "session 24). None: a small box is read at source resolution.",
    )
    reread_min_downscale: float | None = Field(
        None,
        ge=1.0,
        description="Beyond the paper: roi_min_downscale's floor for the crop re-read (EscalationConfig."
        "reread_crop_below), which reads the crop alone at the record's budget. None: a small crop is read at "
        "source resolution.",
    )
    thresholds_by_budget: dict[int, BudgetThresholds] = Field(
        default_factory=dict,
        description="Beyond the paper: (tau_gate, tau_roi) calibrated at a global-view budget, keyed by its Max-N "
        "(max_pixels / token_px^2). A record whose upper budget has an entry uses it instead of gate_thresh / "
        "roi_thresh (its own per-record values still win). The gate reads a sharper view at a higher budget and "
        "scores it differently, so a pair chosen at one budget is rarely the best at another.",
    )
    min_pixels: int = Field(256 * QWEN25_TOKEN_PX**2, gt=0, description="Lower pixel budget of the global view.")
    max_pixels: int = Field(576 * QWEN25_TOKEN_PX**2, gt=0, description="Upper pixel budget of the global view.")
    roi_min_pixels: int | None = Field(None, description="Lower budget for the RoI crop; None: min_pixels.")
    roi_max_pixels: int | None = Field(None, description="Upper budget for the RoI crop; None: max_pixels.")
    min_roi_px: int = Field(28, ge=1, description="Minimum side of the RoI box in source pixels.")
    reuse_src_pos: bool | None = Field(
        None,
        description="Aligned RoI position ids (True) or a fresh grid (False). None: the checkpoint's value.",
    )
    sink_mask: bool = Field(True, description="Zero the Qwen2.5 top-left attention-sink strips of the map.")
    return_roi_map: bool = Field(False, description="Return the RoI probability map with each result.")

    @model_validator(mode="after")
    def _budgets_ordered(self) -> ZoomConfig:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) > max_pixels ({self.max_pixels})")
        return self


class GenerationConfig(StrictModel):
    max_new_tokens: int = Field(128, ge=1, le=8192, description="Greedy decoding length cap.")
    repetition_penalty: float | None = Field(
        None,
        gt=0.0,
        description="None: the checkpoint's generation_config.json value (Qwen2.5-VL-Instruct ships 1.05); "
        "1.0 turns it off.",
    )
    prompt_suffix: str | None = Field(
        None,
        description="Appended to every question, e.g. 'Answer the question using a single word or phrase.'",
    )


class EscalationConfig(StrictModel):
    """Beyond the paper: an answer the model is unsure of is answered again at a larger budget.

    The answer's log-probability ranks right answers above wrong ones well (docs/batch-job.md), so a
    cheap budget for the sure majority plus a larger one for the unsure rest can match the larger
    budget's accuracy at a fraction of its cost. The in-process engine, the batch job's last model stage
    and the endpoint's ingress all apply it, with the one rule in ``model.driver``.
    """

    below_logprob: float | dict[int, float] = Field(
        ...,
        description="Answers whose log-probability (sum over tokens) is below this are re-answered: one number "
        "for every step, or one per step keyed by the budget being judged, like to_budget (e.g. {128: -0.3, "
        "256: -0.5} for the chain 128 -> 256 -> 576).",
    )
    to_budget: dict[int, int] = Field(
        ...,
        min_length=1,
        description="Global-view budget (Max-N, visual tokens) -> the budget to re-answer at, e.g. {128: 256}. "
        "Chains (128 -> 256 -> 576) are followed; other budgets never escalate.",
    )

    reread_crop_below: float | None = Field(
        None,
        le=0.0,
        description="Beyond the paper: an unsure answer from the zoom route is first asked again on its RoI crop "
        "alone, as its own image at the same budget and answered directly (no gate, the direct route's decoder), "
        "where a row's label is legible and the rows around it are gone. That answer stands unless its "
        "log-probability is below this; then the record goes on to the larger budget. None: no re-read.",
    )

    @model_validator(mode="after")
    def _larger_budgets(self) -> EscalationConfig:
        bad = {k: v for k, v in self.to_budget.items() if v <= k or k < 1}
        if bad:
            raise ValueError(f"escalation must go to a larger budget: {bad}")
        thresholds = self.below_logprob if isinstance(self.below_logprob, dict) else {0: self.below_logprob}
        if any(t > 0 for t in thresholds.values()):
            raise ValueError(f"below_logprob must be <= 0 (a log-probability): {self.below_logprob}")
        if isinstance(self.below_logprob, dict) and set(self.below_logprob) != set(self.to_budget):
            raise ValueError(
                f"below_logprob has thresholds for budgets {sorted(self.below_logprob)}, to_budget has steps from "
                f"{sorted(self.to_budget)}: give one threshold per step"
            )
        return self

    def step(self, budget: int) -> tuple[int, float] | None:
        """(the budget to re-answer at, the threshold below which to do so) for answers at ``budget``."""
        to = self.to_budget.get(budget)
        if to is None:
            return None
        below = self.below_logprob[budget] if isinstance(self.below_logprob, dict) else self.below_logprob
        return to, below


class EngineConfig(StrictModel):
    model: ModelConfig = Field(default_factory=ModelConfig)
    zoom: ZoomConfig = Field(default_factory=ZoomConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    max_batch_size: int = Field(8, ge=1, description="Records per forward pass inside the engine.")
    generate_window: int = Field(
        64, ge=1,
        description="Records engine.generate prepares and holds at a time (decoded images, pixel values): a long "
        "list is answered window by window, so memory does not grow with the list.",
    )
    max_image_pixels: int = Field(
        200_000_000, gt=0, description="Decompression-bomb guard: larger decoded images are rejected."
    )
    max_aspect_ratio: float = Field(200.0, gt=1.0, description="Qwen's processor rejects more extreme images.")
    max_question_chars: int = Field(8192, gt=0, description="Longer questions are rejected per record.")
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads on CPU; None keeps torch's.")
    escalation: EscalationConfig | None = Field(
        None, description="Beyond the paper: re-answer unsure answers at a larger budget."
    )
