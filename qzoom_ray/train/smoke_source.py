"""A trivially learnable sample source ("what colour is the image?") for smoke-testing training jobs."""

from __future__ import annotations

import numpy as np
from PIL import Image

from qzoom_ray.train.data import TrainSample

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220)}


def make_sample_fn(budget_tokens: int = 16):
    names = sorted(COLOURS)

    def sample(rng: np.random.Generator) -> TrainSample:
        name = names[int(rng.integers(len(names)))]
        size = int(rng.integers(64, 160))
        return TrainSample(Image.new("RGB", (size, size), COLOURS[name]), "What colour is the image?", name, budget_tokens)

    return sample


def tokenizer_corpus() -> list[str]:
    return ["What colour is the image? " + " ".join(COLOURS)]
