"""Turning (image, question, answer) samples into supervised Qwen2.5-VL batches.

Only the answer tokens (and the closing ``<|im_end|>``) carry loss; the prompt, image and padding
are masked with -100, as in the authors' ``preprocess_qwen_visual``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qzoom_ray.model.processor import build_prompt, image_size_kwargs

IGNORE_INDEX = -100
TOKEN_PX = 28


@dataclass
class TrainSample:
    image: Any  # RGB PIL image
    question: str
    answer: str
    budget_tokens: int  # the view is processed with min = max = budget * 28**2 pixels


SampleFn = Callable[[np.random.Generator], TrainSample]


def encode_sample(processor: Any, sample: TrainSample) -> dict[str, Any]:
    prompt = build_prompt(processor, sample.question)
    px = sample.budget_tokens * TOKEN_PX**2
    out = processor(text=[prompt], images=[sample.image], return_tensors="np", **image_size_kwargs(px, px))
    prompt_ids = np.asarray(out["input_ids"][0], dtype=np.int64)
    # The template ends the assistant turn with "<|im_end|>\n"; the "\n" is glue, not a target.
    answer_ids = np.asarray(
        processor.tokenizer(sample.answer + "<|im_end|>", add_special_tokens=False)["input_ids"], dtype=np.int64
    )
    ids = np.concatenate([prompt_ids, answer_ids])
    labels = np.full_like(ids, IGNORE_INDEX)
    labels[len(prompt_ids) :] = answer_ids
    return {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": np.asarray(out["pixel_values"], dtype=np.float32),
        "image_grid_thw": np.asarray(out["image_grid_thw"][0], dtype=np.int64),
    }


def collate(encoded: list[dict[str, Any]], pad_id: int, image_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch for teacher-forced training (positions come from the attention mask)."""
    width = max(len(e["input_ids"]) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for b, e in enumerate(encoded):
        n = len(e["input_ids"])
        ids[b, :n] = torch.from_numpy(e["input_ids"])
        labels[b, :n] = torch.from_numpy(e["labels"])
        mask[b, :n] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": torch.from_numpy(np.concatenate([e["pixel_values"] for e in encoded])),
        "image_grid_thw": torch.from_numpy(np.stack([e["image_grid_thw"] for e in encoded])),
        "mm_token_type_ids": (ids == image_token_id).to(torch.int32),
    }


def batch_stream(
    sample_fn: SampleFn, processor: Any, batch_size: int, seed: int, rank: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches; each worker rank draws from its own seeded stream (reproducible per seed)."""
    rng = np.random.default_rng([seed, rank])
    tok = processor.tokenizer
    image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    while True:
        encoded = [encode_sample(processor, sample_fn(rng)) for _ in range(batch_size)]
        yield collate(encoded, int(tok.pad_token_id), image_token_id)
