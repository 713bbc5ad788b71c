"""The job on a local Ray with 2 logical GPUs: separate GPU pools, hostile inputs, S3 in and out."""

from __future__ import annotations

import json
import re

import pytest
from pipeline_helpers import HOSTILE_ERRORS, good_rows, hostile_rows, job_config, read_output, write_parquet

from qzoom_ray.pipeline.runner import run_batch

pytestmark = pytest.mark.usefixtures("ray_two_gpus")
GOOD = good_rows(10)


@pytest.fixture(scope="module")
def gpu_job(tiny_model_dir, tmp_path_factory):
    """One run shared by the assertions below: good and hostile rows, coarse and zoom pools 1 GPU each."""
    tmp = tmp_path_factory.mktemp("gpu_job")
    rows = GOOD + hostile_rows(tmp)
    write_parquet(rows, tmp / "in.parquet")
    gpu_pool = {"num_gpus": 1, "num_cpus": 0.1}
    cfg = job_config(
        tiny_model_dir, str(tmp / "in.parquet"), str(tmp / "out"), pools={"coarse": gpu_pool, "zoom": gpu_pool}
    )
    summary = run_batch(cfg)
    return rows, read_output(tmp / "out").to_pylist(), summary, tmp / "out"


def _gpu_ids(device: str) -> set[str]:
    match = re.search(r"\[gpu ([\d,]+)\]", device or "")
    assert match, device
    return set(match.group(1).split(","))


def test_coarse_and_zoom_pools_get_separate_gpus(gpu_job):
    _, out, _, _ = gpu_job
    coarse = {r["coarse_device"] for r in out if r["coarse_device"]}
    zoom = {r["zoom_device"] for r in out if r["zoom_device"]}
    assert len(coarse) == 1 and len(zoom) == 1, (coarse, zoom)  # one actor per pool
    assert _gpu_ids(coarse.pop()).isdisjoint(_gpu_ids(zoom.pop()))


def test_every_input_id_exactly_once_with_answers_or_clear_errors(gpu_job):
    rows, out, summary, _ = gpu_job
    ids = [r["id"] for r in out]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    by_id = {r["id"]: r for r in out}
    for rid, fragment in HOSTILE_ERRORS.items():
        assert by_id[rid]["answer"] is None and fragment in by_id[rid]["error"], by_id[rid]
    for r in GOOD:
        got = by_id[r["id"]]
        assert got["error"] is None and got["answer"] and got["output_tokens"] > 0
        assert got["answer_logprob"] is not None and got["answer_logprob"] <= 0.0
        assert got["zoomed"] == (r["gate_thresh"] == 0.0)
        assert got["input_answer"] == r["answer"]  # ground truth passed through, renamed
        if got["zoomed"]:
            assert got["roi_visual_tokens"] > 0 and len(got["roi_box_px"]) == 4 and got["zoom_s"] > 0
    assert (summary.records, summary.errors, summary.zoomed) == (len(rows), len(HOSTILE_ERRORS), 4)


def test_summary_and_manifest_next_to_output(gpu_job):
    _, out, summary, out_dir = gpu_job
    saved = json.loads((out_dir / "_qzoom_summary.json").read_text())
    assert saved["records"] == len(out) and saved["records_per_s"] > 0
    assert summary.visual_tokens == sum((r["coarse_visual_tokens"] or 0) + (r["roi_visual_tokens"] or 0) for r in out)
    manifest = json.loads((out_dir / "_qzoom_job.json").read_text())
    assert {r["config_fingerprint"] for r in out} == {manifest["fingerprint"]}


def test_s3_input_and_output_on_moto_server(tiny_model_dir, moto_s3, tmp_path, monkeypatch):
    """JSONL manifest with s3:// image URIs in, Parquet out, through a real S3 API on loopback (kv transfer).

    Escalation is on with threshold 0, so every answered row is answered again on the zoom pool, from the
    bytes the prepare stage read from S3 (they must travel that far for direct rows too).
    """
    import s3fs

    for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(var, value)
    fs = s3fs.S3FileSystem(endpoint_url=moto_s3, key="testing", secret="testing")
    fs.mkdir("qzoom-test")
    rows = good_rows(6, prefix="s")
    lines = []
    for r in rows:
        fs.pipe_file(f"qzoom-test/images/{r['id']}.jpg", r["image"])
        lines.append({"id": r["id"], "question": r["question"], "image_path": f"images/{r['id']}.jpg",
                      "gate_thresh": r["gate_thresh"]})
    lines.append({"id": "s_missing", "question": "q?", "image_path": "images/none.jpg", "gate_thresh": 2.0})
    fs.pipe_file("qzoom-test/in/manifest.jsonl", "\n".join(json.dumps(x) for x in lines).encode())

    cfg = job_config(
        tiny_model_dir, "s3://qzoom-test/in/manifest.jsonl", "s3://qzoom-test/out/",
        storage={"endpoint_url": moto_s3}, zoom_transfer="kv",
        engine={"escalation": {"below_logprob": 0.0, "to_budget": {256: 512}}},
    )
    # Relative image paths resolve against the manifest's folder, not the working directory.
    cfg.input.image_root = "s3://qzoom-test"
    summary = run_batch(cfg)
    out = read_output("qzoom-test/out", filesystem=fs).to_pylist()
    assert sorted(r["id"] for r in out) == sorted(x["id"] for x in lines)
    by_id = {r["id"]: r for r in out}
    assert "not found" in by_id["s_missing"]["error"]
    assert all(by_id[r["id"]]["answer"] for r in rows)
    assert sum(by_id[r["id"]]["zoomed"] for r in rows) == 2 and summary.zoomed == 2
    assert all(by_id[r["id"]]["escalated"] and by_id[r["id"]]["escalated_visual_tokens"] > 0 for r in rows)
    assert not by_id["s_missing"]["escalated"] and summary.escalated == len(rows)
    assert fs.exists("qzoom-test/out/_qzoom_job.json") and fs.exists("qzoom-test/out/_qzoom_summary.json")
