"""Grounding supervision for the base model: one decoder head learns to look up the object a question names.

Why: the tiny base's visual tokens carry shape and colour (linear probes, docs/benchmark.md), yet
through the answer token alone the decoder never learned the lookup from the shape word in "What
colour is the diamond?" to the diamond's tokens; its answers stayed at "a colour somewhere in the
image". A real MLLM brings that lookup from grounding data in its pretraining. Here a small auxiliary
loss teaches it directly: from the position of the named object's word, the attention of one head of
one layer should fall on the visual tokens the object covers, ``-log(mass on those tokens)``.
Supervising layer 0 at the word itself (its query is the word's own embedding) learns in a few
hundred CPU steps what supervising the answer position did not learn at all (docs/benchmark.md).

The probabilities come from the layer's own q/k projections and rotary embedding in a forward
pre-hook (as :mod:`qzoom_ray.train.attention` does for stage-1 labels), so the model keeps its fast
attention kernel and only the supervised rows are recomputed, with gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qzoom_ray.geometry import PixelBox
from qzoom_ray.train.attention import row_attention_probs

GROUNDING_ROWS = "grounding_rows"  # (N, 2) long: batch row, query position
GROUNDING_KEYS = "grounding_keys"  # (N, T) bool: the target key positions of each pair
GROUNDING_CENTRES = "grounding_centres"  # (N, 2) float: the object's box centre, (x, y) fractions of the view
COUNT_ROWS = "count_rows"  # (M, 2) long: batch row, position of the counted word
COUNT_VALUES = "count_values"  # (M,) float: how many of them the view shows
OBJECT_CENTRES = "object_centres"  # (V,) float over every visual token, row by row: 1 where an object's
# centre falls in the token's cell, 0 elsewhere, -1 in a row with no object targets
TARGET_KEYS = (GROUNDING_ROWS, GROUNDING_KEYS, GROUNDING_CENTRES, COUNT_ROWS, COUNT_VALUES, OBJECT_CENTRES)


@dataclass(frozen=True)
class Grounding:
    """The object one question turn names: its word (its last token is the query) and its box in the
    view's pixels."""

    word: str
    box: PixelBox


def box_token_cells(
    box: PixelBox, view_wh: tuple[int, int], merged_hw: tuple[int, int], min_overlap: float = 0.25
) -> np.ndarray:
    """Row-major bool mask over the merged visual-token grid: the cells the box covers.

    A cell counts when the box covers at least ``min_overlap`` of it; a box too small to cover any
    cell that much gets the cell under its centre, so every grounding has a target.
    """
    h, w = merged_hw
    vw, vh = view_wh
    if vw <= 0 or vh <= 0 or h <= 0 or w <= 0:
        raise ValueError(f"empty view {view_wh} or grid {merged_hw}")
    # The processor resizes the whole view onto the grid, so cell units are view pixels * grid / view.
    x0, x1 = box[0] * w / vw, box[2] * w / vw
    y0, y1 = box[1] * h / vh, box[3] * h / vh
    cols, rows = np.arange(w), np.arange(h)
    cover_x = np.clip(np.minimum(cols + 1, x1) - np.maximum(cols, x0), 0, None)
    cover_y = np.clip(np.minimum(rows + 1, y1) - np.maximum(rows, y0), 0, None)
    mask = np.outer(cover_y, cover_x) >= min_overlap
    if not mask.any():
        cy = min(h - 1, max(0, math.floor((y0 + y1) / 2)))
        cx = min(w - 1, max(0, math.floor((x0 + x1) / 2)))
        mask[cy, cx] = True
    return mask.reshape(-1)


def box_centre(box: PixelBox, view_wh: tuple[int, int]) -> tuple[float, float]:
    """The box's centre as (x, y) fractions of the view, clipped to [0, 1]."""
    vw, vh = view_wh
    if vw <= 0 or vh <= 0:
        raise ValueError(f"empty view {view_wh}")
    cx = (box[0] + box[2]) / 2 / vw
    cy = (box[1] + box[3]) / 2 / vh
    return (min(1.0, max(0.0, float(cx))), min(1.0, max(0.0, float(cy))))


def word_token_ids(tokenizer, word: str) -> list[np.ndarray]:
    """The token ids ``word`` can have in a prompt: after a space ("the star"), then on its own (after
    punctuation, as in "the value of 'Cash'"), in that order of preference."""
    return [np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
            for text in (" " + word, word)]


def last_word_position(tokenizer, ids: np.ndarray, word: str) -> int:
    """Index in ``ids`` of the last token of the last occurrence of ``word``: for a word of several
    tokens, the one whose state has seen all of it."""
    for pattern in word_token_ids(tokenizer, word):
        n = len(pattern)
        if n == 0 or n > len(ids):
            continue
        windows = np.lib.stride_tricks.sliding_window_view(ids, n)
        hits = np.nonzero((windows == pattern).all(axis=1))[0]
        if len(hits):
            return int(hits[-1] + n - 1)
    raise ValueError(f"the prompt does not contain {word!r}")


def split_targets(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the auxiliary targets (the ``TARGET_KEYS`` the batch has) from a collated batch, since the
    model takes no such inputs, and return them."""
    return {key: batch.pop(key) for key in TARGET_KEYS if key in batch}


class GroundingLoss:
    """Context manager: while active, every forward of the model computes the grounding loss of the
    targets passed to :meth:`set_targets` on each supervised (layer, head), and leaves their mean in
    :attr:`loss`. Several heads let a later layer look the object up again once the visual tokens
    carry what one layer cannot give them (e.g. which side of the image they are on)."""

    def __init__(self, layers: nn.ModuleList, heads: list[tuple[int, int]]):
        if not heads:
            raise ValueError("grounding needs at least one (layer, head)")
        for layer, head in heads:
            if not 0 <= layer < len(layers):
                raise ValueError(f"grounding layer {layer} does not exist (the model has {len(layers)})")
            n_heads = layers[layer].self_attn.config.num_attention_heads
            if not 0 <= head < n_heads:
                raise ValueError(f"grounding head {head} does not exist (layer {layer} has {n_heads})")
        self.layers = layers
        self.heads = [(int(layer), int(head)) for layer, head in heads]
        self.loss: torch.Tensor | None = None
        self._per_head: list[torch.Tensor] = []
        self._targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._handles: list = []

    def set_targets(self, rows: torch.Tensor, keys: torch.Tensor, pad_mask: torch.Tensor) -> None:
        self._targets = (rows, keys, pad_mask)
        self._per_head = []
        self.loss = None

    def bind(self, batch: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> bool:
        """Take this batch's targets (from :func:`split_targets`); False when it has none."""
        if GROUNDING_ROWS not in targets:
            return False
        self.set_targets(targets[GROUNDING_ROWS], targets[GROUNDING_KEYS], batch["attention_mask"])
        return True

    def __enter__(self) -> GroundingLoss:
        for layer in sorted({layer for layer, _ in self.heads}):
            heads = [h for lay, h in self.heads if lay == layer]
            self._handles.append(self.layers[layer].self_attn.register_forward_pre_hook(
                self._hook(heads), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, heads: list[int]):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._targets is None or len(self._targets[0]) == 0:
                return
            rows, keys, pad = self._targets
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            for head in heads:
                probs = head_row_probs(module, hidden, cos, sin, head, rows[:, 0], rows[:, 1], pad)
                mass = (probs * keys[:, : probs.shape[1]].to(probs.dtype)).sum(-1)
                self._per_head.append(-torch.log(mass + 1e-6).mean())
            self.loss = torch.stack(self._per_head).mean()

        return hook


def head_row_probs(
    attn: nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    head: int,
    batch_idx: torch.Tensor,
    query_pos: torch.Tensor,
    pad_mask: torch.Tensor,
) -> torch.Tensor:
    """Differentiable causal softmax attention of one head: one row per (batch row, query position), (N, S)."""
    out = hidden.new_zeros((len(batch_idx), hidden.shape[1]), dtype=torch.float32)
    for b in torch.unique(batch_idx).tolist():
        sel = (batch_idx == b).nonzero(as_tuple=True)[0]
        probs = row_attention_probs(attn, hidden[b], cos[b], sin[b], [head], query_pos[sel], pad_mask[b])
        out = out.index_put((sel,), probs[0])
    return out
