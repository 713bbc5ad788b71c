"""Training samples for the tiny base model, drawn on the fly from the synthetic benchmark.

A real MLLM reads small text when the pixel budget makes it at least about one visual token tall,
and guesses otherwise. To learn reading cheaply on CPU we mostly train on *views*: crops around
the evidence, resized so the fine text lands at 1.0-1.6 tokens high at a small budget, which is
exactly what a large image looks like to the model at a high budget. Coarse questions use the
full image at low budgets, and a small share of fine questions use the full image at a larger
budget so the model also learns to search a long sequence of visual tokens.
"""

from __future__ import annotations

import math

import numpy as np

from qzoom_ray.synth.generator import render_record
from qzoom_ray.synth.vocab import TEMPLATES, vocabulary
from qzoom_ray.train.data import TrainSample

TOKEN_PX = 28


def crop_around(box: tuple[int, int, int, int], image_wh: tuple[int, int], side_wh: tuple[float, float],
                rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A window of about ``side_wh`` that contains ``box``, placed at a random offset, inside the image."""
    w, h = image_wh
    x0, y0, x1, y1 = box
    cw = int(min(w, max(side_wh[0], x1 - x0)))
    ch = int(min(h, max(side_wh[1], y1 - y0)))
    lo_x, hi_x = max(0, x1 - cw), min(x0, w - cw)
    lo_y, hi_y = max(0, y1 - ch), min(y0, h - ch)
    cx = int(rng.integers(lo_x, max(lo_x, hi_x) + 1))
    cy = int(rng.integers(lo_y, max(lo_y, hi_y) + 1))
    return cx, cy, cx + cw, cy + ch


def make_sample_fn(
    budgets: tuple[int, ...] = (64, 128, 256),
    crop_prob: float = 0.75,
    full_fine_budget: int = 576,
    glyph_tokens: tuple[float, float] = (1.0, 1.6),
):
    def sample(rng: np.random.Generator) -> TrainSample:
        rec = render_record(int(rng.integers(2**31)), split="ordinary")
        budget = int(budgets[int(rng.integers(len(budgets)))])
        image = rec.image
        if rec.question_type == "fine":
            if rng.random() < crop_prob:
                # Scale s so that the glyph is `target` px tall after the resize to `budget` tokens.
                target = float(rng.uniform(*glyph_tokens)) * TOKEN_PX
                scale = min(1.0, target / max(rec.glyph_px, 1))
                area = budget * TOKEN_PX**2 / (scale * scale)
                aspect = float(np.exp(rng.uniform(math.log(0.6), math.log(1.7))))
                side = (math.sqrt(area * aspect), math.sqrt(area / aspect))
                image = image.crop(crop_around(rec.evidence_box, (image.width, image.height), side, rng))
            else:
                budget = full_fine_budget
        return TrainSample(image=image, question=rec.question, answer=rec.answer, budget_tokens=budget)

    return sample


def tokenizer_corpus() -> list[str]:
    vocab = vocabulary()
    lines = [" ".join(vocab.words), " ".join(vocab.answers), vocab.characters]
    lines += [t.replace("{options}", "A. red\nB. blue\nC. green\nD. yellow") for t in TEMPLATES.values()]
    return lines
