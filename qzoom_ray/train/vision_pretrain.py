"""Pretraining the vision tower (patch embedding, ViT blocks, merger) on dense per-token labels.

The heads are linear maps from the merger's output (the very vectors the language model receives)
to each label set of :mod:`qzoom_ray.train.vision_source`, so what they learn to separate is
linearly available to the decoder afterwards. The heads are discarded; the checkpoint keeps the
stock Qwen2.5-VL layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from qzoom_ray.model.processor import image_size_kwargs
from qzoom_ray.train.vision_source import HEAD_CLASSES, IGNORE, DenseView

#: Weight of class 0 ("nothing here") in the sparse heads, which it would otherwise swamp.
NONE_WEIGHT = {"glyph": 0.2, "key": 0.2, "object": 1.0, "colour": 1.0}


class DenseHeads(nn.Module):
    """One linear classifier per label set over merged visual tokens."""

    def __init__(self, hidden: int, classes: dict[str, int] | None = None):
        super().__init__()
        self.classes = dict(classes or HEAD_CLASSES)
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in self.classes.items()})

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(feats) for name, head in self.heads.items()}


class VisionPretrainer(nn.Module):
    """The model's vision tower plus dense heads; ``forward(batch)`` is the summed cross-entropy."""

    def __init__(self, visual: nn.Module, hidden: int):
        super().__init__()
        self.visual = visual
        self.heads = DenseHeads(hidden)
        self.last_accuracy: dict[str, float] = {}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        logits = self.heads(feats)
        loss = feats.new_zeros(())
        acc: dict[str, float] = {}
        for name, lg in logits.items():
            y = batch[f"labels_{name}"]
            weight = torch.ones(lg.shape[-1], device=lg.device)
            weight[0] = NONE_WEIGHT.get(name, 1.0)
            loss = loss + nn.functional.cross_entropy(lg, y, weight=weight, ignore_index=IGNORE)
            positive = y > 0  # accuracy where there is something to see
            if positive.any():
                acc[name] = float((lg.argmax(-1)[positive] == y[positive]).float().mean())
        self.last_accuracy = acc
        return loss


def encode_dense_view(processor: Any, view: DenseView) -> dict[str, np.ndarray]:
    px = view.image.width * view.image.height
    out = processor.image_processor(images=[view.image], return_tensors="np", **image_size_kwargs(px, px))
    thw = np.asarray(out["image_grid_thw"][0], dtype=np.int64)
    rows, cols = next(iter(view.labels.values())).shape
    if (int(thw[1]) // 2, int(thw[2]) // 2) != (rows, cols):
        raise ValueError(f"processor resized a {view.image.size} view to grid {thw.tolist()}, labels are {rows}x{cols}")
    enc = {"pixel_values": np.asarray(out["pixel_values"], dtype=np.float32), "image_grid_thw": thw}
    # The merger emits tokens in row-major order of the merged grid, the order of the label arrays.
    enc.update({f"labels_{k}": v.reshape(-1) for k, v in view.labels.items()})
    return enc


def collate_dense(encoded: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.concatenate([e[k] for e in encoded]) if k != "image_grid_thw"
                                else np.stack([e[k] for e in encoded])) for k in encoded[0]}


def dense_batch_stream(view_fn: Callable[[np.random.Generator], DenseView], processor: Any, batch_size: int,
                       seed: int, rank: int = 0, substream: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Endless dense batches, one seeded stream per worker rank (and per data worker, ``substream``)."""
    rng = np.random.default_rng([seed, rank] if substream is None else [seed, rank, substream])
    while True:
        yield collate_dense([encode_dense_view(processor, view_fn(rng)) for _ in range(batch_size)])
