"""The closed vocabulary of the synthetic benchmark: every word a question or an answer can use.

Kept deliberately small so that a tiny model trained from scratch on CPU can learn the task in
about an hour: a few templates, six colours, six shapes, eight field names, and fine answers of
a single glyph (a code symbol from a 16-symbol alphabet, a value digit 1-9). One glyph is as small
as several, which is all the benchmark is about; reading several in order is a skill a tiny model
trained from scratch on two cores did not pick up in an hour (docs/benchmark.md). A tokenizer can be built from
:func:`vocabulary` (words) plus :data:`CODE_ALPHABET` / digits (characters).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

#: Palette colours. Saturated and far apart in RGB so they survive a 64-token resize and JPEG;
#: the clutter only uses greys and pale tints, never these exact values.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "hexagon", "star")
#: Field labels on documents; each appears at most once per page so "the value of X" is unique.
FIELDS: tuple[str, ...] = ("Total", "Tax", "Fee", "Net", "Paid", "Due", "Cash", "Rate")
#: Code symbols: digits and capitals that do not look alike (no 0/O, 1/I, 5/S, 8/B).
CODE_ALPHABET = "234679ACEHKLPRTX"
CODE_LEN = 1
#: Values are single digits (the ledger keeps a three-digit-wide column, as a real form would).
VALUE_MIN, VALUE_MAX = 1, 9
SIDES: tuple[str, ...] = ("left", "right")
COUNT_MAX = 9
CHOICE_LETTERS = "ABCD"

# Question templates, keyed by a short template id (stored in the `template` column).
TEMPLATES: dict[str, str] = {
    "doc_value": "What is the value of '{field}'?",
    "doc_header_colour": "What colour is the header bar?",
    "doc_stamp_count": "How many stamps are on the page?",
    "scene_code": "Which code is on the {colour} {shape}?",
    "scene_count": "How many shapes are there?",
    "scene_colour": "What colour is the {shape}?",
    "scene_side": "Is the {colour} {shape} on the left or the right?",
}
#: Which templates need fine detail (reading small text) and which are answerable at low resolution.
FINE_TEMPLATES = {"doc": ("doc_value",), "scene": ("scene_code",)}
COARSE_TEMPLATES = {
    "doc": ("doc_header_colour", "doc_stamp_count"),
    "scene": ("scene_count", "scene_colour", "scene_side"),
}


@dataclass(frozen=True)
class Vocabulary:
    words: tuple[str, ...]  # every whitespace/punctuation-separated word of questions and answers
    characters: str  # every character that can appear in a question or an answer
    answers: tuple[str, ...]  # every possible answer string


def all_codes() -> list[str]:
    return ["".join(p) for p in itertools.product(CODE_ALPHABET, repeat=CODE_LEN)]


def all_answers() -> list[str]:
    values = [str(v) for v in range(VALUE_MIN, VALUE_MAX + 1)]
    counts = [str(c) for c in range(1, COUNT_MAX + 1)]
    return all_codes() + values + counts + list(COLOURS) + list(SHAPES) + list(SIDES) + list(CHOICE_LETTERS)


def vocabulary() -> Vocabulary:
    """Everything a tokenizer for this benchmark must cover."""
    import re

    texts: list[str] = []
    for tpl in TEMPLATES.values():
        texts.append(tpl.replace("{options}", "").format(field="", colour="", shape=""))
    texts += list(FIELDS) + list(COLOURS) + list(SHAPES) + list(SIDES)
    texts += [f"{letter}. " for letter in CHOICE_LETTERS]
    words = sorted({w for t in texts for w in re.findall(r"[A-Za-z]+|[^\sA-Za-z]", t)})
    answers = all_answers()
    chars = sorted({c for t in texts + answers for c in t} | set("0123456789") | set(CODE_ALPHABET))
    return Vocabulary(words=tuple(words), characters="".join(chars), answers=tuple(answers))
