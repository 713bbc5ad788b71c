"""Shared pieces of every training forward: encoding a sample, a left-padded batch, layers 0..K-1.

Prompts are built exactly as at inference (``build_prompt``: default system prompt, no literal
``<image>`` text) so the heads are trained on the sequences they will score (fixes spec §8.13).
Batches are left-padded like the engine's, so column -1 is every row's last prompt token: the
query of the RoI map and the input of the gate (fixes the stage-2 query bug, spec §8.10).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from qzoom_ray.model.backbone import BackboneAdapter
from qzoom_ray.model.processor import build_prompt, image_size_kwargs
from qzoom_ray.train.data import IGNORE_INDEX

GRAY = (127, 127, 127)


def expand_to_square(image: Image.Image) -> tuple[Image.Image, int]:
    """The authors' ``expand2square``: centre the image on a gray square; returns (image, side)."""
    w, h = image.size
    side = max(w, h)
    if w == h:
        return image, side
    out = Image.new("RGB", (side, side), GRAY)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out, side


@dataclass
class Encoded:
    input_ids: np.ndarray  # (seq,) prompt [+ answer]
    labels: np.ndarray  # (seq,) IGNORE_INDEX except supervised answer tokens
    pixel_values: np.ndarray
    grid_thw: tuple[int, int, int]
    image_start: int
    prompt_len: int

    @property
    def merged_grid(self) -> tuple[int, int]:
        return self.grid_thw[1] // 2, self.grid_thw[2] // 2

    @property
    def num_image_tokens(self) -> int:
        h, w = self.merged_grid
        return h * w


def encode(
    processor: Any,
    image: Image.Image,
    question: str,
    budget_tokens: int,
    answer: str | None = None,
    close_answer: bool = True,
    token_px: int = 28,
) -> Encoded:
    """Prompt (+ answer tokens) with the image at exactly ``budget_tokens`` (min = max pixels)."""
    px = budget_tokens * token_px**2
    out = processor(text=[build_prompt(processor, question)], images=[image], return_tensors="np",
                    **image_size_kwargs(px, px))
    prompt = np.asarray(out["input_ids"][0], dtype=np.int64)
    ids, labels = prompt, np.full_like(prompt, IGNORE_INDEX)
    if answer is not None:
        text = answer + ("<|im_end|>" if close_answer else "")
        ans = np.asarray(processor.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        ids = np.concatenate([prompt, ans])
        labels = np.concatenate([labels, ans])
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return Encoded(
        input_ids=ids,
        labels=labels,
        pixel_values=np.asarray(out["pixel_values"], dtype=np.float32),
        grid_thw=tuple(int(v) for v in out["image_grid_thw"][0]),
        image_start=int(np.flatnonzero(prompt == image_token_id)[0]),
        prompt_len=len(prompt),
    )


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, S) left-padded
    attention_mask: torch.Tensor  # (B, S)
    labels: torch.Tensor  # (B, S)
    embeds: torch.Tensor  # (B, S, hidden), image features scattered in (no grad: the ViT is frozen)
    position_embeddings: tuple[torch.Tensor, ...]
    causal_mask: Any
    pads: list[int]
    features: list[torch.Tensor]


def left_pad(rows: list[np.ndarray], fill: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    pads = []
    for b, r in enumerate(rows):
        pad = width - len(r)
        out[b, pad:] = torch.from_numpy(np.asarray(r, dtype=np.int64))
        mask[b, pad:] = 1
        pads.append(pad)
    return out, mask, pads


@torch.no_grad()
def build_batch(adapter: BackboneAdapter, encoded: list[Encoded], pad_id: int, image_token_id: int) -> Batch:
    dev = adapter.device
    ids, mask, pads = left_pad([e.input_ids for e in encoded], pad_id)
    labels, _, _ = left_pad([e.labels for e in encoded], IGNORE_INDEX)
    ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)
    grid = torch.tensor([e.grid_thw for e in encoded], dtype=torch.long, device=dev)
    pixels = torch.from_numpy(np.concatenate([e.pixel_values for e in encoded])).to(dev)
    features = adapter.encode_images(pixels, grid)
    embeds = adapter.embed_tokens(ids)
    embeds = embeds.masked_scatter((ids == image_token_id).unsqueeze(-1), torch.cat(features).to(embeds.dtype))
    positions = adapter.rope_index(ids, mask, grid).to(torch.float32)
    pos_emb = adapter.position_embeddings(embeds, positions)
    causal = adapter.causal_mask(embeds, mask, None, 0)
    return Batch(ids, mask, labels, embeds, pos_emb, causal, pads, features)


@torch.no_grad()
def hidden_at_k(adapter: BackboneAdapter, batch: Batch, k: int) -> torch.Tensor:
    """Frozen base layers 0..K-1 (no cache): the input of both branches; nothing past layer K-1 runs."""
    return adapter.run_layers(
        batch.embeds, 0, k, position_embeddings=batch.position_embeddings, attention_mask=batch.causal_mask, cache=None
    )


def image_columns(batch: Batch, encoded: list[Encoded], b: int) -> slice:
    start = batch.pads[b] + encoded[b].image_start
    return slice(start, start + encoded[b].num_image_tokens)
