"""Stage-2 judges: the metric judge on hand-made rows, and the LLM judge's prompt and reply parsing."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from qzoom_ray.train.judges import JUDGE_PROMPT, LlmJudge, MetricJudge, answers_of


def test_answers_of_puts_answer_first_once():
    assert answers_of({"answer": "7", "answers": ["seven", "7"]}) == ["seven", "7"]
    assert answers_of({"answer": "7", "answers": ["seven"]}) == ["7", "seven"]
    assert answers_of({"answer": "7"}) == ["7"]
    assert answers_of({"answers": []}) == []


def test_metric_judge_scores_each_side_with_the_rows_metric():
    rows = [
        {"question": "q", "answer": "AB12", "metric": "exact_match"},
        {"question": "q", "answer": "7", "answers": ["seven"]},  # no metric column: exact match
    ]
    assert MetricJudge()(rows, ["ab12", "8"], ["AB13", "seven"]) == [(True, False), (False, True)]


@dataclass
class _Reply:
    answer: str | None


class _FakeEngine:
    """Answers each judge prompt with a scripted reply and keeps the prompts it was sent."""

    def __init__(self, replies: list[str | None]):
        self.adapter = SimpleNamespace(token_px=28)
        self.replies = replies
        self.prompts: list[str] = []

    def generate(self, records):
        self.prompts += [r.question for r in records]
        return [_Reply(a) for a in self.replies[: len(records)]]


def test_llm_judge_parses_yes_no_and_falls_back_to_the_metric_on_unparsable_replies():
    rows = [{"question": "What is the total?", "answer": "12"}] * 3
    engine = _FakeEngine(["A: Yes\nB: No", "a : no\nb: YES (synonym)", "I think both are fine"])
    verdicts = LlmJudge(engine)(rows, ["12", "twelve", "12"], ["13", "12", "11"])
    # The third reply names neither side: the metric judge decides (A exact, B wrong).
    assert verdicts == [(True, False), (False, True), (True, False)]
    assert engine.prompts[0] == JUDGE_PROMPT.format(question="What is the total?", gt="12", a="12", b="13")
