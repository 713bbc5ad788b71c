"""KV-cache surgery as functions over stock ``DynamicCache`` objects (the request owns its cache)."""

from __future__ import annotations

from typing import Any

import torch


def layer_kv(cache: Any, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys, values)`` of one cache layer, each ``(batch, kv_heads, seq, head_dim)``."""
    layer = cache.layers[layer_idx]
    return layer.keys, layer.values


def fill_cache(cache: Any, kv: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """Write ``kv[layer] = (keys, values)`` into an empty cache; other layers stay empty."""
    for idx, (k, v) in kv.items():
        cache.layers[idx].update(k, v)
    return cache


def select_cache_rows(cache: Any, new_cache: Any, rows: torch.Tensor, layers: range) -> Any:
    """Copy batch rows ``rows`` of ``layers`` from ``cache`` into the empty ``new_cache``."""
    kv = {}
    for idx in layers:
        k, v = layer_kv(cache, idx)
        kv[idx] = (k.index_select(0, rows), v.index_select(0, rows))
    return fill_cache(new_cache, kv)


def left_aligned_prefix(
    pieces: list[torch.Tensor], offsets: list[int], width: int, seq_dim: int
) -> torch.Tensor:
    """Stack per-row tensors into a ``width``-wide region, row b starting at column ``offsets[b]``.

    Row b's piece is truncated to ``width - offsets[b]`` columns (the rest of its prefix is
    recomputed by the zoom pass); columns before the offset are left-padding zeros (masked).
    """
    ref = pieces[0]
    shape = list(ref.shape)
    shape[seq_dim] = width
    out = ref.new_zeros([len(pieces), *shape])
    for b, (piece, off) in enumerate(zip(pieces, offsets, strict=True)):
        take = width - off
        if take <= 0:
            continue
        src = piece.narrow(seq_dim, 0, take)
        out[b].narrow(seq_dim, off, take).copy_(src)
    return out
