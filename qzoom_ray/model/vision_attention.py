"""Windowed vision attention as one padded SDPA call, for GPUs without flash-attn.

Qwen2.5-VL's vision tower attends within 112-px windows (and, in a few blocks, within each image).
With flash-attn it hands the packed sequence and its ``cu_seqlens`` to a varlen kernel; with sdpa
or eager, transformers splits the sequence and calls attention once per window. A batch of
high-budget images holds hundreds of windows, so that loop is hundreds of tiny launches per block,
forward and backward: on a GPU the tower's time goes to launch overhead. This implementation
gathers the windows into a padded ``(windows, heads, longest, head_dim)`` batch, masks the padding
keys, runs one SDPA call, and scatters the result back: the same function, a handful of launches.

It is registered with transformers' ``AttentionInterface`` under a name containing "flash",
because that is what routes ``cu_seqlens`` to the attention function in the vision tower; it is
set on the vision config only, the language model keeps its own implementation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

ATTN_NAME = "flash_padded_sdpa"


def padded_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention within each packed segment of ``cu_seq_lens_q``.

    ``query``/``key``/``value`` are ``(1, heads, total, head_dim)``; the result is
    ``(1, total, heads, head_dim)``, the layout flash-attn's varlen path returns.
    """
    if cu_seq_lens_q is None:
        raise ValueError("padded_varlen_attention needs cu_seq_lens_q (the packed segment boundaries)")
    cu = cu_seq_lens_q.to(device=query.device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    longest = int(lengths.max())
    offsets = torch.arange(longest, device=query.device)
    valid = offsets[None, :] < lengths[:, None]  # (segments, longest)
    index = torch.where(valid, cu[:-1, None] + offsets[None, :], torch.zeros_like(offsets)[None, :])

    def gather(x: torch.Tensor) -> torch.Tensor:  # (1, H, total, D) -> (segments, H, longest, D)
        return x[0][:, index].permute(1, 0, 2, 3)

    # Padding keys are masked out; padding queries attend to real keys and are dropped below,
    # so no row is fully masked and nothing turns into NaN.
    out = F.scaled_dot_product_attention(
        gather(query),
        gather(key),
        gather(value),
        attn_mask=valid[:, None, None, :],
        dropout_p=dropout if module.training else 0.0,
        scale=scaling,
    )
    # Valid positions, read row by row, are the packed order again.
    return out.permute(0, 2, 1, 3)[valid].unsqueeze(0), None


def register_padded_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, padded_varlen_attention)
    return ATTN_NAME


def use_padded_vision_attention(model: torch.nn.Module) -> None:
    """Switch a Qwen2.5-VL model's vision tower (only) to the padded single-call attention."""
    name = register_padded_attention()
    visual = model.model.visual if hasattr(model, "model") else model.visual
    visual.config._attn_implementation = name
