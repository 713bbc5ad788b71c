"""Configs load, every field is described, the CLI is thin, and resume refuses a changed config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import BaseModel

from qzoom_ray.pipeline.config import BatchJobConfig
from qzoom_ray.pipeline.resume import MANIFEST, ResumeError, prepare_output

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["local.yaml", "cluster-gpu.yaml"])
def test_job_configs_load(name):
    cfg = BatchJobConfig.from_yaml(REPO / "configs" / name)
    assert cfg.fingerprint()


def test_local_config_fits_a_two_cpu_ray():
    pools = BatchJobConfig.from_yaml(REPO / "configs" / "local.yaml").pools
    assert sum(p.num_cpus * p.size for p in (pools.prepare, pools.coarse, pools.crop, pools.zoom)) <= 1.0


def test_kuberay_manifest_runs_the_job():
    spec = yaml.safe_load((REPO / "configs" / "kuberay-rayjob.yaml").read_text())
    assert spec["kind"] == "RayJob" and "jobs/batch_infer.py" in spec["spec"]["entrypoint"]


def _models(model: type[BaseModel]):
    yield model
    for field in model.model_fields.values():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _models(ann)


def test_every_job_field_has_a_description():
    from qzoom_ray.pipeline.config import PoolConfig, StorageConfig

    for model in {*_models(BatchJobConfig), PoolConfig, StorageConfig}:
        if model.__module__.startswith("qzoom_ray.pipeline"):
            missing = [n for n, f in model.model_fields.items() if not f.description]
            assert not missing, (model.__name__, missing)


def test_cli_help_without_torch():
    code = "import sys; sys.argv=['x']; sys.path.insert(0, 'jobs'); import batch_infer; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True).stdout.strip() == "False"
    out = subprocess.run([sys.executable, "jobs/batch_infer.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "--output" in out.stdout and "--coarse-actors" in out.stdout


def test_resume_guard(tmp_path):
    cfg = BatchJobConfig.model_validate({"input": {"path": "in.parquet"}, "output": {"path": str(tmp_path)}})
    assert prepare_output(cfg).rows_done == 0
    pq.write_table(pa.table({"id": ["a", "b"]}), tmp_path / "part-0.parquet")
    (tmp_path / "part-1.parquet").write_bytes(b"PAR1 cut short by a kill")
    state = prepare_output(cfg)
    assert sorted(state.done_ids.to_pylist()) == ["a", "b"] and len(state.removed) == 1
    assert not (tmp_path / "part-1.parquet").exists()
    # Pools and transfer mode may change between a kill and its resume; the engine config may not.
    assert prepare_output(cfg.model_copy(update={"zoom_transfer": "recompute"})).rows_done == 2
    changed = BatchJobConfig.model_validate({**cfg.model_dump(), "engine": {"zoom": {"gate_thresh": 0.5}}})
    with pytest.raises(ResumeError, match="another config"):
        prepare_output(changed)
    assert "secret" not in json.loads((tmp_path / MANIFEST).read_text())["config"].get("storage", {})


def test_files_without_manifest_are_not_resumed_into(tmp_path):
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "x.parquet")
    cfg = BatchJobConfig.model_validate({"output": {"path": str(tmp_path)}})
    with pytest.raises(ResumeError, match="no _qzoom_job.json"):
        prepare_output(cfg)


def test_the_result_fingerprint_ignores_what_only_bounds_memory_or_speed():
    cfg = BatchJobConfig.from_yaml(REPO / "configs" / "local.yaml")
    same = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"generate_window": 7})})
    assert same.result_fingerprint() == cfg.result_fingerprint()
    other = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"escalation": None})})
    assert other.result_fingerprint() != cfg.result_fingerprint()
