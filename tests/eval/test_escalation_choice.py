"""Choosing the escalation threshold from plain runs: the simulation equals the engine's rule, and the rules pick
what they promise (hand-made ladders)."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from qzoom_ray.config import EngineConfig
from qzoom_ray.eval.escalation import (
    Rung,
    candidate_outcomes,
    choose,
    escalate,
    escalated_records,
    escalation_config,
    rank,
    score_settings,
)
from qzoom_ray.eval.escalation_runs import read_rereads, read_run, write_escalation
from qzoom_ray.model.driver import is_unsure

# Four records. Max-128: right, wrong and unsure, wrong and sure, an error. Max-256 fixes records 1 and 2.
LOW = Rung.of([1, 0, 0, 0], [-0.1, -0.9, -0.05, None], [1.0, 1.0, 1.0, 1.0], [False, False, False, True])
HIGH = Rung.of([1, 1, 1, 0], [-0.05, -0.6, -0.01, -2.0], [3.0, 3.0, 3.0, 3.0])
TOP = Rung.of([0, 1, 1, 1], [-0.2, -0.1, -0.3, -0.1], [9.0, 9.0, 9.0, 9.0])


def test_a_single_step_takes_the_larger_budgets_answer_exactly_where_the_engine_would_re_answer():
    out = escalate({128: LOW, 256: HIGH}, [128, 256], [-0.5])
    unsure = [is_unsure(-0.5, "boom" if e else None, None if math.isnan(lp) else lp)
              for e, lp in zip(LOW.error, LOW.logprob, strict=True)]
    assert unsure == [False, True, False, False]  # the error and the missing log-probability never escalate
    assert out.accuracy == 50.0 and out.escalated == 0.25
    assert out.seconds == 4.0 + 3.0  # the escalated record pays for both answers
    assert escalate({128: LOW, 256: HIGH}, [128], []).accuracy == 25.0


def test_a_chain_re_answers_only_what_is_still_unsure_at_each_step():
    ladder = {128: LOW, 256: HIGH, 576: TOP}
    out = escalate(ladder, [128, 256, 576], [-0.01, -0.5])
    # Step 1: records 0, 1, 2 are below -0.01. Step 2: of those only record 1 (-0.6) is below -0.5.
    assert out.accuracy == 75.0  # 1 (Max-256), 1 (Max-576), 1 (Max-256), 0 (error)
    assert out.seconds == 4.0 + 3 * 3.0 + 9.0 and out.escalated == 0.75
    with pytest.raises(ValueError, match="thresholds"):
        escalate(ladder, [128, 256, 576], [-0.5])


def test_candidates_cover_plain_budgets_single_steps_and_chains():
    names = {o.name for o in candidate_outcomes({128: LOW, 256: HIGH, 576: TOP}, grid=[-0.1, -0.5])}
    assert {"Max-128", "Max-576", "128 -> 256 below -0.1", "128 -> 576 below -0.5",
            "128 -> 256 -> 576 below -0.5 / -0.1"} <= names
    assert len(names) == 3 + 2 * 2 + 2 * 2


def test_rules_judge_a_setting_by_its_worst_set():
    per_set = [candidate_outcomes({128: LOW, 256: HIGH}, grid=[-0.05, -0.5]),
               candidate_outcomes({128: LOW, 256: HIGH}, grid=[-0.05, -0.5])]
    # Set 1's reference: 50 % in 14 s; set 2's: 75 % in 10 s.
    scored = score_settings(per_set, [(50.0, 14.0), (75.0, 10.0)])
    by_name = {s.name: s for s in scored}
    assert by_name["128 -> 256 below -0.5"].margins == (0.0, -25.0)
    assert by_name["128 -> 256 below -0.5"].speedups == (2.0, 10.0 / 7.0)
    # -0.05 re-answers records 0 and 1 (4 + 2 x 3 = 10 s) and scores 50 %: the same margins, slower.
    assert by_name["128 -> 256 below -0.05"].speedups == (1.4, 1.0)
    # Max-256 (75 %, 12 s) is the most accurate but slower than set 2's reference.
    assert choose(scored, "accuracy", min_speedup=0.8).name == "Max-256"
    assert choose(scored, "accuracy", min_speedup=1.0).name == "128 -> 256 below -0.5"  # the faster of a tie
    assert choose(scored, "accuracy", min_speedup=5.0) is None
    assert choose(scored, "speed", max_drop=30.0).name == "128 -> 256 below -0.5"  # Max-128 is 50 points down
    assert choose(scored, "speed", max_drop=50.0).name == "Max-128"
    with pytest.raises(ValueError, match="rule"):
        choose(scored, "cheapest")
    # The ranking the job prints: settings the rule may pick first, the choice at the top.
    ranked = rank(scored, "accuracy", min_speedup=1.0)
    assert ranked[0] == (choose(scored, "accuracy", min_speedup=1.0), True)
    flags = [ok for _, ok in ranked]
    assert flags == sorted(flags, reverse=True) and not flags[-1]
    assert {s.name for s, ok in ranked if not ok} == {"Max-256"}  # 0.83x on set 2


def test_the_written_escalation_is_one_the_engine_accepts():
    chain = score_settings([candidate_outcomes({128: LOW, 256: HIGH, 576: TOP}, grid=[-0.3])], [(50.0, 10.0)])
    block = escalation_config(next(s for s in chain if s.name == "128 -> 256 -> 576 below -0.3 / -0.3"))
    assert block == {"below_logprob": {128: -0.3, 256: -0.3}, "to_budget": {128: 256, 256: 576}}
    single = escalation_config(next(s for s in chain if s.name == "128 -> 576 below -0.3"))
    assert single == {"below_logprob": -0.3, "to_budget": {128: 576}}
    EngineConfig.model_validate({"escalation": block})
    with pytest.raises(ValueError, match="plain budget"):
        escalation_config(next(s for s in chain if s.name == "Max-128"))


def _predictions(tmp_path, escalated=False, drop_one=False):
    rows = []
    for b, rung in ((128, LOW), (256, HIGH)):
        for i in range(4):
            if drop_one and b == 256 and i == 3:
                continue
            lp = None if math.isnan(rung.logprob[i]) else float(rung.logprob[i])
            rows.append({"method": "qzoom", "budget": b, "id": f"r{3 - i}", "score": float(rung.score[i]),
                         "answer_logprob": lp, "model_s": float(rung.seconds[i]),
                         "error": "bad image" if rung.error[i] else None, "escalated": escalated})
    for b, acc in ((576, [1, 0, 1, 0]), (1024, [1, 1, 1, 0])):
        rows += [{"method": "baseline", "budget": b, "id": f"r{3 - i}", "score": float(s), "answer_logprob": -0.1,
                  "model_s": 2.0, "error": None, "escalated": False} for i, s in enumerate(acc)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "predictions.parquet")
    return tmp_path


def test_a_run_reads_into_aligned_rungs_and_its_peak(tmp_path):
    ladder, ref = read_run(_predictions(tmp_path))
    assert sorted(ladder) == [128, 256] and ref.name == "baseline Max-1024" and ref.accuracy == 75.0
    assert ref.seconds == 8.0
    # Sorted by id (r0..r3 are LOW's records 3..0), and still the engine's answers.
    assert escalate(ladder, [128, 256], [-0.5]).accuracy == 50.0
    assert read_run(tmp_path, reference_budget=576)[1].accuracy == 50.0
    with pytest.raises(ValueError, match="no baseline Max-64"):
        read_run(tmp_path, reference_budget=64)


def test_runs_that_cannot_be_simulated_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="--no-escalation"):
        read_run(_predictions(tmp_path / "a", escalated=True))
    with pytest.raises(ValueError, match="did not answer"):
        read_run(_predictions(tmp_path / "b", drop_one=True))
    with pytest.raises(FileNotFoundError):
        read_run(tmp_path / "nowhere")


def test_writing_keeps_the_rest_of_the_config(tmp_path):
    src = tmp_path / "in.yaml"
    src.write_text("model: {path: embedded:tiny}\nzoom: {mode: qzoom, gate_thresh: 0.5}\n")
    out = write_escalation(src, tmp_path / "out.yaml", {"below_logprob": -0.3, "to_budget": {128: 256}}, "a test")
    data = yaml.safe_load(out.read_text())
    assert data["zoom"]["gate_thresh"] == 0.5 and data["escalation"]["to_budget"] == {128: 256}
    assert out.read_text().startswith("# escalation written by a test")
    assert EngineConfig.from_yaml(out).escalation.step(128) == (256, -0.3)


def test_the_job_writes_the_choice_into_the_config_and_the_report(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "choose_escalation", Path(__file__).resolve().parents[2] / "jobs" / "choose_escalation.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    run = _predictions(tmp_path)
    cfg = tmp_path / "engine.yaml"
    cfg.write_text("model: {path: embedded:tiny}\n")
    rc = job.main(["--runs", str(run), "--grid=-0.05,-0.5", "--min-speedup", "1.0",
                   "--config-in", str(cfg), "--config-out", str(cfg), "--report", str(tmp_path / "r.json")])
    assert rc == 0
    # One set, reference Max-1024 (75 %, 8 s): 128 -> 256 below -0.5 scores 50 % in 7 s; Max-256 is slower than 1x.
    assert EngineConfig.from_yaml(cfg).escalation.step(128) == (256, -0.5)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["choice"]["escalation"] == {"below_logprob": -0.5, "to_budget": {"128": 256}}
    out = capsys.readouterr().out
    assert report["settings"][0]["qualifies"] and "chosen (accuracy): 128 -> 256 below -0.5" in out
    # No group columns in these predictions: one group; LOW's record 1 ends at Max-256 (right, as the reference).
    assert "| all | 4 | 3 | 2 | -25.0 | Max-128 3: 1 (2); Max-256 1: 1 (1) |" in out
    # The chosen setting against the reference, record by record: 50 % against 75 %, in 7 s against 8 s.
    (gap,) = report["choice"]["intervals"]
    assert gap["n"] == 4 and gap["gap_points"] == -25.0 and math.isclose(gap["speedup"], 8.0 / 7.0)
    assert gap["gap_interval"][0] <= -25.0 <= gap["gap_interval"][1]
    assert job.main(["--runs", str(run), "--min-speedup", "50"]) == 1  # nothing that fast: said, not guessed


# Crop re-reads at Max-128: record 0 was not zoomed (no re-read), record 1's re-read is right and sure, record 2's
# wrong and unsure, record 3 was an error.
REREAD = Rung.of([0, 1, 0, 0], [-0.2, -0.1, -2.0, None], [0.5] * 4, [True, False, False, True])


def test_a_sure_crop_reread_stands_and_an_unsure_one_goes_on():
    rereads = {128: REREAD}
    # Only record 1 is unsure at Max-128 (-0.9 < -0.5); its re-read (-0.1) stands: no Max-256 pass.
    stands = escalate({128: LOW, 256: HIGH}, [128, 256], [-0.5], rereads, -0.5)
    assert (stands.accuracy, stands.seconds, stands.escalated) == (50.0, 4.5, 0.25)
    assert stands.name == "128 -> 256 below -0.5, crop re-read below -0.5"
    # A re-read threshold above every log-probability sends it on: both passes are paid.
    on = escalate({128: LOW, 256: HIGH}, [128, 256], [-0.5], rereads, 0.0)
    assert (on.accuracy, on.seconds) == (50.0, 4.0 + 0.5 + 3.0)
    # Unsure everywhere (threshold 0 at Max-128): record 0 has no re-read and goes straight to Max-256, record 2's
    # re-read is unsure and goes on, record 1's stands.
    score, seconds, again = escalated_records({128: LOW, 256: HIGH}, [128, 256], [0.0], rereads, -0.5)
    assert score.tolist() == [1.0, 1.0, 1.0, 0.0] and seconds.tolist() == [4.0, 1.5, 4.5, 1.0]
    assert again.tolist() == [True, True, True, False]
    # Without a re-read threshold the re-reads are ignored: the plain rule.
    assert escalate({128: LOW, 256: HIGH}, [128, 256], [0.0], rereads) == escalate({128: LOW, 256: HIGH}, [128, 256],
                                                                                   [0.0])


def test_reread_settings_are_scored_and_written(tmp_path):
    outs = candidate_outcomes({128: LOW, 256: HIGH}, [-0.5, -0.05], {128: REREAD})
    assert {o.reread_below for o in outs if o.thresholds} == {None, -0.5, -0.05}
    scored = score_settings([outs], [(75.0, 8.0)])
    best = next(s for s in scored if s.reread_below == -0.5 and s.thresholds == (-0.5,))
    block = escalation_config(best)
    assert block == {"below_logprob": -0.5, "to_budget": {128: 256}, "reread_crop_below": -0.5}
    assert EngineConfig.model_validate({"escalation": block}).escalation.reread_crop_below == -0.5

    run = _predictions(tmp_path)
    rows = pq.read_table(run / "predictions.parquet").to_pylist()
    # r3..r0 are LOW's records 0..3; re-reads exist for LOW's records 1 and 2 only.
    rows += [{"method": "qzoom_reread", "budget": 128, "id": f"r{3 - i}", "score": float(REREAD.score[i]),
              "answer_logprob": float(REREAD.logprob[i]), "model_s": 0.5, "error": None, "escalated": False}
             for i in (1, 2)]
    pq.write_table(pa.Table.from_pylist(rows), run / "predictions.parquet")
    got = read_rereads(run)[128]  # sorted by id: r0..r3 are LOW's records 3..0
    assert got.error.tolist() == [True, False, False, True] and got.score.tolist() == [0.0, 0.0, 1.0, 0.0]
    plain = tmp_path / "plain"
    plain.mkdir()
    assert read_rereads(_predictions(plain)) == {}


def test_timing_repeats_average_their_model_times_and_must_agree():
    from qzoom_ray.eval.escalation_runs import Reference, averaged_repeats

    def run(seconds: float, scores=(1, 0, 0, 0)):
        low = Rung.of(list(scores), [-0.1, -0.9, -0.05, -0.3], [seconds] * 4)
        ref = Reference("baseline Max-1024", 75.0, 8 * seconds, (1.0, 1.0, 1.0, 0.0), (2 * seconds,) * 4)
        return {128: low, 256: HIGH}, ref, {128: REREAD}

    ladder, ref, rereads = averaged_repeats([run(1.0), run(2.0)], ["a", "a2"])
    assert ladder[128].seconds.tolist() == [1.5] * 4 and ladder[256].seconds.tolist() == HIGH.seconds.tolist()
    assert ref.seconds == 12.0 and ref.record_seconds == (3.0,) * 4 and ref.accuracy == 75.0
    assert rereads[128].seconds.tolist() == [0.5] * 4
    single = run(1.0)
    assert averaged_repeats([single], ["a"]) is single
    with pytest.raises(ValueError, match="a2: Max-128 answers differ"):
        averaged_repeats([run(1.0), run(1.0, scores=(1, 1, 0, 0))], ["a", "a2"])
