"""Stages called directly on Arrow batches (no Ray): they must give the engine's own answers."""

from __future__ import annotations

import pyarrow as pa
import pytest
from conftest import engine_config
from pipeline_helpers import HOSTILE_ERRORS, good_rows, hostile_rows, rows_table

from qzoom_ray.model.engine import QZoomEngine
from qzoom_ray.model.state import EngineRecord
from qzoom_ray.pipeline import schema as S
from qzoom_ray.pipeline.config import InputConfig
from qzoom_ray.pipeline.stages import (
    CoarsePass,
    CoarseZoomPass,
    CropPrep,
    PrepareImages,
    ZoomPass,
    normalise_input,
)
from qzoom_ray.pipeline.stages.common import apply_updates, finalize_table

ROWS = good_rows(7)


@pytest.fixture(scope="module")
def engine_dict(tiny_model_dir):
    return engine_config(tiny_model_dir, generation={"max_new_tokens": 5}, max_batch_size=3).model_dump()


@pytest.fixture(scope="module")
def prepared(engine_dict):
    table = normalise_input(rows_table(ROWS), InputConfig().model_dump())
    return PrepareImages(engine_dict, s3fs_kwargs={})(table)


@pytest.fixture(scope="module")
def reference(engine_dict):
    from qzoom_ray.config import EngineConfig

    engine = QZoomEngine(EngineConfig.model_validate(engine_dict))
    records = [EngineRecord(r["id"], r["image"], r["question"], gate_thresh=r["gate_thresh"]) for r in ROWS]
    return {res.id: res for res in engine.generate(records)}


def split_pipeline(engine_dict, table, kv: bool):
    table = CoarsePass(engine_dict, transfer_kv=kv)(table)
    table = CropPrep(engine_dict)(table)
    return ZoomPass(engine_dict, transfer_kv=kv)(table)


@pytest.mark.parametrize("mode", ["recompute", "kv", "colocated"])
def test_stages_match_in_process_engine(engine_dict, prepared, reference, mode):
    if mode == "colocated":
        out = CoarseZoomPass(engine_dict)(prepared)
    else:
        out = split_pipeline(engine_dict, prepared, kv=mode == "kv")
    rows = {r["id"]: r for r in out.to_pylist()}
    assert set(rows) == set(reference)
    assert sum(r["zoomed"] for r in rows.values()) == 3  # ids 0, 3, 6 have gate_thresh 0
    for rid, ref in reference.items():
        row = rows[rid]
        assert (row["answer"], row["route"], row["zoomed"]) == (ref.answer, ref.route, ref.zoomed)
        assert row["error"] is None and row["coarse_visual_tokens"] == ref.coarse_visual_tokens
        assert row["roi_visual_tokens"] == ref.roi_visual_tokens
        assert row["answer_logprob"] == pytest.approx(ref.answer_logprob, abs=1e-4)
        if ref.zoomed:
            assert row["roi_box_px"] == list(ref.roi_box_px) and row["zoom_s"] > 0 and row["crop_s"] > 0
            assert row[S.ROI_PIXELS] is None and row[S.PREFIX_STATE] is None  # spent columns freed


def test_finalize_gives_declared_schema_and_passthrough(engine_dict, prepared):
    from qzoom_ray.pipeline.config import BatchJobConfig
    from qzoom_ray.pipeline.runner import output_schema

    out = CoarseZoomPass(engine_dict)(prepared)
    schema = output_schema(BatchJobConfig(), rows_table(ROWS).schema)
    final = finalize_table(out, schema, "m", "fp")
    assert final.schema == schema
    assert not [c for c in final.column_names if c.startswith(S.PREFIX)]
    assert "image" not in final.column_names  # image bytes are not copied to the output
    assert final.column("input_answer").to_pylist() == [r["answer"] for r in ROWS]
    assert final.column("gate_thresh").to_pylist() == [r["gate_thresh"] for r in ROWS]


def test_hostile_records_become_errors_not_exceptions(engine_dict, tmp_path):
    rows = hostile_rows(tmp_path)
    table = normalise_input(rows_table(rows), InputConfig().model_dump())
    table = PrepareImages(engine_dict, s3fs_kwargs={})(table)
    out = split_pipeline(engine_dict, table, kv=False)
    errors = dict(zip(out.column("id").to_pylist(), out.column("error").to_pylist(), strict=True))
    assert set(errors) == set(HOSTILE_ERRORS)
    for rid, fragment in HOSTILE_ERRORS.items():
        assert errors[rid] and fragment in errors[rid], (rid, errors[rid])
    assert set(out.column("route").to_pylist()) == {"error"}


def test_normalise_drops_done_ids_and_keeps_types():
    table = pa.table({"key": [1, 2, 3], "q": ["a", "b", "c"], "image_path": ["x.png", "/abs/y.png", "s3://b/z.png"]})
    cfg = InputConfig(path="/data/in.jsonl", id_column="key", question_column="q").model_dump()
    out = normalise_input(table, cfg, done=pa.array(["2"]))
    assert out.column(S.ID).to_pylist() == ["1", "3"]
    assert out.column(S.QUESTION).to_pylist() == ["a", "c"]
    assert out.column(S.IMAGE_URI).to_pylist() == ["/data/x.png", "s3://b/z.png"]
    assert "key" not in out.column_names


def test_apply_updates_types_all_null_columns():
    table = pa.table({"id": ["a", "b"]})
    out = apply_updates(table, [None, {"gate_score": None, "roi_box_px": None}])
    assert out.schema.field("gate_score").type == pa.float64()
    assert out.schema.field("roi_box_px").type == S.OUTPUT_SCHEMA.field("roi_box_px").type
