"""A reading warm-up for models trained from scratch: short strings of the benchmark's glyphs, alone.

A ViT trained from scratch learns what a glyph looks like far faster from images that hold nothing
else (as document models are pre-trained on rendered text, e.g. Donut's SynthDoG) than from the
glyphs' few pixels in a cluttered page or scene. Each sample is a light background with a one- to
three-character string in the benchmark's font (the code alphabet and digits), its cap height
``glyph_tokens`` visual tokens, seen at the few-token budget that shows it at that size; the
question is "Read the text." and the answer is the string.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from qzoom_ray.synth.sizing import font_for_glyph
from qzoom_ray.synth.vocab import CODE_ALPHABET
from qzoom_ray.train.data import TrainSample

TOKEN_PX = 28
READ_QUESTION = "Read the text."
GLYPHS = CODE_ALPHABET + "".join(d for d in "0123456789" if d not in CODE_ALPHABET)


def make_sample_fn(
    lengths: tuple[int, ...] = (1, 2, 3),
    glyph_tokens: tuple[float, float] = (1.0, 1.6),
    source_glyph_px: tuple[int, int] = (30, 60),
    margin: tuple[float, float] = (0.3, 2.0),
):
    """A sampler of (string image, "Read the text.", string) views at a budget of a few tokens."""

    def sample(rng: np.random.Generator) -> TrainSample:
        n = int(lengths[int(rng.integers(len(lengths)))])
        text = "".join(GLYPHS[i] for i in rng.integers(0, len(GLYPHS), n))
        glyph = int(rng.integers(source_glyph_px[0], source_glyph_px[1] + 1))
        font = font_for_glyph(glyph)
        tw = font.getlength(text)
        mx, my = (float(rng.uniform(*margin)) * glyph for _ in range(2))
        w, h = int(tw + 2 * mx) + 1, int(glyph + 2 * my) + 1
        paper = tuple(int(v) for v in rng.integers(200, 256, 3))
        img = Image.new("RGB", (w, h), paper)  # type: ignore[arg-type]
        ink = tuple(int(v) for v in rng.integers(0, 70, 3))
        ImageDraw.Draw(img).text((w / 2 + rng.uniform(-0.2, 0.2) * mx, h / 2 + rng.uniform(-0.2, 0.2) * my), text,
                                 font=font, fill=ink, anchor="mm")
        # The budget that shows the cap height at `glyph_tokens` visual tokens.
        scale = float(rng.uniform(*glyph_tokens)) * TOKEN_PX / glyph
        budget = max(4, math.ceil(w * h * scale * scale / TOKEN_PX**2))
        return TrainSample(image=img, question=READ_QUESTION, answer=text, budget_tokens=budget)

    return sample
