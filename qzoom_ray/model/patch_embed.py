"""The vision tower's patch embedding as one matrix product instead of a Conv3d.

Qwen2.5-VL (and Qwen2-VL / Qwen3-VL) embed each flattened ``(C, T, P, P)`` patch with a Conv3d whose
kernel equals its stride, so it never slides: it is a linear map of the flattened patch. PyTorch's
Conv3d path for that shape is slow: 2.3-2.8x slower than a GEMM on this project's CPU, and on some
GPU / cuDNN / bf16 combinations thousands of times slower (transformers issue #45750, fixed there as
an opt-in "fusion" in later releases). The swap keeps the Conv3d module and its weight, so state dicts,
checkpoints and training are unchanged; only ``forward`` reads the same weight as a matrix.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)


def _is_plain_patchify(conv: nn.Module) -> bool:
    """A Conv3d that tiles its input: kernel == stride, no padding, dilation or groups."""
    return (
        isinstance(conv, nn.Conv3d)
        and tuple(conv.kernel_size) == tuple(conv.stride)
        and all(p == 0 for p in conv.padding)
        and all(d == 1 for d in conv.dilation)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


class LinearPatchEmbed(nn.Module):
    """Drop-in for the stock patch embedding; ``proj`` is the stock Conv3d, so parameter names stay."""

    def __init__(self, proj: nn.Conv3d):
        super().__init__()
        if not _is_plain_patchify(proj):
            raise ValueError(f"not a non-overlapping patch Conv3d: {proj}")
        self.proj = proj

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        flat = hidden_states.reshape(-1, weight[0].numel()).to(dtype=weight.dtype)
        return F.linear(flat, weight.reshape(weight.shape[0], -1), self.proj.bias)


def use_linear_patch_embed(model: nn.Module) -> bool:
    """Swap the vision tower's patch embedding for :class:`LinearPatchEmbed`; False if it has none to swap."""
    vlm = model.model if hasattr(model, "model") else model
    visual = getattr(vlm, "visual", None)
    embed = getattr(visual, "patch_embed", None)
    proj = getattr(embed, "proj", None)
    if isinstance(embed, LinearPatchEmbed):
        return True
    if proj is None or not _is_plain_patchify(proj):
        logger.info("vision patch embedding left as is (no plain patch Conv3d found)")
        return False
    visual.patch_embed = LinearPatchEmbed(proj)
    return True
