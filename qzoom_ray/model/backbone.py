"""What the engine needs from a backbone, and the registry that maps ``model_type`` to an adapter.

The engine owns the prefill/decode loop; an adapter exposes the stock transformers pieces it runs
(embeddings, vision tower, decoder layers, rotary embedding, M-RoPE index, norm, lm_head) plus the
few places where backbones differ (sink mask, q/k of the RoI scoring layer, pixels per token).
A second backbone (Qwen3-VL) is a new adapter module registered here, not a fork of the first.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn


class BackboneAdapter(ABC):
    """Thin, stateless view over a stock transformers vision-language model."""

    #: Source pixels per LLM visual token side (28 for Qwen2.5-VL, 32 for Qwen3-VL).
    token_px: int
    model: nn.Module
    #: Another decoder (``layers``, ``norm``, ``lm_head``) this view runs instead of the model's own; see
    #: ``with_text_stack``. Adapters read it in ``layers``, ``final_norm`` and ``lm_head``.
    text_stack: nn.Module | None = None

    def with_text_stack(self, stack: nn.Module) -> BackboneAdapter:
        """A view of the same backbone (vision tower, embeddings, rotary) that decodes with ``stack``."""
        view = copy.copy(self)
        view.text_stack = stack
        return view

    @property
    @abstractmethod
    def text_config(self) -> Any: ...

    @property
    @abstractmethod
    def layers(self) -> nn.ModuleList: ...

    @property
    @abstractmethod
    def decoder_layer_cls(self) -> type[nn.Module]: ...

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @abstractmethod
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """ViT features per image, each ``(num_visual_tokens, hidden)``."""

    @abstractmethod
    def rope_index(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, grid_thw: torch.Tensor
    ) -> torch.Tensor:
        """Stock M-RoPE position ids ``(3, batch, seq)`` for a left-padded batch, one image per row."""

    @abstractmethod
    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotary (cos, sin) for ``(3, batch, seq)`` position ids (float positions allowed)."""

    @abstractmethod
    def causal_mask(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, cache: Any, layer_idx: int
    ) -> Any:
        """The mask object the configured attention kernel expects, sized against ``cache`` layer ``layer_idx``."""

    @abstractmethod
    def new_cache(self) -> Any: ...

    @abstractmethod
    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def roi_logits(
        self, score_layer: nn.Module, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """RoI scores from the twig's last layer: ``(batch, seq)`` mean-over-heads q(last)·k(j)/sqrt(d),
        and optional ``(batch, seq)`` sink scores (Qwen3-VL derives its sink mask from token 0's query)."""

    @abstractmethod
    def sink_mask(self, grid_hw: tuple[int, int], sink_scores: np.ndarray | None) -> np.ndarray | None:
        """Cells of one record's RoI map to zero before thresholding (True = keep), or None.

        ``sink_scores`` are that record's image-token sink scores in grid order, when the adapter makes them.
        """

    def text_stack_of(self) -> nn.Module:
        """This model's own decoder as a ``direct_route.TextStack`` (for ``ModelConfig.direct_route_path``)."""
        raise NotImplementedError(f"{type(self).__name__} does not support a direct-route decoder yet")

    def shared_parts(self) -> dict[str, nn.Module]:
        """Modules a direct-route decoder must share with this model (vision tower, embeddings), by name."""
        raise NotImplementedError(f"{type(self).__name__} does not support a direct-route decoder yet")

    def run_layers(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        *,
        position_embeddings: tuple[torch.Tensor, ...],
        attention_mask: Any,
        cache: Any,
    ) -> torch.Tensor:
        """Run stock decoder layers ``start..end-1`` in order, writing their KV into ``cache``."""
        for layer in self.layers[start:end]:
            hidden = layer(
                hidden,
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                cache=cache,
                use_cache=cache is not None,
            )
        return hidden


_ADAPTERS: dict[str, Callable[[nn.Module], BackboneAdapter]] = {}


def register_adapter(model_type: str) -> Callable:
    def wrap(factory: Callable[[nn.Module], BackboneAdapter]) -> Callable[[nn.Module], BackboneAdapter]:
        _ADAPTERS[model_type] = factory
        return factory

    return wrap


def adapter_for(model: nn.Module) -> BackboneAdapter:
    model_type = model.config.model_type
    if model_type not in _ADAPTERS:
        raise ValueError(f"no qzoom-ray adapter for model_type {model_type!r}; supported: {sorted(_ADAPTERS)}")
    return _ADAPTERS[model_type](model)
