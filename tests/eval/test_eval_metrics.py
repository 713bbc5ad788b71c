"""Metrics on hand-made cases (values worked out by hand from the community definitions)."""

from __future__ import annotations

import pytest

from qzoom_ray.eval.metrics import (
    anls,
    exact_match,
    levenshtein,
    normalize_answer,
    parse_choice,
    relaxed_accuracy,
    score,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat.", "cat"),
        ("  two  ", "2"),
        ("x-ray", "x ray"),  # punctuation inside a word becomes a space
        ("1,000", "1000"),  # digit-group comma
        ("3.5", "3.5"),  # decimal point kept
        ("Yes!", "yes"),
        ("dont", "don't"),
        ("an apple", "apple"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("Red.", ["red"]) == 1.0
    assert exact_match("the red one", ["red"]) == 0.0
    assert exact_match("three", ["blue", "3"]) == 1.0
    assert exact_match("A7", ["a7"]) == 1.0


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0


def test_anls_threshold_and_best_reference():
    assert anls("736", ["736"]) == 1.0
    assert anls("735", ["736"]) == pytest.approx(2 / 3)  # one edit in three characters
    assert anls("700", ["736"]) == 0.0  # similarity 1/3 < 0.5 -> 0
    assert anls("ab", ["abcd"]) == 0.5  # exactly at the threshold counts
    assert anls(" Total  Due ", ["total due"]) == 1.0  # case and spaces ignored
    assert anls("12", ["99", "13"]) == 0.5


def test_relaxed_accuracy():
    assert relaxed_accuracy("104", ["100"]) == 1.0  # 4% off
    assert relaxed_accuracy("106", ["100"]) == 0.0  # 6% off
    assert relaxed_accuracy("12%", ["0.12"]) == 1.0  # percent read as a fraction
    assert relaxed_accuracy("0", ["0"]) == 1.0  # zero target: string comparison
    assert relaxed_accuracy("0.01", ["0"]) == 0.0
    assert relaxed_accuracy("Yes", ["yes"]) == 1.0
    assert relaxed_accuracy("5.", ["5"]) == 1.0


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [("B", "B"), ("(B)", "B"), ("B. blue", "B"), ("B) blue", "B"), ("The answer is C", "C"), ("answer: (d)", "D"),
     ("blue", "B"), ("It is blue", "B"), ("I think so", None), ("E", None)],
)
def test_parse_choice(prediction, letter):
    assert parse_choice(prediction, ["red", "blue", "green", "yellow"]) == letter


def test_multiple_choice_with_letter_or_text_gold():
    choices = ["red", "blue", "green", "yellow"]
    assert score("B", ["B"], "mc", choices) == 1.0
    assert score("blue", ["B", "blue"], "mc", choices) == 1.0
    assert score("green", ["blue"], "mc", choices) == 0.0
    assert score("C", ["green"], "mc", choices) == 1.0


def test_score_dispatch_and_errors():
    assert score(None, ["x"], "exact_match") == 0.0
    assert score("105", ["100"], "relaxed") == 1.0
    with pytest.raises(ValueError):
        score("a", ["a"], "bleu")
