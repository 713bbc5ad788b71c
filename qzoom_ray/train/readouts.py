"""Train-only linear read-outs on the decoder's hidden states (auxiliary losses for the base model).

Each head reads the states after one decoder layer, through a forward hook, and leaves a loss that
shapes what that layer carries: where a named object is, where each visual token lies, how many
objects a question counts and where their centres are. The heads are never part of the model and
never saved. Their targets travel in the batch under the keys of :mod:`qzoom_ray.train.grounding`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qzoom_ray.geometry import PixelBox
from qzoom_ray.train.grounding import (
    COUNT_ROWS,
    COUNT_VALUES,
    GROUNDING_CENTRES,
    GROUNDING_ROWS,
    OBJECT_CENTRES,
    box_centre,
)


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
