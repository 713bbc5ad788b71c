"""Evaluation end to end with the tiny random model, the paper's speedup arithmetic, and the gallery."""

from __future__ import annotations

import json

import pytest
from conftest import engine_config, load_job

from qzoom_ray.eval.data import load_labelled
from qzoom_ray.eval.evaluate import EvalSettings, SettingRun, box_metrics, min_tokens_for, run_evaluation
from qzoom_ray.eval.gallery import build_gallery
from qzoom_ray.eval.report import markdown_table, summarise, tradeoff, write_report


@pytest.fixture(scope="module")
def synth_parquet(tmp_path_factory):
    from qzoom_ray.synth.generator import generate_records
    from qzoom_ray.synth.writer import write_parquet

    path = tmp_path_factory.mktemp("synth") / "synth.parquet"
    write_parquet(generate_records(3, seed=7, split="ordinary"), path)
    return path


def test_box_metrics():
    m = box_metrics((0, 0, 10, 10), (6, 6, 16, 16))  # evidence centre (11, 11) lies outside
    assert m["roi_iou"] == pytest.approx(16 / 184) and m["roi_centre_hit"] == 0.0 and m["roi_coverage"] == 0.16
    m = box_metrics((0, 0, 100, 100), (40, 40, 60, 60))
    assert m["roi_centre_hit"] == 1.0 and m["roi_coverage"] == 1.0 and m["roi_iou"] == pytest.approx(0.04)
    assert box_metrics(None, (0, 0, 1, 1))["roi_iou"] is None


def test_min_tokens_follow_the_paper():
    assert [min_tokens_for(b, None) for b in (64, 128, 256, 576, 4096)] == [32, 64, 128, 256, 256]
    assert min_tokens_for(64, 100) == 64


def _row(method, budget, acc, sps, tok):
    return {"method": method, "budget": budget, "accuracy": acc, "records_per_s_model": sps, "visual_tokens": tok}


def test_tradeoff_reproduces_the_paper_doc_numbers():
    """Qwen2.5-VL-7B Doc/OCR points of results §1c: 2.52x (plot reading; 1.80/0.71 = 2.54x), 53.0% fewer
    tokens, +1.1 points at max fidelity."""
    base = [(576, 81.7, 3.12, 515), (1024, 84.4, 2.09, 852), (2048, 85.5, 1.34, 1318), (4096, 85.9, 0.71, 2087)]
    qz = [(256, 82.2, 3.97, 376), (384, 84.8, 2.86, 513), (576, 85.6, 2.49, 659), (1024, 86.3, 1.80, 977),
          (2048, 86.7, 1.14, 1529), (4096, 87.0, 0.64, 2303)]
    rows = [_row("baseline", *b) for b in base] + [_row("qzoom", *q) for q in qz]
    t = tradeoff(rows, EvalSettings(paper_qzoom_budget=1024))
    assert t["paper_fixed"]["speedup"] == pytest.approx(1.80 / 0.71)
    assert t["paper_fixed"]["token_reduction"] == pytest.approx(1 - 977 / 2087)
    assert round(100 * t["paper_fixed"]["token_reduction"], 1) == 53.2
    assert t["gain_at_max_fidelity"] == pytest.approx(1.1)
    # Matched within 1 point of 85.9: Q-Zoom's fastest such point is Max-576 (85.6 at 2.49).
    assert t["matched"]["qzoom_budget"] == 576 and t["matched"]["speedup"] == pytest.approx(2.49 / 0.71)


def test_evaluation_end_to_end_with_the_tiny_model(tiny_model_dir, synth_parquet, tmp_path):
    rows = load_labelled(synth_parquet)
    cfg = engine_config(tiny_model_dir, generation={"max_new_tokens": 2})
    settings = EvalSettings(baseline_budgets=[16, 32], qzoom_budgets=[16], batch_size=2, warmup=0)
    runs = run_evaluation(rows, cfg, settings)
    assert [(r.method, r.budget) for r in runs] == [("baseline", 16), ("baseline", 32), ("qzoom", 16)]
    for run in runs:
        assert [p["id"] for p in run.predictions] == [r.id for r in rows]
        assert all(p["error"] is None and 0.0 <= p["score"] <= 1.0 for p in run.predictions)
        assert all(p["visual_tokens"] <= 2 * run.budget + 8 for p in run.predictions)
    report = write_report(runs, settings, tmp_path / "out")
    names = ("summary.csv", "summary.md", "tradeoff.json", "pareto.png", "predictions.parquet", "confidence.png")
    for name in names:
        assert (tmp_path / "out" / name).stat().st_size > 0
    by = {(r["method"], r["budget"]): r for r in report["rows"]}
    assert by[("baseline", 16)]["gate_rate"] == 0.0 and by[("baseline", 16)]["n"] == 3
    assert by[("baseline", 16)]["visual_tokens"] < by[("baseline", 32)]["visual_tokens"]
    assert "question_type=fine" in report["markdown"] or "question_type=coarse" in report["markdown"]
    t = json.loads((tmp_path / "out" / "tradeoff.json").read_text())
    assert "gain_at_max_fidelity" in t and "baseline_peak" in t
    curves = json.loads((tmp_path / "out" / "confidence.json").read_text())
    assert set(curves) == {"baseline Max-16", "baseline Max-32", "qzoom Max-16"}
    assert curves["qzoom Max-16"]["1"] == pytest.approx(by[("qzoom", 16)]["accuracy"], abs=0.01)

    # The gallery renders from those predictions, with inline images and the RoI map of Q-Zoom.
    preds = [p for r in runs for p in r.predictions]
    page = build_gallery(rows, preds, tmp_path / "g.html").read_text()
    assert page.count("data:image/jpeg;base64,") >= 3 and "Q-Zoom Max-16" in page
    assert rows[0].question.split("\n")[0].replace("'", "&#x27;") in page


def test_jobs_run_on_a_labelled_file(tiny_model_dir, synth_parquet, tmp_path):
    out = tmp_path / "run"
    rc = load_job("evaluate").main(
        ["--data", str(synth_parquet), "--model", tiny_model_dir, "--limit", "2", "--baseline-budgets", "16",
         "--qzoom-budgets", "16", "--max-new-tokens", "2", "--threads", "2", "--out", str(out)]
    )
    assert rc == 0 and (out / "summary.md").exists()
    rc = load_job("visualize").main(["--data", str(synth_parquet), "--run", str(out), "--out", str(tmp_path / "g.html")])
    assert rc == 0 and "<img" in (tmp_path / "g.html").read_text()


def test_report_without_qzoom_rows(tmp_path):
    pred = {"score": 1.0, "model_s": 0.5, "visual_tokens": 10, "coarse_tokens": 10, "roi_tokens": 0, "zoomed": False,
            "route": "baseline", "roi_iou": None, "roi_centre_hit": None, "roi_coverage": None, "error": None,
            "question_type": "fine", "split": None, "category": None}
    report = write_report([SettingRun("baseline", 64, 1.0, [pred, dict(pred, score=0.0)])], EvalSettings(), tmp_path)
    assert report["rows"][0]["accuracy"] == 50.0 and report["rows"][0]["records_per_s_model"] == 2.0
    assert "matched" not in report["tradeoff"]


def test_baseline_can_run_on_another_checkpoint(tiny_model_dir, synth_parquet, tmp_path):
    rows = load_labelled(synth_parquet, limit=2)
    qz_cfg = engine_config(tiny_model_dir, generation={"max_new_tokens": 2})
    base_cfg = engine_config("embedded:tiny-base", model={"require_heads": False}, generation={"max_new_tokens": 2})
    settings = EvalSettings(baseline_budgets=[16], qzoom_budgets=[16], batch_size=2, warmup=0)
    runs = run_evaluation(rows, qz_cfg, settings, baseline_config=base_cfg)
    assert [(r.method, r.budget) for r in runs] == [("baseline", 16), ("qzoom", 16)]
    # The baseline rows are the other checkpoint's answers: the same as evaluating it alone.
    alone = run_evaluation(rows, base_cfg, EvalSettings(baseline_budgets=[16], qzoom_budgets=[], batch_size=2, warmup=0))
    assert [p["prediction"] for p in runs[0].predictions] == [p["prediction"] for p in alone[0].predictions]
    same = run_evaluation(rows, qz_cfg, EvalSettings(baseline_budgets=[16], qzoom_budgets=[], batch_size=2, warmup=0))
    assert [p["prediction"] for p in runs[0].predictions] != [p["prediction"] for p in same[0].predictions]

    out = tmp_path / "run"
    rc = load_job("evaluate").main(
        ["--data", str(synth_parquet), "--model", tiny_model_dir, "--baseline-model", "embedded:tiny-base",
         "--limit", "2", "--baseline-budgets", "16", "--qzoom-budgets", "16", "--max-new-tokens", "2", "--out", str(out)]
    )
    assert rc == 0 and "baseline: embedded:tiny-base" in (out / "summary.md").read_text()


def test_oracle_rows_zoom_on_the_evidence_box(tiny_model_dir, synth_parquet, tmp_path):
    rows = load_labelled(synth_parquet)
    rows[-1].evidence_box = None  # a row without a box gets an error row, not a silent skip
    cfg = engine_config(tiny_model_dir, generation={"max_new_tokens": 2})
    settings = EvalSettings(baseline_budgets=[16], qzoom_budgets=[16], oracle_budgets=[16], batch_size=2, warmup=0)
    runs = run_evaluation(rows, cfg, settings)
    assert [(r.method, r.budget) for r in runs] == [("baseline", 16), ("qzoom", 16), ("qzoom_oracle", 16)]
    oracle = runs[-1].predictions
    assert [p["id"] for p in oracle] == [r.id for r in rows]
    for p in oracle[:-1]:
        assert p["error"] is None and p["zoomed"] and p["route"] == "zoom"
        assert p["roi_iou"] > 0.8  # the crop is the evidence box (grown only where below min_roi_px)
    assert oracle[-1]["error"] == "no evidence box" and oracle[-1]["score"] == 0.0
    report = write_report(runs, settings, tmp_path / "out")
    assert "qzoom_oracle" in report["markdown"] and "speedup" in report["markdown"]
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 0


def test_oracle_rows_run_without_a_qzoom_ladder(tiny_model_dir, synth_parquet):
    rows = load_labelled(synth_parquet)[:2]
    cfg = engine_config(tiny_model_dir, generation={"max_new_tokens": 2})
    settings = EvalSettings(baseline_budgets=[16], qzoom_budgets=[], oracle_budgets=[16], batch_size=2, warmup=0)
    runs = run_evaluation(rows, cfg, settings)
    assert [(r.method, r.budget) for r in runs] == [("baseline", 16), ("qzoom_oracle", 16)]
    assert all(p["zoomed"] for p in runs[-1].predictions)


def test_escalation_applies_to_qzoom_rows_only(tiny_model_dir, synth_parquet, tmp_path):
    rows = load_labelled(synth_parquet)
    cfg = engine_config(
        tiny_model_dir, generation={"max_new_tokens": 2}, escalation={"below_logprob": 0.0, "to_budget": {16: 32}}
    )
    settings = EvalSettings(baseline_budgets=[16], qzoom_budgets=[16], batch_size=2, warmup=0)
    runs = {r.method: r for r in run_evaluation(rows, cfg, settings)}
    assert not any(p["escalated"] for p in runs["baseline"].predictions)
    assert all(p["escalated"] for p in runs["qzoom"].predictions)
    row = summarise(runs["qzoom"])
    assert row["escalation_rate"] == 1.0 and "escalation_rate" not in summarise(runs["baseline"])
    assert "escalation_rate" in markdown_table([summarise(runs["baseline"]), row])
    report = write_report(list(runs.values()), settings, tmp_path)
    assert "escalation_rate" in report["markdown"] and (tmp_path / "pareto.png").stat().st_size > 0


def test_crop_rereads_answer_every_zoomed_record_on_its_crop(tiny_model_dir, synth_parquet, tmp_path):
    from qzoom_ray.eval.escalation_runs import read_rereads
    from qzoom_ray.images import crop_image, load_image
    from qzoom_ray.model.engine import QZoomEngine
    from qzoom_ray.model.state import EngineRecord

    rows = load_labelled(synth_parquet)
    cfg = engine_config(tiny_model_dir, generation={"max_new_tokens": 2}, zoom={"gate_thresh": 0.0})
    settings = EvalSettings(baseline_budgets=[16], qzoom_budgets=[16], crop_rereads=True, batch_size=2, warmup=0,
                            min_tokens=4)
    runs = run_evaluation(rows, cfg, settings)
    assert [(r.method, r.budget) for r in runs] == [("baseline", 16), ("qzoom", 16), ("qzoom_reread", 16)]
    zoomed = {p["id"]: p for p in runs[1].predictions if p["route"] == "zoom"}
    assert zoomed and [p["id"] for p in runs[2].predictions] == list(zoomed)
    # Each re-read is the crop of the record's own box, asked alone and never zoomed.
    row = next(r for r in rows if r.id in zoomed)
    crop = crop_image(load_image(row.image), tuple(zoomed[row.id]["roi_box"]))
    alone = QZoomEngine(cfg).generate([EngineRecord(row.id, crop, row.question, min_pixels=4 * 28 * 28,
                                                    max_pixels=16 * 28 * 28, gate_thresh=2.0)])[0]
    got = next(p for p in runs[2].predictions if p["id"] == row.id)
    assert got["prediction"] == alone.answer and got["route"] == "direct" and got["roi_iou"] is None

    report = write_report(runs, settings, tmp_path / "out")
    assert [r["qzoom_budget"] for r in report["tradeoff"]["against_peak"]] == [16]  # re-reads are not a setting
    assert sorted(read_rereads(tmp_path / "out")) == [16]

    esc = engine_config(tiny_model_dir, escalation={"below_logprob": -0.5, "to_budget": {16: 32}})
    with pytest.raises(ValueError, match="without escalation"):
        run_evaluation(rows, esc, settings)
    args = ["--data", str(synth_parquet), "--model", tiny_model_dir, "--limit", "1", "--crop-rereads",
            "--out", str(tmp_path / "job")]
    assert load_job("evaluate").main(args) == 2  # --crop-rereads needs --no-escalation
