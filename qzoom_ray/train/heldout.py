"""Held-out checks during training: teacher-forced exact-answer accuracy per group of views.

Cheap enough to run every few hundred steps (one forward pass per view, no generation), so a long
CPU run shows early whether the model has started to read the image at all, per question type
and per view (fine text read from a crop, from the whole image at a high budget, coarse facts at
the lowest budget).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from qzoom_ray.train.data import IGNORE_INDEX, TrainSample, collate, encode_sample
from qzoom_ray.train.grounding import split_targets

TOKEN_PX = 28


def synth_heldout_views(n: int = 48, seed: int = 4242, crop_budget: int = 128, high_budget: int = 1024,
                        low_budget: int = 64, tight: bool = True) -> list[tuple[str, TrainSample]]:
    """(group, view) pairs from benchmark records never drawn in training (their own seed stream).

    Groups are ``"<view>/<template>"``: fine records as a crop read at ``crop_budget`` with the glyph
    1.3 tokens tall (and, with ``tight``, as a tight view of the evidence at that glyph size: the first
    place reading shows up), and whole at ``high_budget`` and ``low_budget``; coarse records whole at
    ``low_budget``.
    """
    from qzoom_ray.synth.generator import render_record
    from qzoom_ray.train.synth_source import crop_around, tight_window

    rng = np.random.default_rng([seed, 1])
    views: list[tuple[str, TrainSample]] = []
    for i in range(n):
        rec = render_record([seed, i], split="ordinary")
        if rec.question_type == "fine":
            scale = min(1.0, 1.3 * TOKEN_PX / max(rec.glyph_px, 1))
            side = math.sqrt(crop_budget * TOKEN_PX**2) / scale
            window = crop_around(rec.evidence_box, (rec.width, rec.height), (side, side), rng)
            views.append((f"crop{crop_budget}/{rec.template}",
                          TrainSample(rec.image.crop(window), rec.question, rec.answer, crop_budget)))
            if tight:
                window, budget = tight_window(rec, scale, (1.2, 1.2), rng)
                views.append((f"tight/{rec.template}", TrainSample(rec.image.crop(window), rec.question, rec.answer, budget)))
            views.append((f"full{high_budget}/{rec.template}", TrainSample(rec.image, rec.question, rec.answer, high_budget)))
        views.append((f"full{low_budget}/{rec.template}", TrainSample(rec.image, rec.question, rec.answer, low_budget)))
    return views


@torch.no_grad()
def teacher_forced_accuracy(model: Any, processor: Any, views: list[tuple[str, TrainSample]],
                            batch_size: int = 8) -> dict[str, float]:
    """Share of views per group whose every answer token is the argmax under teacher forcing."""
    tok = processor.tokenizer
    image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    order = sorted(range(len(views)), key=lambda i: views[i][1].budget_tokens)  # similar lengths together
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([encode_sample(processor, views[i][1]) for i in idx], int(tok.pad_token_id), image_token_id)
        labels = batch.pop("labels")
        split_targets(batch)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        pred = logits[:, :-1].argmax(-1).cpu()
        target = labels[:, 1:]
        ok = ((pred == target) | (target == IGNORE_INDEX)).all(dim=1)
        for j, i in enumerate(idx):
            hits[views[i][0]].append(bool(ok[j]))
    model.train(was_training)
    return {group: float(np.mean(v)) for group, v in sorted(hits.items())}
