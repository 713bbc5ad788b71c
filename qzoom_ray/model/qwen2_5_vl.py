"""Adapter for stock transformers ``Qwen2_5_VLForConditionalGeneration`` (no copy of its modeling file)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLDecoderLayer,
    apply_rotary_pos_emb,
    repeat_kv,
)

from qzoom_ray import geometry
from qzoom_ray.model.backbone import BackboneAdapter, register_adapter


@register_adapter("qwen2_5_vl")
class Qwen25VLAdapter(BackboneAdapter):
    token_px = 28

    def __init__(self, model: Qwen2_5_VLForConditionalGeneration):
        self.model = model
        # transformers >= 4.52 nests the text model under `model.language_model`; this is the one
        # place that knows the attribute path.
        self._vlm = model.model
        self._text = model.model.language_model
        self.image_token_id = int(model.config.image_token_id)

    @property
    def text_config(self) -> Any:
        return self._text.config

    @property
    def layers(self) -> nn.ModuleList:
        return self._text.layers if self.text_stack is None else self.text_stack.layers

    @property
    def decoder_layer_cls(self) -> type[nn.Module]:
        return Qwen2_5_VLDecoderLayer

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._text.embed_tokens(input_ids)

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        out = self._vlm.get_image_features(pixel_values.to(self.dtype), grid_thw, return_dict=True)
        return list(out.pooler_output)

    def rope_index(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, grid_thw: torch.Tensor
    ) -> torch.Tensor:
        mm_token_type_ids = (input_ids == self.image_token_id).to(torch.int32)
        positions, _ = self._vlm.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=grid_thw,
            attention_mask=attention_mask,
        )
        return positions

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._text.rotary_emb(hidden, position_ids)

    def causal_mask(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, cache: Any, layer_idx: int
    ) -> Any:
        return create_causal_mask(
            config=self.text_config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=None,
            layer_idx=layer_idx,
        )

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.text_config)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self._text if self.text_stack is None else self.text_stack).norm(hidden)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self.model if self.text_stack is None else self.text_stack).lm_head(hidden)

    def text_stack_of(self) -> nn.Module:
        """This model's own decoder as a text stack (``layers``, ``norm``, ``lm_head``)."""
        from qzoom_ray.model.direct_route import TextStack

        return TextStack(self._text.layers, self._text.norm, self.model.lm_head)

    def shared_parts(self) -> dict[str, nn.Module]:
        """What a direct-route decoder must share with the model: vision tower and token embeddings."""
        return {"vision tower": self._vlm.visual, "token embeddings": self._text.embed_tokens}

    def roi_logits(
        self, score_layer: nn.Module, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, None]:
        attn = score_layer.self_attn
        bsz, seq, _ = hidden.shape
        head_dim = attn.head_dim
        x = score_layer.input_layernorm(hidden)
        # Only the last prompt token's query is needed; keys for every position.
        q = attn.q_proj(x[:, -1:, :]).view(bsz, 1, -1, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(bsz, seq, -1, head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        k = repeat_kv(k, q.shape[1] // k.shape[1])
        scores = torch.matmul(q, k.transpose(-1, -2)).squeeze(2) / math.sqrt(head_dim)  # (B, H, S)
        return scores.mean(dim=1), None

    def sink_mask(self, grid_hw: tuple[int, int], sink_scores: np.ndarray | None = None) -> np.ndarray | None:
        # Qwen2.5-VL's sinks sit in fixed top-left strips (spec §3.3.1); no scores needed.
        return geometry.qwen25_sink_mask(*grid_hw)
