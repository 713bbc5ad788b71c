"""What the tiny base model is and how its training is configured: architecture, curriculum phases,
the job config, and building the model (from scratch or from a checkpoint) that the loop trains.

The model is the stock transformers class with a small config and a tokenizer built offline from
the task's vocabulary. The loop that trains it is :mod:`qzoom_ray.train.base`.
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

from pydantic import Field, model_validator

from qzoom_ray.config import StrictModel


class TinyArch(StrictModel):
    hidden_size: int = Field(128, description="LLM hidden size.")
    intermediate_size: int = Field(256, description="LLM MLP width.")
    num_layers: int = Field(6, description="LLM decoder layers.")
    num_heads: int = Field(4, description="LLM attention heads (head_dim = hidden / heads).")
    num_kv_heads: int = Field(2, description="LLM key/value heads.")
    vision_depth: int = Field(2, description="ViT blocks (the last one uses full attention).")
    vision_hidden: int = Field(64, description="ViT width.")
    rope_theta: float = Field(
        100.0, gt=0, description="LLM M-RoPE base; small, so the few width frequencies of a tiny head still resolve positions."
    )
    text_init_std: float = Field(
        0.1, gt=0, description="LLM init std (the released 0.02 is for widths in the thousands; see build_tiny_config)."
    )
    vision_init_std: float = Field(0.15, gt=0, description="ViT and merger init std.")


class TrainPhase(StrictModel):
    """One stage of a curriculum: its own data (source kwargs merged over the job's), clock and learning rate."""

    name: str = Field(..., description="Shown in logs and held-out records.")
    kind: Literal["chat", "vision"] = Field(
        "chat",
        description="chat: question/answer turns through the whole model; vision: dense per-token labels on "
        "the vision tower alone (qzoom_ray.train.vision_pretrain), before any chat phase.",
    )
    minutes: float = Field(..., gt=0, description="Wall-clock length of the phase.")
    lr: float | None = Field(None, gt=0, description="Peak learning rate (default: the job's lr).")
    decay: bool = Field(True, description="Cosine-decay to zero by the end of the phase (else constant after warm-up).")
    sample_source: str | None = Field(
        None, description="'module:function' of this phase's sample source (default: the job's); kwargs not merged then."
    )
    source_kwargs: dict[str, Any] = Field(default_factory=dict, description="Overrides of the job's source_kwargs.")
    batch_size: int | None = Field(None, ge=1, description="Samples (views) per step (default: the job's).")
    freeze_vision: bool = Field(
        False, description="chat phases: leave the patch embedding and ViT blocks as they are (the merger still trains)."
    )
    grounding_weight: float = Field(
        0.0, ge=0, description="chat phases: weight of the grounding loss (qzoom_ray.train.grounding) on the samples' "
        "groundings (a source must attach them, e.g. synth_source's ground_shapes: true); 0 turns it off."
    )
    location_weight: float = Field(
        0.0, ge=0, description="chat phases: weight of the location read-out (qzoom_ray.train.readouts."
        "LocationReadout): a train-only linear head predicts the named object's box centre from its word's state "
        "after decoder layer location_readout_layer; needs groundings like grounding_weight; 0 turns it off."
    )
    token_position_weight: float = Field(
        0.0, ge=0, description="chat phases: weight of the token-position read-out (qzoom_ray.train.readouts."
        "TokenPositionReadout): a train-only linear head predicts each visual token's place in the view from its "
        "state after decoder layer token_position_layer (self-supervised); 0 turns it off."
    )
    count_weight: float = Field(
        0.0, ge=0, description="chat phases: weight of the count read-out (qzoom_ray.train.readouts.CountReadout): "
        "a train-only linear head predicts the count a question asks for from the counted word's state after "
        "decoder layer count_readout_layer; needs a source that attaches counts (synth_source's count_objects: "
        "true); 0 turns it off."
    )
    object_centre_weight: float = Field(
        0.0, ge=0, description="chat phases: weight of the object-centre read-out (qzoom_ray.train.readouts."
        "ObjectCentreReadout): each visual token's state after decoder layer object_centre_layer says whether a "
        "countable object's centre lies in its cell; needs a source that attaches objects (count_objects: true); "
        "0 turns it off."
    )


VISION_SOURCE = "qzoom_ray.train.vision_source:make_dense_view_fn"


class TrainBaseConfig(StrictModel):
    out_dir: str = Field(..., description="Where the trained checkpoint folder is written.")
    sample_source: str = Field(
        "qzoom_ray.train.synth_source:make_sample_fn",
        description="'module:function' returning a callable rng -> TrainSample (the training data).",
    )
    source_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword args for the source.")
    tokenizer_corpus: str | None = Field(
        "qzoom_ray.train.synth_source:tokenizer_corpus",
        description="'module:function' returning extra text lines for the BPE tokenizer, or None.",
    )
    vocab_size: int = Field(512, description="BPE vocabulary size (special tokens included).")
    arch: TinyArch = Field(default_factory=TinyArch)
    init_from: str | None = Field(
        None, description="Continue from this checkpoint folder (model, tokenizer, processor) instead of a random init."
    )
    seed: int = Field(0, description="Seeds the init and every worker's data stream.")
    steps: int = Field(2000, ge=1, description="Optimiser steps.")
    batch_size: int = Field(16, ge=1, description="Samples per step per worker (the most, with max_tokens_per_batch).")
    max_tokens_per_batch: int | None = Field(
        None, ge=1, description="Pack samples by length so a batch's padded tokens stay under this (None: fixed batches)."
    )
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW, warm-up + cosine).")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Share of the schedule spent warming up.")
    adam_beta2: float = Field(0.95, gt=0, lt=1, description="AdamW beta2 (0.95 learns markedly faster from scratch here).")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(2.0, gt=0, description="CPUs reserved per worker.")
    torch_threads: int = Field(2, ge=1, description="torch threads per CPU worker.")
    data_workers: int = Field(
        0, ge=0, description="DataLoader processes rendering and encoding batches per worker (0: in the training "
        "process). A GPU worker needs many: a step takes milliseconds, a rendered view tens of them."
    )
    log_every: int = Field(20, ge=1, description="Log the mean loss every this many steps.")
    heldout_source: str | None = Field(
        None, description="'module:function' returning [(group, TrainSample)] held-out views, or None."
    )
    heldout_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword args for heldout_source.")
    heldout_every: int = Field(250, ge=1, description="Log teacher-forced held-out accuracy every this many steps.")
    max_minutes: float | None = Field(None, gt=0, description="Stop (with a fully decayed schedule) after this long.")
    grounding_heads: list[tuple[int, int]] = Field(
        default_factory=lambda: [(0, 0)],
        description="(decoder layer, head) pairs whose attention from the named word the grounding loss supervises "
        "(layer 0: the word's own embedding is the query, which learns fastest; a later layer looks the object up "
        "again once its tokens know their place in the image).",
    )
    location_readout_layer: int = Field(
        1, ge=0, description="Decoder layer after which the location read-out reads the named word's state (layer 1: "
        "the one whose grounded head looked the object up again)."
    )
    token_position_layer: int = Field(
        0, ge=0, description="Decoder layer after which the token-position read-out reads the visual tokens (layer 0: "
        "so that the next layer's lookup finds the place in them)."
    )
    count_readout_layer: int = Field(
        1, ge=0, description="Decoder layer after which the count read-out reads the counted word's state."
    )
    object_centre_layer: int = Field(
        0, ge=0, description="Decoder layer after which the object-centre read-out reads the visual tokens (layer 0: "
        "so that the next layer can add them up)."
    )
    phases: list[TrainPhase] = Field(
        default_factory=list,
        description="A curriculum: run these phases in order (each with its own data and clock) instead of one "
        "schedule; max_minutes and steps then cap the whole run.",
    )

    @model_validator(mode="after")
    def _vision_phases_first(self) -> TrainBaseConfig:
        kinds = [p.kind for p in self.phases]
        if "vision" in kinds and "chat" in kinds[: kinds.index("vision")]:
            raise ValueError("vision phases pretrain the tower and must come before every chat phase")
        return self


def resolve_spec(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def build_untrained(cfg: TrainBaseConfig):
    """Tokenizer, processor and a randomly initialised model, deterministic in ``cfg.seed``."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qzoom_ray.model.tiny import build_tiny_config, build_tiny_processor, build_tiny_tokenizer

    corpus = list(resolve_spec(cfg.tokenizer_corpus)()) if cfg.tokenizer_corpus else []
    tokenizer = build_tiny_tokenizer(cfg.vocab_size, extra_corpus=corpus)
    processor = build_tiny_processor(tokenizer)
    a = cfg.arch
    config = build_tiny_config(
        tokenizer,
        num_layers=a.num_layers,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_heads=a.num_heads,
        num_kv_heads=a.num_kv_heads,
        vision_depth=a.vision_depth,
        vision_hidden=a.vision_hidden,
        rope_theta=a.rope_theta,
        text_init_std=a.text_init_std,
        vision_init_std=a.vision_init_std,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return tokenizer, processor, model


def build_from_checkpoint(path: str):
    """Tokenizer, processor and model of an earlier run, to continue training it (sdpa, fp32)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qzoom_ray.model.processor import load_processor

    processor = load_processor(path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa", dtype="float32")
    return processor.tokenizer, processor, model
