"""Stage-2 judges: which of two answers to a question (A: the base path, B: the RoI path) is right (spec §4.1).

A judge is any callable ``(rows, preds_a, preds_b) -> [(A correct, B correct)]``; the miner takes one.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from qzoom_ray.eval.metrics import score
from qzoom_ray.model.state import EngineRecord


class Judge(Protocol):
    def __call__(self, rows: list[dict[str, Any]], preds_a: list[str], preds_b: list[str]) -> list[tuple[bool, bool]]:
        """Per row: (A correct, B correct)."""


def answers_of(row: dict[str, Any]) -> list[str]:
    """Every accepted answer of a question row: its ``answers`` list, with ``answer`` in front when the list lacks it."""
    answers = row.get("answers")
    out = [str(a) for a in answers] if answers is not None and len(answers) else []
    if row.get("answer") is not None and str(row["answer"]) not in out:
        out.insert(0, str(row["answer"]))
    return out


class MetricJudge:
    """Ground truth + the row's metric (exact match / ANLS / relaxed / multiple choice): correct iff score >= pass_score."""

    def __init__(self, pass_score: float = 0.5):
        self.pass_score = pass_score

    def __call__(self, rows, preds_a, preds_b):
        def ok(row, pred):
            return score(pred, answers_of(row), str(row.get("metric") or "exact_match"), row.get("choices")) >= self.pass_score

        return [(ok(r, a), ok(r, b)) for r, a, b in zip(rows, preds_a, preds_b, strict=True)]


JUDGE_PROMPT = (
    "You are a fair and robust evaluator; judge semantic correctness, not string match.\n"
    "Question: {question}\nGround Truth: {gt}\nModel A Prediction: {a}\nModel B Prediction: {b}\n"
    "A prediction is correct if it contains the ground truth or a standard synonym (Yes=True, 10%=0.1); "
    "ignore punctuation and case; answer No only if it is factually wrong or missing.\n"
    "Output exactly two lines:\nA: Yes|No\nB: Yes|No"
)


class LlmJudge:
    """An instruction-following VLM served by the engine (baseline mode) judges A and B (spec §4.1).

    The engine answers image+text records only, so the text-only judge prompt goes with a tiny blank
    image; unparsable replies fall back to the metric judge.
    """

    def __init__(self, engine: Any, fallback: Judge | None = None):
        self.engine = engine
        self.fallback = fallback or MetricJudge()

    def __call__(self, rows, preds_a, preds_b):
        from PIL import Image

        blank = Image.new("RGB", (56, 56), (255, 255, 255))
        px = 4 * self.engine.adapter.token_px**2
        recs = [EngineRecord(str(i), blank, JUDGE_PROMPT.format(question=r["question"], gt=" | ".join(answers_of(r)),
                                                                 a=a, b=b), min_pixels=px, max_pixels=px)
                for i, (r, a, b) in enumerate(zip(rows, preds_a, preds_b, strict=True))]
        out = []
        for res, r, a, b in zip(self.engine.generate(recs), rows, preds_a, preds_b, strict=True):
            found = dict(re.findall(r"\b([ab])\s*:\s*(yes|no)\b", (res.answer or "").lower()))
            if "a" in found and "b" in found:
                out.append((found["a"] == "yes", found["b"] == "yes"))
            else:
                out.append(self.fallback([r], [a], [b])[0])
        return out
