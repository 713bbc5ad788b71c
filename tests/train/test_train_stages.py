"""Each training stage as its Ray job on the tiny model: a few steps, the loss falls, only the intended
parameters change, and the checkpoint loads with ``load_model``. Stages are chained 1 -> 2 -> 3."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from qzoom_ray.config import ModelConfig
from qzoom_ray.model.loader import load_model
from qzoom_ray.model.state import EngineRecord
from qzoom_ray.train.datajobs import (
    LadderJob,
    PseudoLabelJob,
    SftJob,
    run_ladder,
    run_pseudo_labels,
    train_on_mined,
)

TRAIN = {"num_workers": 1, "cpus_per_worker": 1, "torch_threads": 1, "log_every": 3, "warmup_ratio": 0.0}


def _png(seed: int, w: int = 112, h: int = 112) -> bytes:
    arr = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _state(path: str) -> dict[str, torch.Tensor]:
    loaded = load_model(ModelConfig(path=path, require_heads=False, device="cpu"))
    sd = {f"model.{k}": v.clone() for k, v in loaded.adapter.model.state_dict().items()}
    if loaded.heads is not None:
        sd.update({f"heads.{k}": v.clone() for k, v in loaded.heads.state_dict().items()})
    return sd


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in after if k in before and not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # address="local": never join a cluster someone else started on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def stage_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("stages")


def test_stage1_pseudo_labels_job_and_rpn(ray_local, stage_dirs, tiny_base_dir):
    from qzoom_ray.train.rpn import RpnConfig, train_rpn

    root = stage_dirs
    rows = [{"id": f"q{i}", "image": _png(i), "question": "What is the code?", "answer": "ab12",
             "evidence_box": [0, 0, 56, 56]} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), root / "questions.parquet")
    summary = run_pseudo_labels(PseudoLabelJob.model_validate({
        "input": str(root / "questions.parquet"), "output": str(root / "labels"), "rows_per_batch": 2,
        "labels": {"model": {"path": tiny_base_dir, "require_heads": False}, "budget_tokens": 16,
                   "grounding_heads": {4: [0, 1]}, "answer_source": "ground_truth", "max_area_ratio": 1.1,
                   "torch_threads": 1},
    }))
    assert summary["rows"] == 3
    labelled = pq.read_table(root / "labels").to_pylist()
    assert all(len(r["labels"]) == r["grid_h"] * r["grid_w"] == 16 for r in labelled)
    assert all(r["read_box"] == [0, 0, 112, 112] for r in labelled)  # no tile_fallback: the whole image was read
    import ray.data

    # A labelling block of large images can take longer than Ray Data's 30-minute no-progress guard on a CPU.
    assert ray.data.DataContext.get_current().execution_no_progress_timeout_s == -1

    # A learnable target: the evidence is always the top-left 2x2 cells (the random base cannot know that).
    for r in labelled:
        lab = np.zeros((4, 4), dtype=np.int16)
        lab[:2, :2] = 1
        lab[3, 3] = -100
        r["labels"], r["valid"] = lab.ravel().tolist(), True
    pq.write_table(pa.Table.from_pylist(labelled), root / "rpn-train.parquet")

    cfg = RpnConfig(init_from=tiny_base_dir, data_path=str(root / "rpn-train.parquet"), out_dir=str(root / "s1"),
                    twig_K=3, twig_T=3, steps=9, batch_size=3, lr=1e-2, storage_path=str(root / "ray"), **TRAIN)
    entry = train_rpn(cfg)
    assert entry["final_loss"] < 0.9 * entry["first_loss"], entry

    before, after = _state(tiny_base_dir), _state(cfg.out_dir)
    changed = _changed(before, after)
    assert not changed, f"backbone changed: {sorted(changed)[:5]}"
    base = load_model(ModelConfig(path=tiny_base_dir, require_heads=False, device="cpu")).adapter.layers
    for i in range(3):  # twig and gate start as copies of base layers K..K+T-1
        for k, v in base[3 + i].state_dict().items():
            assert torch.equal(after[f"heads.high_res_layers.{i}.{k}"], v)
            trained = i < 2 or k.split(".")[0] == "input_layernorm" or k.startswith(("self_attn.q_proj", "self_attn.k_proj"))
            assert torch.equal(after[f"heads.twig_layers.{i}.{k}"], v) != trained or "bias" in k and not trained, k
    loaded = load_model(ModelConfig(path=cfg.out_dir))
    assert loaded.heads.spec.twig_K == 3 and loaded.heads.has_gate and loaded.heads.spec.reuse_src_pos
    card = (Path(cfg.out_dir) / "README.md").read_text()
    assert "Stage 1" in card and json.loads((Path(cfg.out_dir) / "qzoom_training.json").read_text())[0]["stage"] == "rpn"


def test_stage2_mine_and_sft(ray_local, stage_dirs):
    from qzoom_ray.train.sft import MineConfig, RegressionMiner

    root = stage_dirs
    s1 = str(root / "s1")
    if not os.path.exists(s1):
        pytest.skip("stage 1 did not run")
    rows = [{"id": f"q{i}", "image": _png(10 + i), "question": "What is the code?", "answer": "ab12"}
            for i in range(2)]
    mcfg = MineConfig(model=ModelConfig(path=s1), budget_tokens=16, roi_thresh=0.05, max_new_tokens=3)
    # A stand-in judge (the judge is pluggable): the base path right, the RoI path wrong -> regressions.
    miner = RegressionMiner(mcfg, judge=lambda rs, a, b: [(True, False)] * len(rs))
    mined = miner(rows)
    assert all(r["kind"] == "regression" for r in mined), [r["roi_route"] for r in mined]
    (root / "mined").mkdir()
    pq.write_table(pa.Table.from_pylist(mined), root / "mined" / "part-0.parquet")
    sj = SftJob.model_validate({
        "questions": "unused", "mined": str(root / "mined"), "mine": mcfg.model_dump(mode="json"),
        "train": {"init_from": s1, "data_path": "set-by-the-job", "out_dir": str(root / "s2"), "steps": 8,
                  "batch_size": 2, "lr": 2e-3, "budget_tokens": 16, "roi_thresh": 0.05,
                  "storage_path": str(root / "ray"), **TRAIN},
        "direct_replay": 0.5,
    })
    entry = train_on_mined(sj)
    # Replay comes from the miner's own direct answers: one per two regressions, no extra job.
    assert (entry["data"]["regressions"], entry["data"]["direct_rows"], entry["data"]["training_rows"]) == (2, 1, 3)
    assert entry["final_loss"] < 0.9 * entry["first_loss"], entry
    changed = _changed(_state(s1), _state(str(root / "s2")))
    assert changed and all(k.startswith(("model.model.language_model.layers.", "model.lm_head.")) for k in changed)
    assert any(k.startswith("model.lm_head.") for k in changed)
    assert len(json.loads((root / "s2" / "qzoom_training.json").read_text())) == 2
    load_model(ModelConfig(path=str(root / "s2")))


def test_pseudo_roi_rows_pad_and_skip():
    from qzoom_ray.train.sft import pseudo_roi_rows

    base = {"image": b"x", "question": "Q?", "answer": "ab", "grid_h": 10, "grid_w": 20, "valid": True}
    rows = [
        {**base, "id": "a", "fg_box": [4, 3, 6, 5]},
        {**base, "id": "edge", "fg_box": [0, 0, 20, 2]},
        {**base, "id": "invalid", "fg_box": [1, 1, 2, 2], "valid": False},
        {**base, "id": "no-box", "fg_box": None},
        {**base, "id": "no-answer", "fg_box": [1, 1, 2, 2], "answer": "  "},
    ]
    out = pseudo_roi_rows(rows, pad_cells=2)
    assert [r["id"] for r in out] == ["a", "edge"]
    assert out[0]["roi_box_norm"] == pytest.approx([2 / 20, 1 / 10, 8 / 20, 7 / 10])
    assert out[1]["roi_box_norm"] == pytest.approx([0.0, 0.0, 1.0, 4 / 10])  # clipped to the image
    assert out[0]["target"] == "ab" and out[0]["kind"] == "pseudo_roi"


def test_mined_direct_rows_replay_only_passed_direct_answers():
    from qzoom_ray.train.sft import mined_direct_rows

    base = {"image": b"x", "question": "Q?", "kind": "same"}
    rows = [{**base, "id": f"ok{i}", "base_ok": True, "base_prediction": f"a{i}"} for i in range(5)]
    rows += [{**base, "id": "wrong", "base_ok": False, "base_prediction": "b"},
             {**base, "id": "empty", "base_ok": True, "base_prediction": " "}]
    out = mined_direct_rows(rows, 3, seed=0)
    assert len(out) == 3 and len({r["id"] for r in out}) == 3
    assert all(r["id"].startswith("ok") and r["kind"] == "direct" and r["target"] == "a" + r["id"][2:] for r in out)
    assert out == mined_direct_rows(rows, 3, seed=0)
    assert len(mined_direct_rows(rows, 50, seed=0)) == 5


def test_sft_training_table_keeps_every_rows_box_whatever_comes_first():
    from qzoom_ray.train.sft import SFT_ROW_SCHEMA, sft_training_table

    direct = {"id": "d", "image": b"x", "question": "Q?", "target": "a", "kind": "direct"}
    zoomed = {"id": "z", "image": b"y", "question": "Q?", "target": "b", "kind": "pseudo_roi",
              "roi_box_norm": [0.1, 0.2, 0.3, 0.4], "fg_box": [1, 2, 3, 4]}
    table = sft_training_table([direct, zoomed])
    assert table.schema == SFT_ROW_SCHEMA
    assert table.column("roi_box_norm").to_pylist() == [None, [0.1, 0.2, 0.3, 0.4]]


def test_stage2_from_pseudo_labels_uses_their_boxes(ray_local, stage_dirs, monkeypatch):
    from qzoom_ray.model.engine import QZoomEngine
    from qzoom_ray.train.sft import engine_config, pseudo_roi_rows, spliced_example

    root = stage_dirs
    s1 = str(root / "s1")
    if not os.path.exists(s1):
        pytest.skip("stage 1 did not run")
    labels = [{"id": f"p{i}", "image": _png(30 + i), "question": "What is the code?", "answer": "ab12",
               "grid_h": 4, "grid_w": 4, "valid": True, "fg_box": [0, 0, 2, 2]} for i in range(3)]
    (root / "plabels").mkdir()
    pq.write_table(pa.Table.from_pylist(labels), root / "plabels" / "part-0.parquet")

    # The given box replaces the twig: no coarse pass runs, and the crop is that box.
    loaded = load_model(ModelConfig(path=s1, device="cpu"))
    engine = QZoomEngine(engine_config(ModelConfig(path=s1), "qzoom", 16), loaded=loaded)
    monkeypatch.setattr(engine, "coarse", lambda *a, **k: pytest.fail("the twig ran"))
    row = pseudo_roi_rows(labels, pad_cells=0)[0]
    ex = spliced_example(engine, row, 16)
    assert ex is not None and ex["labels"][-1] != -100
    # A direct row: the global view alone (one image block), the answer teacher-forced after the prompt.
    direct = spliced_example(engine, {**row, "kind": "direct", "roi_box_norm": None}, 16)
    n_img = int((direct["ids"] == engine.image_token_id).sum())
    assert n_img == direct["features"].shape[0] < int((ex["ids"] == engine.image_token_id).sum())
    answer = direct["labels"] != -100
    assert answer.sum() >= 2 and not answer[: len(direct["ids"]) - answer.sum()].any()
    # Fresh-grid positions (reuse_src_pos: false): the same sequence; only the RoI tokens' h/w differ, and they
    # are whole numbers counting on from the RoI block's temporal position instead of fractions inside the box.
    fresh = spliced_example(engine, row, 16, aligned=False)
    assert np.array_equal(fresh["ids"], ex["ids"])
    roi_tok = np.flatnonzero(ex["ids"] == engine.image_token_id)[n_img:]
    differs = np.flatnonzero((fresh["positions"] != ex["positions"]).any(axis=0))
    assert set(differs) <= set(roi_tok) and len(differs) > 0
    hw = fresh["positions"][1:, roi_tok]
    assert np.array_equal(hw, np.round(hw)) and hw.min() == fresh["positions"][0, roi_tok[0]]
    assert not np.array_equal(ex["positions"][1:, roi_tok], np.round(ex["positions"][1:, roi_tok]))
    monkeypatch.undo()

    sj = SftJob.model_validate({
        "questions": "unused", "mined": str(root / "mined-pl"), "source": "pseudo_labels",
        "pseudo_labels": str(root / "plabels"), "roi_pad_cells": 1, "direct_replay": 0.67,
        "mine": {"model": {"path": s1}, "budget_tokens": 16, "max_new_tokens": 3},
        "train": {"init_from": s1, "data_path": "set-by-the-job", "out_dir": str(root / "s2-pl"), "steps": 8,
                  "batch_size": 3, "lr": 2e-3, "budget_tokens": 16, "reuse_src_pos": False,
                  "storage_path": str(root / "ray"), **TRAIN},
    })
    entry = train_on_mined(sj)
    assert entry["data"]["source"] == "pseudo_labels", entry
    # The checkpoint says which positions it was tuned on, so the engine serves those (the start was aligned).
    assert load_model(ModelConfig(path=s1)).spec.reuse_src_pos is True
    assert load_model(ModelConfig(path=str(root / "s2-pl"))).spec.reuse_src_pos is False
    assert (entry["data"]["zoomed_rows"], entry["data"]["direct_rows"], entry["data"]["training_rows"]) == (3, 2, 5)
    # Direct targets are the starting checkpoint's own plain answers at the training budget.
    trained = pq.read_table(root / "mined-pl" / "training" / "sft-train.parquet").to_pylist()
    plain = QZoomEngine(engine_config(ModelConfig(path=s1), "baseline", 16, max_new_tokens=3), loaded=loaded)
    for r in (r for r in trained if r["kind"] == "direct"):
        assert r["roi_box_norm"] is None
        assert r["target"] == plain.generate([EngineRecord("x", r["image"], r["question"])])[0].answer
    assert entry["final_loss"] < 0.9 * entry["first_loss"], entry
    changed = _changed(_state(s1), _state(str(root / "s2-pl")))
    assert changed and all(k.startswith(("model.model.language_model.layers.", "model.lm_head.")) for k in changed)


def test_stage3_gate_labels_and_gate(ray_local, stage_dirs):
    from qzoom_ray.train.gate import GateConfig, gate_heads, train_gate

    root = stage_dirs
    start = str(root / "s2") if (root / "s2").exists() else str(root / "s1")
    if not os.path.exists(start):
        pytest.skip("stage 1 did not run")
    pq.write_table(pa.Table.from_pylist([{"id": "g0", "image": _png(30), "question": "Code?", "answer": "ab"}]),
                   root / "gate-questions.parquet")
    summary = run_ladder(LadderJob.model_validate({
        "input": str(root / "gate-questions.parquet"), "output": str(root / "ladder"),
        "ladder": {"model": {"path": start}, "budgets": [4, 9], "max_new_tokens": 2, "torch_threads": 1},
    }))
    got = pq.read_table(root / "ladder").to_pylist()[0]
    assert summary["rows"] == 1 and got["budgets"] == [4, 9] and len(got["ms_answers"]) == 2

    # Hand-made ladders: hard records (wrong at low budgets) on one kind of image, easy ones on another.
    hard = [{"id": f"h{i}", "image": _png(40 + i), "question": "Code?", "answers": ["ab"], "budgets": [4, 9, 16],
             "ms_answers": ["x", "ab", "ab"]} for i in range(2)]
    easy = [{"id": f"e{i}", "image": _png(50 + i, 56, 56), "question": "Code?", "answers": ["ab"],
             "budgets": [4, 9, 16], "ms_answers": ["ab", "ab", "ab"]} for i in range(3)]
    unstable = [{**easy[0], "id": "u0", "ms_answers": ["ab", "ab", "cd"]}]
    pq.write_table(pa.Table.from_pylist(hard + easy + unstable), root / "ladder-hand.parquet")
    cfg = GateConfig(init_from=start, data_path=str(root / "ladder-hand.parquet"), out_dir=str(root / "s3"),
                     steps=9, batch_size=4, lr=1e-2, p_positive=1.0, storage_path=str(root / "ray"), **TRAIN)
    entry = train_gate(cfg)
    assert entry["data"]["hard"] == 2 and entry["data"]["unstable"] == 1 and entry["data"]["mixed"] == 4
    assert entry["final_loss"] < 0.9 * entry["first_loss"], entry
    changed = _changed(_state(start), _state(cfg.out_dir))
    assert changed and all(k.startswith(("heads.high_res_layers.", "heads.high_res_head.")) for k in changed)
    loaded = load_model(ModelConfig(path=cfg.out_dir))
    assert loaded.heads.has_gate and "Stage 3" in (Path(cfg.out_dir) / "README.md").read_text()

    # The gate branch starts from base layers K..K+T-1 of the checkpoint it is trained on (spec §8.8).
    src = load_model(ModelConfig(path=start, device="cpu"))
    heads = gate_heads(src, "backbone")
    for i, layer in enumerate(heads.high_res_layers):
        for k, v in src.adapter.layers[3 + i].state_dict().items():
            assert torch.equal(layer.state_dict()[k], v)


def test_ladder_zoom_check_answers_hard_records_through_the_zoom_path(tiny_model_dir):
    from qzoom_ray.model.state import EngineResult
    from qzoom_ray.train.gate import LadderAnswerer, LadderConfig

    cfg = LadderConfig(model=ModelConfig(path=tiny_model_dir, device="cpu"), budgets=[4, 9, 16], max_new_tokens=2,
                       zoom_check=True, roi_thresh=0.5, roi_thresh_mode="peak_relative")
    answerer = LadderAnswerer(cfg, load_model(cfg.model))
    scripted = {"hard": ["x", "ab", "ab"], "easy": ["ab", "ab", "ab"]}  # the direct ladder, by question

    class ScriptedLadder:  # stands in for the direct path; the zoom path is the real engine
        def generate(self, recs):
            return [EngineResult(r.id, answer=scripted[r.question][int(r.id.split(":")[1])], route="direct")
                    for r in recs]

    answerer.engine = ScriptedLadder()
    rows = [{"id": q, "image": _png(60 + i), "question": q, "answer": "ab"} for i, q in enumerate(scripted)]
    hard, easy = answerer(rows)
    assert (hard["kind"], hard["wrong"], easy["kind"]) == ("hard", [0], "easy")
    # Checked at the hard record's wrong budget only (the random model's zoomed answer is not "ab").
    assert hard["zoom_correct"][0] == 0.0 and np.isnan(hard["zoom_correct"][1:]).all()
    assert np.isnan(easy["zoom_correct"]).all()
    with pytest.raises(ValueError, match="twig"):
        LadderAnswerer(cfg.model_copy(update={"model": ModelConfig(path="embedded:tiny-base", require_heads=False)}))
