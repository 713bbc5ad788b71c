"""Turning (image, questions, answers) samples into supervised Qwen2.5-VL batches.

A sample is one image with one or more question/answer turns: the first user turn carries the
image, later turns only text (an ordinary multi-turn chat). Every answer (and its closing
``<|im_end|>``) carries loss; the prompt, image and padding are masked with -100, as in the
authors' ``preprocess_qwen_visual``. Several questions per image multiply the supervision bought by
one pass over the visual tokens, which dominate the cost of a step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qzoom_ray.geometry import PixelBox
from qzoom_ray.model.processor import build_prompt, image_size_kwargs
from qzoom_ray.train.grounding import (
    COUNT_ROWS,
    COUNT_VALUES,
    GROUNDING_CENTRES,
    GROUNDING_KEYS,
    GROUNDING_ROWS,
    OBJECT_CENTRES,
    Grounding,
    box_centre,
    box_token_cells,
    last_word_position,
)
from qzoom_ray.train.readouts import object_centre_cells

IGNORE_INDEX = -100
TOKEN_PX = 28


@dataclass
class TrainSample:
    image: Any  # RGB PIL image
    question: str
    answer: str
    budget_tokens: int  # the view is processed with min = max = budget * 28**2 pixels
    more_turns: list[tuple[str, str]] = field(default_factory=list)  # later (question, answer) turns
    # Per turn (first, then more_turns), the object the question names, for grounding supervision
    # (qzoom_ray.train.grounding); empty, or one entry per turn with None where nothing is named.
    groundings: list[Grounding | None] = field(default_factory=list)
    # Per turn, (the counted word, how many the view shows) where the question asks for a count, for the
    # count read-out; empty, or one entry per turn with None elsewhere.
    counts: list[tuple[str, int] | None] = field(default_factory=list)
    # The boxes (view pixels) of every countable object in the view, for the object-centre read-out;
    # None: no such targets ([] is a target: nothing to count here).
    objects: list[PixelBox] | None = None


SampleFn = Callable[[np.random.Generator], TrainSample]


def _ids(tokenizer: Any, text: str) -> np.ndarray:
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def encode_sample(processor: Any, sample: TrainSample) -> dict[str, Any]:
    prompt = build_prompt(processor, sample.question)
    px = sample.budget_tokens * TOKEN_PX**2
    out = processor(text=[prompt], images=[sample.image], return_tensors="np", **image_size_kwargs(px, px))
    tok = processor.tokenizer
    pieces = [(np.asarray(out["input_ids"][0], dtype=np.int64), False)]
    # The template ends an assistant turn with "<|im_end|>\n"; the "\n" is glue, not a target.
    pieces.append((_ids(tok, sample.answer + "<|im_end|>"), True))
    for question, answer in sample.more_turns:
        pieces.append((_ids(tok, f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"), False))
        pieces.append((_ids(tok, answer + "<|im_end|>"), True))
    ids = np.concatenate([p for p, _ in pieces])
    labels = np.concatenate([p if target else np.full_like(p, IGNORE_INDEX) for p, target in pieces])
    encoded = {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": np.asarray(out["pixel_values"], dtype=np.float32),
        "image_grid_thw": np.asarray(out["image_grid_thw"][0], dtype=np.int64),
    }
    if sample.groundings:
        encoded["grounding"] = grounding_pairs(tok, sample, pieces, encoded["image_grid_thw"])
    if sample.counts:
        encoded["count"] = count_pairs(tok, sample, pieces)
    if sample.objects is not None:
        merge = 2  # Qwen2.5-VL merges 2x2 patches into one visual token
        grid = encoded["image_grid_thw"]
        encoded["object_centres"] = object_centre_cells(
            sample.objects, sample.image.size, (int(grid[1]) // merge, int(grid[2]) // merge))
    return encoded


def _word_position(tokenizer: Any, pieces: list[tuple[np.ndarray, bool]], turn: int, word: str) -> int:
    """Position in the whole sequence of the last occurrence of ``word`` in ``turn``'s prompt piece."""
    prompt_piece = 2 * turn  # pieces alternate prompt, answer
    try:
        hit = last_word_position(tokenizer, pieces[prompt_piece][0], word)
    except ValueError:
        raise ValueError(f"turn {turn} names {word!r} but its prompt does not contain it") from None
    return int(sum(len(p) for p, _ in pieces[:prompt_piece]) + hit)


def count_pairs(tokenizer: Any, sample: TrainSample, pieces: list[tuple[np.ndarray, bool]]) -> list[tuple[int, int]]:
    """(position of the counted word, count) per counting turn: the count read-out's targets."""
    turns = 1 + len(sample.more_turns)
    if len(sample.counts) != turns:
        raise ValueError(f"{len(sample.counts)} counts for {turns} turns; give one per turn (None allowed)")
    return [(_word_position(tokenizer, pieces, turn, c[0]), int(c[1]))
            for turn, c in enumerate(sample.counts) if c is not None]


def grounding_pairs(
    tokenizer: Any, sample: TrainSample, pieces: list[tuple[np.ndarray, bool]], grid_thw: np.ndarray
) -> list[tuple[int, np.ndarray]]:
    """(query position, target key positions, box centre) per grounded turn: the last occurrence of the
    named word in that turn's prompt piece, the image tokens the object's box covers, and the box's
    centre as (x, y) fractions of the view (the location read-out's target)."""
    turns = 1 + len(sample.more_turns)
    if len(sample.groundings) != turns:
        raise ValueError(f"{len(sample.groundings)} groundings for {turns} turns; give one per turn (None allowed)")
    image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = 2  # Qwen2.5-VL merges 2x2 patches into one visual token
    merged_hw = (int(grid_thw[1]) // merge, int(grid_thw[2]) // merge)
    image_pos = np.nonzero(pieces[0][0] == image_token_id)[0]
    out = []
    for turn, grounding in enumerate(sample.groundings):
        if grounding is None:
            continue
        cells = box_token_cells(grounding.box, sample.image.size, merged_hw)
        out.append((_word_position(tokenizer, pieces, turn, grounding.word), image_pos[cells],
                    box_centre(grounding.box, sample.image.size)))
    return out


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
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": torch.from_numpy(np.concatenate([e["pixel_values"] for e in encoded])),
        "image_grid_thw": torch.from_numpy(np.stack([e["image_grid_thw"] for e in encoded])),
        "mm_token_type_ids": (ids == image_token_id).to(torch.int32),
    }
    pairs = [(b, q, keys, centre) for b, e in enumerate(encoded) for q, keys, centre in e.get("grounding", [])]
    if pairs:  # tensors, so that data workers and to_device pass them through like the rest
        batch[GROUNDING_ROWS] = torch.tensor([[b, q] for b, q, _, _ in pairs], dtype=torch.long)
        batch[GROUNDING_KEYS] = torch.zeros((len(pairs), width), dtype=torch.bool)
        for i, (_, _, keys, _) in enumerate(pairs):
            batch[GROUNDING_KEYS][i, torch.from_numpy(keys)] = True
        batch[GROUNDING_CENTRES] = torch.tensor([c for _, _, _, c in pairs], dtype=torch.float32)
    counts = [(b, q, n) for b, e in enumerate(encoded) for q, n in e.get("count", [])]
    if counts:
        batch[COUNT_ROWS] = torch.tensor([[b, q] for b, q, _ in counts], dtype=torch.long)
        batch[COUNT_VALUES] = torch.tensor([n for _, _, n in counts], dtype=torch.float32)
    if any("object_centres" in e for e in encoded):  # per visual token, in image_token_xy's order
        batch[OBJECT_CENTRES] = torch.from_numpy(np.concatenate([
            e["object_centres"] if "object_centres" in e
            else np.full(int(np.prod(e["image_grid_thw"])) // 4, -1.0, dtype=np.float32)
            for e in encoded]))
    return batch


def pack_by_length(lengths: list[int], max_tokens: int, max_batch: int) -> list[list[int]]:
    """Group sample indices into batches of similar length whose padded size stays within ``max_tokens``.

    Sorting by length before cutting keeps padding small; a sample longer than ``max_tokens`` still
    gets a batch of its own, so nothing is dropped.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Ascending order: the sample being added is the batch's longest, so it sets the padded width.
        if current and (lengths[i] * (len(current) + 1) > max_tokens or len(current) >= max_batch):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def batch_stream(
    sample_fn: SampleFn,
    processor: Any,
    batch_size: int,
    seed: int,
    rank: int = 0,
    max_tokens: int | None = None,
    pool_batches: int = 8,
    substream: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches; each worker rank (and each data worker of a rank, ``substream``) draws from its
    own seeded stream (reproducible per seed).

    With ``max_tokens`` the stream draws ``pool_batches * batch_size`` samples at a time and packs
    them by length (at most ``batch_size`` per batch), so short and long views do not share padding.
    """
    rng = np.random.default_rng([seed, rank] if substream is None else [seed, rank, substream])
    tok = processor.tokenizer
    image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    pad_id = int(tok.pad_token_id)
    while True:
        if max_tokens is None:
            yield collate([encode_sample(processor, sample_fn(rng)) for _ in range(batch_size)], pad_id, image_token_id)
            continue
        pool = [encode_sample(processor, sample_fn(rng)) for _ in range(pool_batches * batch_size)]
        groups = pack_by_length([len(e["input_ids"]) for e in pool], max_tokens, batch_size)
        for g in (groups[i] for i in rng.permutation(len(groups))):
            yield collate([pool[i] for i in g], pad_id, image_token_id)
