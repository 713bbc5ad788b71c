"""The base-model training job: Ray Train runs, the loss falls, the checkpoint loads in the engine."""

from __future__ import annotations

import json

import ray
import torch

from qzoom_ray.config import EngineConfig
from qzoom_ray.model.engine import QZoomEngine
from qzoom_ray.model.state import EngineRecord
from qzoom_ray.train.base_config import TinyArch, TrainBaseConfig, TrainPhase
from qzoom_ray.train.base_launch import train_base
from qzoom_ray.train.smoke_source import COLOURS


def _smoke_cfg(out, **kw) -> TrainBaseConfig:
    return TrainBaseConfig(
        out_dir=str(out),
        sample_source="qzoom_ray.train.smoke_source:make_sample_fn",
        tokenizer_corpus="qzoom_ray.train.smoke_source:tokenizer_corpus",
        vocab_size=320,
        arch=TinyArch(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                      vision_depth=1, vision_hidden=32),
        batch_size=8,
        lr=3e-3,
        torch_threads=1,
        log_every=5,
        **kw,
    )


def test_train_base_learns_and_saves_a_loadable_checkpoint(tmp_path):
    # A few seconds of vision-tower pretraining on dense labels, then two chat phases: a short one
    # on smaller images, then the rest of the steps.
    cfg = _smoke_cfg(tmp_path / "model", steps=60, cpus_per_worker=1, phases=[
        TrainPhase(name="tower", kind="vision", minutes=0.08, source_kwargs={"canvas_prob": 1.0}),
        TrainPhase(name="small", minutes=0.1, source_kwargs={"budget_tokens": 9}, freeze_vision=True),
        TrainPhase(name="main", minutes=10),
    ])
    cfg.log_every = 10
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
    from qzoom_ray.config import with_absolute_init

    (tmp_path / "models" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_init(TrainBaseConfig(out_dir="out", init_from="models/base"))
    assert cfg.init_from == str(tmp_path / "models" / "base")
    # A hub id (no such local folder) is passed on untouched.
    assert with_absolute_init(TrainBaseConfig(out_dir="out", init_from="org/model")).init_from == "org/model"


def test_train_base_without_ray_pretrains_then_keeps_the_frozen_tower(tmp_path, caplog):
    from safetensors.torch import load_file

    # One process, batches from a data worker: a vision phase, then a frozen-tower chat phase.
    cfg = _smoke_cfg(tmp_path / "model", steps=24, data_workers=1, phases=[
        TrainPhase(name="tower", kind="vision", minutes=10, source_kwargs={"canvas_prob": 1.0}),
        TrainPhase(name="chat", minutes=10, freeze_vision=True),
    ])
    # The step cap would end the run inside the tower phase: give each phase its share instead.
    cfg.phases[0].minutes = 0.05
    with caplog.at_level("WARNING"):
        recipe = train_base(cfg, local=True)
    assert "saved phase checkpoint" in caplog.text and "saved final checkpoint" in caplog.text
    saved = json.loads((tmp_path / "model" / "recipe.json").read_text())
    assert saved["launcher"] == "local" and saved["finished"] is True
    assert [p["name"] for p in recipe["phases"]] == ["tower", "chat"] and recipe["steps_done"] == 24

    # Continue from it in chat with the tower frozen: ViT blocks and patch embedding are unchanged,
    # the merger and the language model learn.
    more = _smoke_cfg(tmp_path / "more", steps=6, init_from=str(tmp_path / "model"),
                      phases=[TrainPhase(name="chat", minutes=10, freeze_vision=True)])
    train_base(more, local=True)
    before = load_file(str(tmp_path / "model" / "model.safetensors"))
    after = load_file(str(tmp_path / "more" / "model.safetensors"))
    tower = [k for k in before if k.startswith("visual.") and ".merger." not in k]
    trained = [k for k in before if k not in tower]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)
    assert any(not torch.equal(before[k], after[k]) for k in trained if ".merger." in k)
    assert any(not torch.equal(before[k], after[k]) for k in trained if k.startswith("model.layers."))


def test_local_training_refuses_several_workers_and_a_missing_gpu(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="one worker"):
        train_base(_smoke_cfg(tmp_path, num_workers=2), local=True)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            train_base(_smoke_cfg(tmp_path, use_gpu=True), local=True)


def test_a_grounded_phase_with_the_readouts_trains_and_saves_only_the_model(tmp_path):
    from safetensors.torch import load_file

    # A few steps on scene questions from the shipped tiny base, every auxiliary loss on.
    cfg = TrainBaseConfig(
        out_dir=str(tmp_path / "model"),
        init_from="qzoom_ray/assets/tiny-base",
        source_kwargs={"templates": ["scene_side", "scene_colour", "scene_count"], "full_budgets": [64],
                       "crop_prob": 0.0, "ground_shapes": True, "count_objects": True, "max_turns": 3},
        steps=4, batch_size=4, lr=1e-4, torch_threads=1, log_every=2,
        grounding_heads=[(0, 0), (1, 0)], location_readout_layer=1, token_position_layer=0,
        count_readout_layer=1, object_centre_layer=0,
        phases=[TrainPhase(name="located", minutes=10, freeze_vision=True, grounding_weight=0.5, location_weight=3.0,
                           token_position_weight=1.0, count_weight=1.0, object_centre_weight=1.0)],
    )
    recipe = train_base(cfg, local=True)
    phase = recipe["phases"][0]
    assert recipe["steps_done"] == 4
    assert phase["final_grounding_loss"] > 0 and 0 < phase["final_location_loss"] < 2
    assert 0 < phase["final_token_position_loss"] < 2
    assert phase["final_count_loss"] > 0 and 0 < phase["final_object_centre_loss"] < 2
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    shipped = load_file("qzoom_ray/assets/tiny-base/model.safetensors")
    assert set(saved) == set(shipped)  # the read-out head is train-only
    assert any(not torch.equal(saved[k], shipped[k]) for k in saved if k.startswith("model.layers.1."))
