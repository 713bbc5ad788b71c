"""Build the left-padded zoom batch: spliced ids, embeddings, RoI position ids and the reused prefix KV.

Row b's spliced sequence (length n_b, prefix p_b) is left-padded to the batch width S. Layers
0..K-1 only run over the last ``S - C`` columns, where ``C = S - max_b(n_b - p_b)``: every row's
cached columns are then a prefix of its own prefix, so their KV and layer-K hidden states come
straight from the coarse pass, and the few prefix tokens of rows whose new part is shorter than
the widest are recomputed (bit-for-bit the same values) instead of leaving holes in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qzoom_ray import geometry
from qzoom_ray.model.kv import fill_cache, left_aligned_prefix
from qzoom_ray.model.state import PreparedRoi, ZoomRequest

if TYPE_CHECKING:
    from qzoom_ray.model.engine import QZoomEngine


@dataclass
class ZoomBatch:
    input_ids: torch.Tensor  # (B, S) spliced ids (RoI tokens = image pad id), left-padded
    attention_mask: torch.Tensor  # (B, S)
    embeds: torch.Tensor  # (B, S, hidden)
    positions: torch.Tensor  # (3, B, S) float32 M-RoPE ids (fractional in aligned mode)
    cache: Any  # layers < K hold the reused prefix columns [0, cached_width)
    cached_width: int
    cached_hidden: torch.Tensor | None  # (B, cached_width, hidden) layer-K output of the cached columns


def coarse_positions(engine: QZoomEngine, prepared) -> np.ndarray:
    """Stock M-RoPE ids ``(3, seq)`` of one unpadded coarse sequence."""
    dev = engine.device
    # np.array copies: arrays that crossed a process boundary arrive read-only.
    ids = torch.from_numpy(np.array(prepared.input_ids, dtype=np.int64))[None].to(dev)
    grid = torch.tensor([prepared.grid_thw], device=dev)
    return engine.adapter.rope_index(ids, torch.ones_like(ids), grid)[:, 0].cpu().numpy()


def build_zoom_batch(
    engine: QZoomEngine, items: Sequence[tuple[ZoomRequest, PreparedRoi]], reuse_prefix: bool
) -> ZoomBatch:
    a = engine.adapter
    dev = engine.device
    layouts, ids, positions = [], [], []
    for req, roi in items:
        p = req.prepared
        layout = geometry.splice_layout(len(p.input_ids), p.image_start, p.num_image_tokens, roi.num_tokens)
        layouts.append(layout)
        ids.append(
            geometry.splice_token_ids(
                p.input_ids, layout, engine.vision_start_id, engine.vision_end_id, engine.image_token_id
            )
        )
        positions.append(
            geometry.roi_position_ids(
                coarse_positions(engine, p),
                layout,
                p.image_start,
                p.merged_grid,
                roi.merged_grid,
                req.box_grid,
                aligned=engine.reuse_src_pos,
            )
        )

    # ViT: RoI crops always; the global view only for rows that arrive without a prefix state.
    roi_grid = torch.tensor([roi.grid_thw for _, roi in items], device=dev)
    roi_pixels = torch.from_numpy(np.concatenate([roi.pixel_values for _, roi in items])).to(dev)
    roi_feats = a.encode_images(roi_pixels, roi_grid)
    need_global = [i for i, (req, _) in enumerate(items) if req.prefix is None]
    global_feats: dict[int, torch.Tensor] = {i: req.prefix.global_features for i, (req, _) in enumerate(items) if req.prefix is not None}
    if need_global:
        preps = [items[i][0].prepared for i in need_global]
        grid = torch.tensor([p.grid_thw for p in preps], device=dev)
        pixels = torch.from_numpy(np.concatenate([p.pixel_values for p in preps])).to(dev)
        global_feats.update(zip(need_global, a.encode_images(pixels, grid), strict=True))

    width = max(lay.total_len for lay in layouts)
    bsz = len(items)
    offsets = [width - lay.total_len for lay in layouts]
    input_ids = torch.full((bsz, width), engine.pad_id, dtype=torch.long)
    mask = torch.zeros((bsz, width), dtype=torch.long)
    pos = torch.zeros((3, bsz, width), dtype=torch.float32)
    for b, (row_ids, row_pos, off) in enumerate(zip(ids, positions, offsets, strict=True)):
        input_ids[b, off:] = torch.tensor(row_ids, dtype=torch.long)
        mask[b, off:] = 1
        pos[:, b, off:] = torch.from_numpy(row_pos.astype(np.float32))
    input_ids, mask, pos = input_ids.to(dev), mask.to(dev), pos.to(dev)

    embeds = a.embed_tokens(input_ids)
    feats = [t for i in range(bsz) for t in (global_feats[i], roi_feats[i])]
    embeds = embeds.masked_scatter(
        (input_ids == engine.image_token_id).unsqueeze(-1), torch.cat(feats).to(embeds.dtype)
    )

    cache = a.new_cache()
    cached_width, cached_hidden = 0, None
    if reuse_prefix and not need_global:
        new_width = max(lay.total_len - lay.prefix_len for lay in layouts)
        cached_width = width - new_width
    if cached_width > 0:
        prefixes = [req.prefix for req, _ in items]
        kv = {}
        for layer in range(engine.K):
            k = left_aligned_prefix([pr.kv[layer][0] for pr in prefixes], offsets, cached_width, seq_dim=1)
            v = left_aligned_prefix([pr.kv[layer][1] for pr in prefixes], offsets, cached_width, seq_dim=1)
            kv[layer] = (k, v)
        fill_cache(cache, kv)
        cached_hidden = left_aligned_prefix([pr.hidden_k for pr in prefixes], offsets, cached_width, seq_dim=0)
    return ZoomBatch(input_ids, mask, embeds, pos, cache, cached_width, cached_hidden)
