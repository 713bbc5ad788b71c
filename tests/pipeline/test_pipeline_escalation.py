"""Escalation in the batch job's stages: the same answers, flags and costs as the in-process engine."""

from __future__ import annotations

import statistics

import pyarrow as pa
import pytest
from conftest import engine_config
from pipeline_helpers import good_rows, rows_table

from qzoom_ray.config import EngineConfig
from qzoom_ray.model.engine import QZoomEngine
from qzoom_ray.model.state import EngineRecord
from qzoom_ray.pipeline import schema as S
from qzoom_ray.pipeline import stages
from qzoom_ray.pipeline.config import InputConfig
from qzoom_ray.pipeline.summary import summarise

PX = 28 * 28
ROWS = good_rows(8)
# A small global view, so that Max-32 sees more than Max-16 and can change the answer.
ZOOM = {"min_pixels": 4 * PX, "max_pixels": 16 * PX}


def records() -> list[EngineRecord]:
    return [EngineRecord(r["id"], r["image"], r["question"], gate_thresh=r["gate_thresh"]) for r in ROWS]


@pytest.fixture(scope="module", params=[(None, None), (-1e9, None), (-1e9, 3.0)],
                ids=["plain", "crop-reread", "crop-reread-floored"])
def escalating(tiny_model_dir, request):
    """An engine config whose threshold, the median first answer's log-probability, escalates about half; with a
    crop re-read threshold no re-read is below, the unsure zoomed answers are their crop's. Floored: both crop
    reads (the zoom pass and the re-read) at no more than 1/3 of source resolution."""
    reread_below, floor = request.param
    zoom = ZOOM if floor is None else {**ZOOM, "roi_min_downscale": floor, "reread_min_downscale": floor}
    plain = QZoomEngine(engine_config(tiny_model_dir, zoom=zoom, max_batch_size=3))
    median = statistics.median(r.answer_logprob for r in plain.generate(records()))
    esc = {"below_logprob": min(median, 0.0), "to_budget": {16: 32}, "reread_crop_below": reread_below}
    cfg = engine_config(tiny_model_dir, zoom=zoom, max_batch_size=3, escalation=esc)
    reference = {r.id: r for r in QZoomEngine(cfg, loaded=plain.loaded).generate(records())}
    if floor is not None:  # the floor bites on these records' crops
        unfloored = QZoomEngine(engine_config(tiny_model_dir, zoom=ZOOM, max_batch_size=3), loaded=plain.loaded)
        assert sum(r.roi_visual_tokens for r in plain.generate(records())) < sum(
            r.roi_visual_tokens for r in unfloored.generate(records()))
    if reread_below is not None:
        assert any(r.route == "crop_reread" for r in reference.values())
    return cfg.model_dump(), reference


@pytest.fixture(scope="module")
def prepared(escalating):
    table = stages.normalise_input(rows_table(ROWS), InputConfig().model_dump())
    return stages.PrepareImages(escalating[0], s3fs_kwargs={})(table)


@pytest.mark.parametrize("mode", ["recompute", "kv", "colocated"])
def test_stages_escalate_like_the_engine(escalating, prepared, mode):
    engine, reference = escalating
    escalated = {rid for rid, r in reference.items() if r.escalated}
    assert escalated and escalated != set(reference)  # some answers were re-run, some stood
    if mode == "colocated":
        out = stages.CoarseZoomPass(engine)(prepared)
    else:
        kv = mode == "kv"
        after_coarse = stages.CoarsePass(engine, transfer_kv=kv)(prepared)
        # Sure direct answers drop their bytes at once; rows that may be re-run keep them.
        for row in after_coarse.to_pylist():
            if row["route"] == "direct":
                assert (row[S.IMAGE_BYTES] is not None) == (row["answer_logprob"] < engine["escalation"]["below_logprob"])
        out = stages.ZoomPass(engine, transfer_kv=kv)(stages.CropPrep(engine)(after_coarse))
    rows = {r["id"]: r for r in out.to_pylist()}
    for rid, ref in reference.items():
        row = rows[rid]
        assert (row["answer"], row["route"], row["zoomed"], row["escalated"]) == (
            ref.answer, ref.route, ref.zoomed, ref.escalated)
        assert row["coarse_visual_tokens"] == ref.coarse_visual_tokens
        assert row["roi_visual_tokens"] == ref.roi_visual_tokens
        assert row["escalated_visual_tokens"] == ref.escalated_visual_tokens
        assert row["answer_logprob"] == pytest.approx(ref.answer_logprob, abs=1e-4)
        assert row[S.IMAGE_BYTES] is None  # freed by the last stage
        if ref.escalated:  # both answers' time is on the row
            first_prep = prepared.filter(pa.compute.equal(prepared.column(S.ID), rid)).column("prep_s")[0].as_py()
            assert row["prep_s"] > first_prep and row["coarse_s"] > 0


def test_summary_counts_escalated_rows_and_their_tokens():
    table = pa.table({
        S.ID: ["a", "b", "c"], "zoomed": [False, True, None], "escalated": [True, False, None],
        S.ERROR: [None, None, "bad image"], "coarse_visual_tokens": [32, 16, None],
        "roi_visual_tokens": [0, 9, None], "escalated_visual_tokens": [16, 0, None],
        "full_res_visual_tokens": [100, 100, None],
    })
    s = summarise(table, 3, 1.0)
    assert (s.escalated, s.visual_tokens, s.errors, s.crop_rereads) == (1, 32 + 16 + 9 + 16, 1, 0)
    assert "escalated    1 (answered again: 0 from their RoI crop, 1 at a larger budget)" in s.to_text()
    reread = summarise(table.append_column("route", pa.array(["crop_reread", "zoom", "error"])), 3, 1.0)
    assert reread.crop_rereads == 1 and "1 from their RoI crop, 0 at a larger budget" in reread.to_text()


def test_summary_reads_outputs_written_before_escalation_existed(tmp_path):
    import pyarrow.parquet as pq

    from qzoom_ray.pipeline.config import StorageConfig
    from qzoom_ray.pipeline.io import OutputDir
    from qzoom_ray.pipeline.summary import read_output

    old = pa.table({S.ID: ["a"], "zoomed": [True], S.ERROR: pa.nulls(1, pa.string()),
                    "coarse_visual_tokens": pa.array([16], pa.int32()), "roi_visual_tokens": pa.array([9], pa.int32()),
                    "full_res_visual_tokens": pa.array([50], pa.int32())})
    pq.write_table(old, tmp_path / "part-old.parquet")
    table = read_output(OutputDir(str(tmp_path), StorageConfig()))
    s = summarise(table, 0, 1.0)
    assert (s.records, s.escalated, s.visual_tokens) == (1, 0, 25)


def test_batch_job_and_endpoint_accept_escalation():
    from qzoom_ray.pipeline.config import BatchJobConfig
    from qzoom_ray.serve.config import ServeArgs

    engine = {"escalation": {"below_logprob": -0.5, "to_budget": {128: 256}}}
    assert BatchJobConfig.model_validate({"engine": engine}).engine.escalation.to_budget == {128: 256}
    assert ServeArgs.model_validate({"engine": engine}).engine.escalation.below_logprob == -0.5
    assert EngineConfig.model_validate({"escalation": engine["escalation"]}).escalation is not None


def test_colocated_retries_of_zoomed_rows_reuse_the_decoded_image(escalating, prepared, monkeypatch):
    from qzoom_ray.model import preprocess

    engine, reference = escalating
    sources: list[str] = []
    real = preprocess.load_image
    monkeypatch.setattr(preprocess, "load_image", lambda src, **kw: sources.append(type(src).__name__) or real(src, **kw))
    stages.CoarseZoomPass(engine)(prepared)
    again = [r for r in reference.values() if r.escalated]
    zoomed_first = {r["id"] for r in ROWS if r["gate_thresh"] == 0.0}
    # Direct rows were never decoded on this actor, zoomed ones were (for their crop).
    assert sources.count("bytes") == sum(r.id not in zoomed_first for r in again)
    assert len(sources) - sources.count("bytes") == sum(r.id in zoomed_first for r in again) > 0
