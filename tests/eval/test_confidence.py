"""Accuracy against coverage when answers are ranked by their log-probability."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qzoom_ray.eval.confidence import coverage_accuracy


def test_hand_ranked_answers():
    scores = [1.0, 0.0, 1.0, 0.0]
    logprobs = [-0.1, -2.0, -0.5, None]  # the error (None) ranks last
    got = dict(coverage_accuracy(scores, logprobs, [0.25, 0.5, 0.75, 1.0]))
    assert got == {0.25: 100.0, 0.5: 100.0, 0.75: pytest.approx(200 / 3), 1.0: 50.0}


def test_ties_keep_input_order_and_bad_input_is_refused():
    assert coverage_accuracy([0.0, 1.0], [-1.0, -1.0], [0.5]) == [(0.5, 0.0)]
    with pytest.raises(ValueError):
        coverage_accuracy([1.0], [-1.0, -2.0], [0.5])
    with pytest.raises(ValueError):
        coverage_accuracy([1.0], [-1.0], [0.0])
    assert coverage_accuracy([], [], [0.5]) == []


@given(st.lists(st.tuples(st.booleans(), st.floats(-20, 0)), min_size=1, max_size=40))
def test_full_coverage_is_plain_accuracy_and_a_perfect_ranking_is_monotone(rows):
    scores = [1.0 if right else 0.0 for right, _ in rows]
    logprobs = [lp for _, lp in rows]
    (_, full), = coverage_accuracy(scores, logprobs, [1.0])
    assert full == pytest.approx(100 * sum(scores) / len(scores))
    # Confidence that puts every right answer first: accuracy never rises as coverage grows.
    perfect = [0.0 if right else -10.0 for right, _ in rows]
    accs = [a for _, a in coverage_accuracy(scores, perfect, [i / 10 for i in range(1, 11)])]
    assert all(a >= b - 1e-9 for a, b in zip(accs[:-1], accs[1:], strict=True))
