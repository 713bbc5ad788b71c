"""Stage-3 consistency filter, label draws, seeded mixing, and threshold calibration (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest

from qzoom_ray.config import ZoomConfig
from qzoom_ray.train.calibrate import (
    NEVER,
    CalibrationTable,
    choose_thresholds,
    direct_route_of,
    write_thresholds,
)
from qzoom_ray.train.consistency import (
    EASY,
    HALLUCINATED,
    HARD,
    NON_MONOTONIC,
    UNSTABLE,
    answers_match,
    classify_ladder,
    draw_label,
    mix_hard_easy,
)


@pytest.mark.parametrize(
    ("ladder", "gt", "kind", "wrong"),
    [
        (["7", "7", "7", "7"], "7", EASY, ()),
        (["x", "y", "Total: 7", "total 7."], "7", HARD, (0, 1)),  # containment + punctuation/case
        (["x", "7", "7", "7"], ["seven", "7"], HARD, (0,)),
        (["7", "x", "7", "7"], "7", NON_MONOTONIC, (1,)),  # wrong in the middle: not a clean transition
        (["7", "7", "7", "8"], "7", UNSTABLE, ()),  # top two disagree
        (["8", "8", "9", "9"], "7", HALLUCINATED, ()),  # stable but not the ground truth
        (["", "", "", ""], "7", UNSTABLE, ()),
    ],
)
def test_classify_ladder(ladder, gt, kind, wrong):
    v = classify_ladder(ladder, gt)
    assert v.kind == kind and v.wrong == wrong


def test_answers_match_rules():
    assert answers_match("The answer is Red.", "red") and answers_match("red", "RED!")
    assert not answers_match("", "red") and not answers_match("blue", "red")


def test_draw_label_rules():
    rng = np.random.default_rng(0)
    easy = classify_ladder(["a"] * 5, "a")
    draws = {draw_label(easy, 5, rng) for _ in range(50)}
    assert draws == {(0, 0), (1, 0), (2, 0)}  # never the top two budgets
    assert draw_label(classify_ladder(["a", "a"], "a"), 2, rng) is None
    hard = classify_ladder(["x", "y", "z", "a", "a"], "a")
    pos = {draw_label(hard, 5, rng, p_positive=1.0) for _ in range(50)}
    assert pos == {(1, 1), (2, 1)}  # one of the last two wrong budgets
    assert draw_label(hard, 5, rng, p_positive=0.0) is None  # only two correct budgets: nothing to label 0
    hard2 = classify_ladder(["x", "a", "a", "a", "a"], "a")
    assert {draw_label(hard2, 5, rng, p_positive=0.0) for _ in range(30)} == {(1, 0), (2, 0)}
    assert draw_label(classify_ladder(["a", "b"], "a"), 2, rng) is None


def test_draw_label_zoom_check_unteaches_zooms_that_failed():
    rng = np.random.default_rng(0)
    hard = classify_ladder(["x", "y", "z", "a", "a"], "a")  # wrong at budgets 0-2: draws come from 1 and 2
    nan = float("nan")
    # The zoom pass was right at budget 2 and wrong at budget 1; budget 0 was never checked.
    draws = {draw_label(hard, 5, rng, p_positive=1.0, zoom_correct=[nan, 0.0, 1.0, nan, nan]) for _ in range(60)}
    assert draws == {(1, 0), (2, 1)}
    # Unchecked budgets (None or NaN, or no column at all) keep the paper's label.
    for unchecked in ([None] * 5, [nan] * 5, None):
        assert {draw_label(hard, 5, rng, 1.0, unchecked) for _ in range(40)} == {(1, 1), (2, 1)}
    easy = classify_ladder(["a"] * 5, "a")  # easy records are labelled 0 whatever the zoom did
    assert {lab for _, lab in (draw_label(easy, 5, rng, 0.9, [1.0] * 5) for _ in range(20))} == {0}


def test_mix_is_one_to_one_and_seeded():
    hard, easy = list(range(5)), list(range(100, 130))
    a = mix_hard_easy(hard, easy, seed=3)
    assert a == mix_hard_easy(hard, easy, seed=3)  # same on every rank (spec §8.16)
    assert a != mix_hard_easy(hard, easy, seed=4)
    assert sorted(x for x in a if x < 100) == hard and sum(x >= 100 for x in a) == 5
    assert len(mix_hard_easy(hard, easy[:2], seed=0)) == 7
    assert len(mix_hard_easy(hard, easy, seed=0, max_samples=4)) == 4


def _table() -> CalibrationTable:
    # 10 records: direct right on 6; the RoI path (tau_roi 0.1) fixes 3 of the 4 wrong ones (high gate
    # scores) and breaks one right one; tau_roi 0.3 fixes only one.
    gate = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01])
    direct = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1], dtype=float)
    z01 = np.array([1, 1, 1, 0, 1, 0, 1, 1, 1, 1], dtype=float)
    z03 = np.array([1, 0, 0, 0, 1, 1, 1, 1, 1, 1], dtype=float)
    return CalibrationTable(gate, direct, {0.1: z01, 0.3: z03}, reference_accuracy=0.9)


def test_calibration_fewest_zooms_within_tolerance():
    c = choose_thresholds(_table(), "accuracy", max_drop=0.0)
    assert (c["tau_roi"], c["accuracy"], c["zoom_rate"]) == (0.1, 0.9, 0.3) and c["target_met"]
    assert 0.6 < c["tau_gate"] <= 0.7
    loose = choose_thresholds(_table(), "accuracy", max_drop=0.15)
    assert loose["zoom_rate"] == 0.2 and loose["accuracy"] == pytest.approx(0.8)


def test_calibration_zoom_rate_budget_and_unreachable_target():
    c = choose_thresholds(_table(), "zoom_rate", max_zoom_rate=0.1)
    assert c["zoom_rate"] == pytest.approx(0.1) and c["accuracy"] == pytest.approx(0.7)
    t = _table()
    t.reference_accuracy = 1.0
    c = choose_thresholds(t, "accuracy", max_drop=0.0)
    assert not c["target_met"] and c["accuracy"] == pytest.approx(0.9) and c["zoom_rate"] == pytest.approx(0.3)
    # Unreachable: the fewest zooms within max_drop of the best pair (0.9), not the best pair itself.
    t.reference_accuracy = 1.2
    c = choose_thresholds(t, "accuracy", max_drop=0.15)
    assert not c["target_met"] and c["accuracy"] == pytest.approx(0.8) and c["zoom_rate"] == pytest.approx(0.2)
    assert choose_thresholds(t, "zoom_rate", max_zoom_rate=0.0)["tau_gate"] == NEVER


def test_write_thresholds_keeps_the_rest_of_the_config(tmp_path):
    src = tmp_path / "in.yaml"
    src.write_text("engine:\n  model: {path: m}\n  zoom: {mode: qzoom, gate_thresh: 0.1}\nbatch: 4\n")
    out = write_thresholds(src, tmp_path / "out.yaml", 0.25, 0.15, "test")
    import yaml

    data = yaml.safe_load(out.read_text())
    assert data["engine"]["zoom"] == {"mode": "qzoom", "gate_thresh": 0.25, "roi_thresh": 0.15}
    assert data["batch"] == 4 and out.read_text().startswith("# tau_gate")
    plain = write_thresholds(tmp_path / "missing.yaml", tmp_path / "new.yaml", 0.5, 0.1)
    assert yaml.safe_load(plain.read_text()) == {"zoom": {"gate_thresh": 0.5, "roi_thresh": 0.1}}
    relative = write_thresholds(tmp_path / "missing.yaml", tmp_path / "rel.yaml", 0.5, 0.8, roi_thresh_mode="peak_relative")
    assert yaml.safe_load(relative.read_text()) == {
        "zoom": {"gate_thresh": 0.5, "roi_thresh": 0.8, "roi_thresh_mode": "peak_relative"}}
    margin = write_thresholds(tmp_path / "missing.yaml", tmp_path / "m.yaml", 0.5, 0.8, roi_thresh_mode="peak_relative",
                              roi_margin=0.05)
    assert yaml.safe_load(margin.read_text())["zoom"]["roi_margin"] == 0.05
    capped = write_thresholds(tmp_path / "missing.yaml", tmp_path / "c.yaml", 0.5, 0.8, roi_max_downscale=2)
    assert yaml.safe_load(capped.read_text())["zoom"]["roi_max_downscale"] == 2.0
    per_budget = write_thresholds(margin, tmp_path / "b.yaml", 0.01, 0.5, budget=256)
    per_budget = write_thresholds(per_budget, per_budget, 0.2, 0.6, budget=64)
    zoom = yaml.safe_load(per_budget.read_text())["zoom"]
    assert (zoom["gate_thresh"], zoom["roi_thresh"]) == (0.5, 0.8)  # the global pair is kept
    assert zoom["thresholds_by_budget"] == {64: {"gate_thresh": 0.2, "roi_thresh": 0.6},
                                            256: {"gate_thresh": 0.01, "roi_thresh": 0.5}}
    assert list(zoom["thresholds_by_budget"]) == [64, 256]
    assert ZoomConfig.model_validate(zoom).thresholds_by_budget[256].gate_thresh == 0.01


def test_calibration_answers_with_the_direct_route_the_config_serves(tmp_path):
    served = tmp_path / "served.yaml"
    served.write_text("model: {path: embedded:tiny, direct_route_path: embedded:tiny-base}\nzoom: {mode: qzoom}\n")
    nested = tmp_path / "job.yaml"
    nested.write_text("engine:\n  model: {path: m, direct_route_path: /ckpt/base}\n  zoom: {mode: qzoom}\n")
    plain = tmp_path / "plain.yaml"
    plain.write_text("model: {path: embedded:tiny}\n")
    assert direct_route_of(None, served) == "embedded:tiny-base"
    assert direct_route_of(None, nested) == "/ckpt/base"
    assert direct_route_of(None, plain) is None
    assert direct_route_of(None, tmp_path / "missing.yaml") is None and direct_route_of(None, None) is None
    # The flag wins, and 'none' turns the route off whatever the config serves.
    assert direct_route_of("/other", served) == "/other"
    assert direct_route_of("none", served) is None
