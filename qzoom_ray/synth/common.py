"""Shared pieces of the generators: the record type and small drawing helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from qzoom_ray.synth.vocab import CHOICE_LETTERS, CODE_ALPHABET, CODE_LEN

Box = tuple[int, int, int, int]


@dataclass
class SynthRecord:
    """One rendered image with one question; ``texts``/``objects`` describe what was drawn (for tests)."""

    image: Image.Image
    question: str
    answer: str
    answers: list[str]
    question_type: str  # "fine" | "coarse"
    category: str  # "document" | "scene"
    split: str  # "ordinary" | "ultra_hr"
    template: str
    layout: str
    evidence_box: Box
    metric: str
    choices: list[str] | None = None
    answer_box: Box | None = None  # tight box of the rendered answer text (fine questions)
    glyph_px: int = 0  # cap height of the fine text, source pixels
    texts: list[tuple[str, Box]] = field(default_factory=list)
    objects: list[dict[str, Any]] = field(default_factory=list)
    clutter_texts: list[tuple[str, Box]] = field(default_factory=list)  # distractor text (not asked about)

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def random_code(rng: np.random.Generator, length: int = CODE_LEN) -> str:
    return "".join(CODE_ALPHABET[i] for i in rng.integers(0, len(CODE_ALPHABET), length))


def draw_text(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    font: ImageFont.FreeTypeFont,
    fill: tuple[int, int, int],
    log: list[tuple[str, Box]] | None = None,
    anchor: str = "ls",
) -> Box:
    """Draw ``text`` and return (and log) its exact ink box; baseline anchoring keeps rows aligned."""
    draw.text(xy, text, font=font, fill=fill, anchor=anchor)
    x0, y0, x1, y1 = draw.textbbox(xy, text, font=font, anchor=anchor)
    box = (int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1)))
    if log is not None:
        log.append((text, box))
    return box


def pad_box(box: Box, pad: float, width: int, height: int) -> Box:
    p = int(round(pad))
    return (max(0, box[0] - p), max(0, box[1] - p), min(width, box[2] + p), min(height, box[3] + p))


def union_box(*boxes: Box) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def multiple_choice(rng: np.random.Generator, correct: str, pool: list[str], k: int = 4) -> tuple[list[str], str]:
    """``k`` shuffled options containing ``correct``; returns (options, answer letter)."""
    others = [p for p in pool if p != correct]
    picked = [others[i] for i in rng.choice(len(others), k - 1, replace=False)] + [correct]
    order = rng.permutation(k)
    options = [picked[i] for i in order]
    return options, CHOICE_LETTERS[options.index(correct)]


def format_options(options: list[str]) -> str:
    return "\n".join(f"{CHOICE_LETTERS[i]}. {opt}" for i, opt in enumerate(options))
