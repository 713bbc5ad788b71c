"""The base-model training job: Ray Train runs, the loss falls, the checkpoint loads in the engine."""

from __future__ import annotations

import json

import ray

from qzoom_ray.config import EngineConfig
from qzoom_ray.model.engine import QZoomEngine
from qzoom_ray.model.state import EngineRecord
from qzoom_ray.train.base import TinyArch, TrainBaseConfig, TrainPhase, train_base
from qzoom_ray.train.smoke_source import COLOURS


def test_train_base_learns_and_saves_a_loadable_checkpoint(tmp_path):
    cfg = TrainBaseConfig(
        out_dir=str(tmp_path / "model"),
        sample_source="qzoom_ray.train.smoke_source:make_sample_fn",
        tokenizer_corpus="qzoom_ray.train.smoke_source:tokenizer_corpus",
        vocab_size=320,
        arch=TinyArch(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                      vision_depth=1, vision_hidden=32),
        steps=60,
        batch_size=8,
        lr=3e-3,
        cpus_per_worker=1,
        torch_threads=1,
        log_every=10,
        # A few seconds of vision-tower pretraining on dense labels, then two chat phases: a short one
        # on smaller images, then the rest of the steps.
        phases=[TrainPhase(name="tower", kind="vision", minutes=0.08, source_kwargs={"canvas_prob": 1.0}),
                TrainPhase(name="small", minutes=0.1, source_kwargs={"budget_tokens": 9}, freeze_vision=True),
                TrainPhase(name="main", minutes=10)],
    )
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        recipe = train_base(cfg, storage_path=str(tmp_path / "ray"))
    finally:
        ray.shutdown()
    saved = json.loads((tmp_path / "model" / "recipe.json").read_text())
    assert saved["config"]["seed"] == 0 and saved["samples_seen"] == 60 * 8
    assert recipe["phases"] == saved["phases"]
    ran = {p["name"]: p for p in saved["phases"]}
    # The step cap ends the run: the tiny model may use all 60 steps before "main" starts.
    assert saved["steps_done"] == 60 == sum(p["steps"] for p in ran.values()) and list(ran)[:2] == ["tower", "small"]
    assert ran["tower"]["kind"] == "vision" and ran["tower"]["steps"] >= 1
    losses = json.loads((tmp_path / "model" / "losses.json").read_text())
    chat = losses[ran["tower"]["steps"]:]
    assert sum(chat[-10:]) < 0.5 * sum(chat[:10]), chat

    engine = QZoomEngine(EngineConfig.model_validate({
        "model": {"path": cfg.out_dir, "require_heads": False},
        "zoom": {"mode": "baseline", "min_pixels": 16 * 784, "max_pixels": 16 * 784},
        "generation": {"max_new_tokens": 4},
    }))
    from PIL import Image

    answers = engine.generate(
        [EngineRecord(c, Image.new("RGB", (100, 100), rgb), "What colour is the image?") for c, rgb in COLOURS.items()]
    )
    assert sum(r.answer == r.id for r in answers) >= 2, [(r.id, r.answer) for r in answers]


def test_a_local_init_from_reaches_the_workers_as_an_absolute_path(tmp_path, monkeypatch):
    from qzoom_ray.train.base import with_absolute_init

    (tmp_path / "models" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_init(TrainBaseConfig(out_dir="out", init_from="models/base"))
    assert cfg.init_from == str(tmp_path / "models" / "base")
    # A hub id (no such local folder) is passed on untouched.
    assert with_absolute_init(TrainBaseConfig(out_dir="out", init_from="org/model")).init_from == "org/model"
