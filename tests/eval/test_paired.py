"""Paired bootstrap intervals for a setting against the baseline's peak: the point estimates are the plain ones,
the intervals cover them and shrink with more records, and the report and the job carry them."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import load_job
from hypothesis import given, settings
from hypothesis import strategies as st

from qzoom_ray.eval.evaluate import EvalSettings, SettingRun
from qzoom_ray.eval.paired import align_by_id, paired_gap
from qzoom_ray.eval.report import write_report


def _pair(n: int, both_right: int, only_setting: int, only_reference: int):
    """Scores of ``n`` records: ``both_right`` right for both, then the discordant ones, the rest wrong for both."""
    s = np.zeros(n)
    r = np.zeros(n)
    s[:both_right] = r[:both_right] = 1
    s[both_right : both_right + only_setting] = 1
    r[both_right + only_setting : both_right + only_setting + only_reference] = 1
    return s, r


def test_point_estimates_are_the_plain_gap_and_time_ratio():
    s, r = _pair(200, 150, 6, 9)  # 78.0 % against 79.5 %
    gap = paired_gap(s, r, np.full(200, 0.02), np.full(200, 0.1))
    assert gap.gap_points == pytest.approx(-1.5) and gap.discordant == 15 and gap.n == 200
    assert gap.speedup == pytest.approx(5.0)
    # Equal per-record times: every resample has the same ratio.
    assert gap.speedup_interval == pytest.approx((5.0, 5.0))
    lo, hi = gap.gap_interval
    assert lo < -1.5 < hi


def test_the_interval_narrows_with_records_and_widens_with_discord():
    small = paired_gap(*_pair(200, 150, 6, 9), np.ones(200), np.ones(200))
    large = paired_gap(*_pair(2000, 1500, 60, 90), np.ones(2000), np.ones(2000))
    noisy = paired_gap(*_pair(2000, 1500, 300, 330), np.ones(2000), np.ones(2000))
    width = [g.gap_interval[1] - g.gap_interval[0] for g in (small, large, noisy)]
    assert small.gap_points == large.gap_points == pytest.approx(-1.5)
    assert width[1] < width[0] / 2 and width[2] > 1.6 * width[1]
    # The normal approximation of a paired difference: about 2 x 1.96 x sqrt(discordant share / n) x 100.
    assert width[1] == pytest.approx(2 * 1.96 * math.sqrt(150 / 2000 - 0.015**2) / math.sqrt(2000) * 100, rel=0.2)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans(), st.floats(0.01, 1.0), st.floats(0.01, 1.0)),
                min_size=1, max_size=60), st.integers(0, 10))
def test_intervals_hold_their_estimates_and_stay_in_range(records, seed):
    s, r, t, rt = (np.array(col, dtype=float) for col in zip(*records, strict=True))
    gap = paired_gap(s, r, t, rt, resamples=200, seed=seed)
    assert -100.0 <= gap.gap_interval[0] <= gap.gap_interval[1] <= 100.0
    assert gap.speedup_interval[0] <= gap.speedup_interval[1]
    assert gap.speedup == pytest.approx(rt.sum() / t.sum())
    assert paired_gap(s, r, t, rt, resamples=200, seed=seed) == gap  # reproducible with a seed


def test_bad_inputs_are_refused_and_missing_times_give_no_speedup():
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_gap([1.0], [1.0, 0.0], [1.0], [1.0])
    with pytest.raises(ValueError, match="level"):
        paired_gap([1.0], [1.0], [1.0], [1.0], level=1.0)
    gap = paired_gap([1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0])
    assert math.isnan(gap.speedup) and gap.gap_points == -50.0


def test_align_by_id_pairs_records_in_the_references_order():
    ref = [{"id": "b", "score": 1.0, "model_s": 2.0}, {"id": "a", "score": 0.0, "model_s": 2.0},
           {"id": "c", "score": 1.0, "model_s": 2.0}]
    setting = [{"id": "a", "score": 1.0, "model_s": 0.5}, {"id": "b", "score": 0.0, "model_s": 0.25}]
    assert align_by_id(setting, ref) == ([0.0, 1.0], [1.0, 0.0], [0.25, 0.5], [2.0, 2.0])
    with pytest.raises(ValueError, match="more than once"):
        align_by_id(setting + setting[:1], ref)
    with pytest.raises(ValueError, match="share no record"):
        align_by_id([{"id": "z", "score": 1.0, "model_s": 1.0}], ref)


def _preds(method: str, budget: int, scores, seconds: float) -> list[dict]:
    return [{"method": method, "budget": budget, "id": f"r{i}", "score": float(s), "model_s": seconds}
            for i, s in enumerate(scores)]


def test_the_report_and_the_job_carry_the_paired_comparison(tmp_path):
    s, r = _pair(40, 30, 1, 3)
    base = _preds("baseline", 1024, r, 0.5)
    qz = _preds("qzoom", 128, s, 0.1)
    low = _preds("baseline", 256, np.zeros(40), 0.2)
    # write_report summarises full prediction rows; fill the columns it reads with neutral values.
    extra = {"visual_tokens": 100, "coarse_tokens": 100, "roi_tokens": 0, "zoomed": False, "route": "direct",
             "roi_iou": None, "roi_centre_hit": None, "roi_coverage": None, "error": None, "question_type": "fine",
             "split": "ordinary", "category": "document", "answer_logprob": None}
    runs = [SettingRun(m, b, 1.0, [dict(p, **extra) for p in preds])
            for m, b, preds in (("baseline", 1024, base), ("baseline", 256, low), ("qzoom", 128, qz))]
    report = write_report(runs, EvalSettings(), tmp_path / "a")
    (row,) = report["tradeoff"]["against_peak"]
    assert row["qzoom_budget"] == 128 and row["baseline_budget"] == 1024
    assert row["gap_points"] == pytest.approx(-5.0) and row["speedup"] == pytest.approx(5.0)
    assert "| Max-128 | Max-1024 | 40 | 4 | -5.0 [" in (tmp_path / "a" / "summary.md").read_text()

    second = tmp_path / "b"
    second.mkdir()
    pq.write_table(pa.Table.from_pylist(base + qz + low), second / "predictions.parquet")
    job = load_job("compare_to_peak")
    out = tmp_path / "gap.json"
    assert job.main(["--runs", f"{tmp_path / 'a'},{second}", "--qzoom-budget", "128", "--report", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["n"] for r in rows] == [40, 40, 80] and rows[-1]["run"] == "pooled (2 runs)"
    assert rows[-1]["gap_points"] == pytest.approx(-5.0)
    assert rows[-1]["gap_interval"][1] - rows[-1]["gap_interval"][0] < rows[0]["gap_interval"][1] - rows[0]["gap_interval"][0]
    assert job.main(["--runs", str(second), "--qzoom-budget", "576"]) == 2
    assert job.main(["--runs", str(second), "--reference-budget", "64"]) == 2
