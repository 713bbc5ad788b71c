"""VQA metrics as the community computes them; pure functions of (prediction, ground truths).

* ``exact_match``: the VQA/TextVQA answer normalisation (lower case, punctuation rules, number
  words -> digits, articles dropped, a few contractions), then equality with any ground truth.
  (The official VQA score min(1, matches/3) needs 10 human answers; with one or a few references
  it reduces to this.)
* ``anls``: DocVQA/InfoVQA Average Normalised Levenshtein Similarity with threshold 0.5: per
  reference 1 - lev/max(len); the best reference counts; below 0.5 the score is 0.
* ``relaxed``: ChartQA relaxed accuracy: numbers within 5% relative error (``x%`` read as x/100),
  otherwise case-insensitive string equality.
* ``mc``: multiple choice; the option letter is parsed from the prediction ("B", "(B)", "B. red",
  "The answer is B") or matched through the option text ("red").
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
    "wont": "won't", "didnt": "didn't", "wasnt": "wasn't", "im": "i'm", "ive": "i've", "thats": "that's",
}
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?<!\d)(\.)(?!\d)")  # a period that is not a decimal point
METRICS = ("exact_match", "anls", "relaxed", "mc")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        # As in the VQA evaluation script: punctuation next to a space (or a digit group comma)
        # disappears, punctuation inside a word becomes a space ("x-ray" -> "x ray").
        if f"{p} " in text or f" {p}" in text or _COMMA_STRIP.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def normalize_answer(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    words = []
    for w in _punctuation(text).split():
        w = _NUMBER_WORDS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    pred = " ".join(prediction.strip().lower().split())
    best = 0.0
    for a in answers:
        gt = " ".join(a.strip().lower().split())
        longest = max(len(gt), len(pred))
        best = max(best, 1.0 - levenshtein(gt, pred) / longest if longest else 1.0)
    return best if best >= threshold else 0.0


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answers: Sequence[str], tolerance: float = 0.05) -> float:
    pred = prediction.strip().rstrip(".").strip()
    for a in answers:
        gt = a.strip()
        p, t = _to_float(pred), _to_float(gt)
        # ChartQA compares numerically only for a non-zero numeric target.
        if p is not None and t:
            if abs(p - t) / abs(t) <= tolerance:
                return 1.0
        elif pred.lower() == gt.lower():
            return 1.0
    return 0.0


_LETTER_PATTERNS = [
    re.compile(r"^\(?([A-Z])\)?(?:[.:)]|\s|$)"),  # "B", "(B)", "B.", "B) red", "B: red"
    re.compile(r"answer(?:\s+is)?\s*[:\-]?\s*\(?([A-Z])\b", re.IGNORECASE),  # "The answer is B"
]


def parse_choice(prediction: str, choices: Sequence[str] | None = None) -> str | None:
    """The option letter a prediction names, or None."""
    text = prediction.strip()
    n = len(choices) if choices else 26
    for pattern in _LETTER_PATTERNS:
        m = pattern.search(text)
        if m and ord(m.group(1).upper()) - ord("A") < n:
            return m.group(1).upper()
    if choices:
        norm = normalize_answer(text)
        exact = [i for i, c in enumerate(choices) if normalize_answer(c) == norm]
        if exact:
            return chr(ord("A") + exact[0])
        contained = [i for i, c in enumerate(choices) if normalize_answer(c) and normalize_answer(c) in norm]
        if len(contained) == 1:
            return chr(ord("A") + contained[0])
    return None


def multiple_choice(prediction: str, answers: Sequence[str], choices: Sequence[str] | None = None) -> float:
    """``answers`` holds the gold letter and/or the gold option text."""
    gold = set()
    for a in answers:
        a = a.strip()
        if len(a) == 1 and a.isalpha():
            gold.add(a.upper())
        elif choices:
            gold.update(chr(ord("A") + i) for i, c in enumerate(choices) if normalize_answer(c) == normalize_answer(a))
    return float(parse_choice(prediction, choices) in gold)


def score(
    prediction: str | None,
    answers: Sequence[str],
    metric: str = "exact_match",
    choices: Sequence[str] | None = None,
) -> float:
    """Score in [0, 1]; a missing prediction (an engine error) scores 0."""
    if prediction is None:
        return 0.0
    answers = [a for a in answers if a is not None]
    if metric == "exact_match":
        return exact_match(prediction, answers)
    if metric == "anls":
        return anls(prediction, answers)
    if metric == "relaxed":
        return relaxed_accuracy(prediction, answers)
    if metric == "mc":
        return multiple_choice(prediction, answers, choices)
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
