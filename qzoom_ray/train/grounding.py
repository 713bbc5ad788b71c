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


@dataclass(frozen=True)
class Grounding:
    """The object one question turn names: its word (one token) and its box in the view's pixels."""

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


def word_token_id(tokenizer, word: str) -> int:
    """The single token of ``word`` as it appears mid-sentence (after a space)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"grounding word {word!r} is {len(ids)} tokens; it must be one")
    return int(ids[0])


def split_grounding(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Remove the grounding targets from a collated batch (the model takes no such inputs):
    (rows, keys, centres), or None when the batch has none."""
    rows = batch.pop(GROUNDING_ROWS, None)
    keys = batch.pop(GROUNDING_KEYS, None)
    centres = batch.pop(GROUNDING_CENTRES, None)
    return None if rows is None else (rows, keys, centres)


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

    def bind(self, batch: dict[str, torch.Tensor], targets: tuple | None) -> bool:
        """Take this batch's targets (from :func:`split_grounding`); False when it has none."""
        if targets is None:
            return False
        self.set_targets(targets[0], targets[1], batch["attention_mask"])
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


class PlaceReadout(nn.Module):
    """A train-only linear head on the hidden states after one decoder layer, predicting a place in the
    view as (x, y) fractions; while entered, a forward hook on that layer leaves the squared error on
    the rows :meth:`_pick` chooses in :attr:`loss`. Not part of the model, never saved."""

    def __init__(self, layers: nn.ModuleList, layer: int, hidden_size: int):
        super().__init__()
        if not 0 <= layer < len(layers):
            raise ValueError(f"read-out layer {layer} does not exist (the model has {len(layers)})")
        self.layers = [layers]  # a list, so the decoder's parameters are not registered as this head's
        self.layer = int(layer)
        self.head = nn.Linear(hidden_size, 2)
        self.loss: torch.Tensor | None = None
        self._handle = None

    def __enter__(self) -> PlaceReadout:
        self._handle = self.layers[0][self.layer].register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = None

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        # Normalised first: the residual stream's scale grows with depth and would saturate the sigmoid.
        hidden = hidden.to(self.head.weight.dtype)
        return torch.sigmoid(self.head(nn.functional.layer_norm(hidden, hidden.shape[-1:])))

    def _pick(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(states, target places) of this batch, or None when there is nothing to supervise."""
        raise NotImplementedError

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
        picked = self._pick(output[0] if isinstance(output, tuple) else output)
        if picked is not None:
            states, places = picked
            self.loss = ((self.predict(states) - places.to(states.device, torch.float32)) ** 2).sum(-1).mean()


class LocationReadout(PlaceReadout):
    """Where is the object the question names? From the named word's hidden state after one decoder
    layer, the object's box centre; :attr:`loss` is the squared error, the mean over the groundings.

    Why: the side of the image a visual token lies on is computed in decoder layer 0 (linear probes on
    the image tokens: 0.72-0.84), and the grounded head of layer 1 looks the named shape up from its
    word, yet the word's own state never came to carry the side (a probe on it: 0.56-0.69, majority
    0.56), so "Is the red star on the left or the right?" stayed at the majority answer.
    """

    def __init__(self, layers: nn.ModuleList, layer: int, hidden_size: int):
        super().__init__(layers, layer, hidden_size)
        self._targets: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_targets(self, rows: torch.Tensor, centres: torch.Tensor) -> None:
        self._targets = (rows, centres)
        self.loss = None

    def bind(self, batch: dict[str, torch.Tensor], targets: tuple | None) -> bool:
        if targets is None or targets[2] is None:
            return False
        self.set_targets(targets[0], targets[2])
        return True

    def _pick(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._targets is None or len(self._targets[0]) == 0:
            return None
        rows, centres = self._targets
        return hidden[rows[:, 0], rows[:, 1]], centres


def image_token_xy(
    input_ids: torch.Tensor, grid_thw: torch.Tensor, image_token_id: int, merge: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch rows, positions, (x, y) centres as fractions of the view) of every visual token, one image
    per batch row; the merged tokens run row-major over the merged grid, as the processor orders them."""
    rows, pos, xy = [], [], []
    for b in range(input_ids.shape[0]):
        where = (input_ids[b] == image_token_id).nonzero(as_tuple=True)[0]
        h, w = int(grid_thw[b, 1]) // merge, int(grid_thw[b, 2]) // merge
        if len(where) != h * w:
            raise ValueError(f"batch row {b} has {len(where)} image tokens for a {h}x{w} merged grid (one image per row)")
        i = torch.arange(h * w, device=input_ids.device)
        rows.append(torch.full_like(where, b))
        pos.append(where)
        xy.append(torch.stack([(i % w + 0.5) / w, (i // w + 0.5) / h], -1))
    return torch.cat(rows), torch.cat(pos), torch.cat(xy).float()


class TokenPositionReadout(PlaceReadout):
    """Self-supervised: every visual token's hidden state after one decoder layer predicts where that
    token lies in the view; :attr:`loss` is the mean squared error over the batch's visual tokens.

    Why: Qwen2.5-VL's visual tokens carry no absolute position, only rotary (relative) phases; the side
    of the image a token is on must be computed by the decoder (attending to the text before the image
    at a column-dependent phase). The tiny base computed it only weakly (a linear probe for the half:
    0.72-0.84 per token), too weakly for a looked-up shape to carry it to the answer. No labels are
    needed: the grid is the target.
    """

    def __init__(self, layers: nn.ModuleList, layer: int, hidden_size: int, image_token_id: int):
        super().__init__(layers, layer, hidden_size)
        self.image_token_id = int(image_token_id)
        self._targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def bind(self, batch: dict[str, torch.Tensor], targets: tuple | None = None) -> bool:
        if "image_grid_thw" not in batch or not bool((batch["input_ids"] == self.image_token_id).any()):
            return False
        self._targets = image_token_xy(batch["input_ids"], batch["image_grid_thw"], self.image_token_id)
        self.loss = None
        return True

    def _pick(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._targets is None:
            return None
        rows, pos, xy = self._targets
        return hidden[rows, pos], xy


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
