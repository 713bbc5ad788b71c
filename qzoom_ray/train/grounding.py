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


class HiddenStateReadout(nn.Module):
    """A train-only linear head on the hidden states after one decoder layer; while entered, a forward
    hook on that layer leaves the loss of the rows :meth:`_pick` chooses in :attr:`loss`. Not part of
    the model, never saved: it only shapes what that layer's states carry."""

    def __init__(self, layers: nn.ModuleList, layer: int, hidden_size: int, out_features: int):
        super().__init__()
        if not 0 <= layer < len(layers):
            raise ValueError(f"read-out layer {layer} does not exist (the model has {len(layers)})")
        self.layers = [layers]  # a list, so the decoder's parameters are not registered as this head's
        self.layer = int(layer)
        self.head = nn.Linear(hidden_size, out_features)
        self.loss: torch.Tensor | None = None
        self._handle = None

    def __enter__(self) -> HiddenStateReadout:
        self._handle = self.layers[0][self.layer].register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = None

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        # Normalised first: the residual stream's scale grows with depth and would saturate the output.
        hidden = hidden.to(self.head.weight.dtype)
        return self.head(nn.functional.layer_norm(hidden, hidden.shape[-1:]))

    def _pick(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(states, targets) of this batch, or None when there is nothing to supervise."""
        raise NotImplementedError

    def _loss(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
        picked = self._pick(output[0] if isinstance(output, tuple) else output)
        if picked is not None:
            states, targets = picked
            self.loss = self._loss(states, targets.to(states.device, torch.float32))


class PlaceReadout(HiddenStateReadout):
    """A read-out of a place in the view as (x, y) fractions: sigmoid outputs, squared error."""

    def __init__(self, layers: nn.ModuleList, layer: int, hidden_size: int):
        super().__init__(layers, layer, hidden_size, 2)

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.features(hidden))

    def _loss(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((self.predict(states) - targets) ** 2).sum(-1).mean()


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

    def bind(self, batch: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> bool:
        if GROUNDING_CENTRES not in targets:
            return False
        self.set_targets(targets[GROUNDING_ROWS], targets[GROUNDING_CENTRES])
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

    def bind(self, batch: dict[str, torch.Tensor], targets: dict[str, torch.Tensor] | None = None) -> bool:
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


class CountReadout(HiddenStateReadout):
    """How many are there? From the counted word's state ("stamps" in "How many stamps are on the
    page?") after one decoder layer, the number the view shows; :attr:`loss` is the squared error in
    objects, the mean over the batch's count questions.

    Why: the tiny base's counts at Max-64 were off by one a third of the time (stamps 63 %, shapes
    84 %), over- and under-counting alike: through the answer token alone, three layers never settled
    on one way to count. A target at the counted word, one layer earlier, asks the layer's attention
    from that word to carry the count (as the location read-out asked it to carry the side).
    """

    def __init__(self, layers: nn.ModuleList, layer: int, hidden_size: int):
        super().__init__(layers, layer, hidden_size, 1)
        self._targets: tuple[torch.Tensor, torch.Tensor] | None = None

    def bind(self, batch: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> bool:
        if COUNT_ROWS not in targets:
            return False
        self._targets = (targets[COUNT_ROWS], targets[COUNT_VALUES])
        self.loss = None
        return True

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.features(hidden)[..., 0]

    def _pick(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._targets is None or len(self._targets[0]) == 0:
            return None
        rows, counts = self._targets
        return hidden[rows[:, 0], rows[:, 1]], counts

    def _loss(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((self.predict(states) - targets) ** 2).mean()


def object_centre_cells(boxes: list[PixelBox], view_wh: tuple[int, int], merged_hw: tuple[int, int]) -> np.ndarray:
    """Row-major float mask over the merged visual-token grid: 1 at the cell under each box's centre."""
    h, w = merged_hw
    mask = np.zeros((h, w), dtype=np.float32)
    for box in boxes:
        cx, cy = box_centre(box, view_wh)
        mask[min(h - 1, int(cy * h)), min(w - 1, int(cx * w))] = 1.0
    return mask.reshape(-1)


class ObjectCentreReadout(HiddenStateReadout):
    """Self-supervised from the renderer: every visual token's state after one decoder layer says whether
    a counted object's centre lies in its cell (binary cross-entropy over the tokens of the rows that
    carry object targets).

    Why: a stamp or shape covers several tokens at most budgets, so attention that adds up "object
    here" counts pieces, not objects; one token per object, marked where the next layer can read it,
    is what a count can be summed from.
    """

    def __init__(self, layers: nn.ModuleList, layer: int, hidden_size: int, image_token_id: int):
        super().__init__(layers, layer, hidden_size, 1)
        self.image_token_id = int(image_token_id)
        self._targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def bind(self, batch: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> bool:
        if OBJECT_CENTRES not in targets:
            return False
        rows, pos, _ = image_token_xy(batch["input_ids"], batch["image_grid_thw"], self.image_token_id)
        centres = targets[OBJECT_CENTRES]
        if len(centres) != len(rows):
            raise ValueError(f"{len(centres)} object-centre targets for {len(rows)} visual tokens")
        keep = centres >= 0
        if not bool(keep.any()):
            return False
        self._targets = (rows[keep], pos[keep], centres[keep])
        self.loss = None
        return True

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.features(hidden)[..., 0])

    def _pick(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._targets is None:
            return None
        rows, pos, centres = self._targets
        return hidden[rows, pos], centres

    def _loss(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(self.features(states)[..., 0], targets)


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
