"""Stage 2's settings reach its engines: per-row budgets, RoI positions and the serving box rule."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from qzoom_ray.config import ModelConfig
from qzoom_ray.train import sft


def _budgets_seen(monkeypatch, rows, **kw) -> list[tuple[str, int, bool]]:
    seen = []

    def record(engine, row, budget, aligned=True):
        seen.append((row["kind"], budget, aligned))
        return None  # as if no crop could be made: the loss then only touches the trainable tensors

    monkeypatch.setattr(sft, "spliced_example", record)
    engine = SimpleNamespace(adapter=SimpleNamespace(model=torch.nn.Linear(2, 1)))
    loss = sft.sft_loss_fn(engine, 128, **kw)(rows)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    return seen


def test_zoomed_rows_draw_their_budget_and_direct_rows_keep_the_training_budget(monkeypatch):
    rows = [{"kind": "direct"}] * 6 + [{"kind": "pseudo_roi"}] * 24
    seen = _budgets_seen(monkeypatch, rows, aligned=False, zoom_budgets=[128, 256], seed=3)
    assert {b for k, b, _ in seen if k == "direct"} == {128}
    assert {b for k, b, _ in seen if k != "direct"} == {128, 256}
    assert not any(aligned for _, _, aligned in seen)
    # The draw is seeded: the same seed gives the same budgets.
    assert seen == _budgets_seen(monkeypatch, rows, aligned=False, zoom_budgets=[128, 256], seed=3)


def test_without_zoom_budgets_every_row_uses_the_training_budget(monkeypatch):
    seen = _budgets_seen(monkeypatch, [{"kind": "direct"}, {"kind": "regression"}] * 3)
    assert {b for _, b, _ in seen} == {128} and all(aligned for _, _, aligned in seen)


def test_mining_uses_the_serving_box_rule_and_the_checkpoints_positions(monkeypatch):
    import qzoom_ray.model.engine as engine_module

    built = []
    monkeypatch.setattr(engine_module, "QZoomEngine", lambda cfg, loaded=None: built.append(cfg) or cfg)
    mine = sft.MineConfig(model=ModelConfig(path="x"), budget_tokens=256, roi_thresh=0.5,
                          roi_thresh_mode="peak_relative", roi_max_downscale=2.0)
    zoom = sft.mine_engine(mine, "qzoom").zoom
    assert (zoom.roi_thresh_mode, zoom.roi_max_downscale, zoom.roi_thresh) == ("peak_relative", 2.0, 0.5)
    assert zoom.min_pixels == zoom.max_pixels == 256 * 28**2 and zoom.gate_thresh == 0.0
    assert zoom.reuse_src_pos is None  # the checkpoint's own positions, as served
    assert sft.engine_config(ModelConfig(path="x"), "qzoom", 128).zoom.roi_max_downscale is None


def test_zoomed_selection_keeps_every_zoomed_row_right_or_wrong_and_nothing_else():
    rows = [
        {"id": "reg", "roi_route": "zoom", "kind": "regression", "roi_ok": False, "target": "7"},
        {"id": "both-wrong", "roi_route": "zoom", "kind": "same", "roi_ok": False, "target": "3"},
        {"id": "both-right", "roi_route": "zoom", "kind": "same", "roi_ok": True, "target": "red"},
        {"id": "fallback", "roi_route": "fallback", "kind": "same", "roi_ok": True, "target": "2"},
        {"id": "no-target", "roi_route": "zoom", "kind": "same", "roi_ok": False, "target": " "},
    ]
    assert [r["id"] for r in sft.select_zoomed_rows(rows)] == ["reg", "both-wrong", "both-right"]
    # The paper's selection on the same rows: the regression only.
    assert [r["id"] for r in sft.select_training_rows(rows, 0.0, seed=0)] == ["reg"]


def test_zoomed_selection_needs_mined_rows_taught_the_ground_truth():
    import pytest

    from qzoom_ray.train.datajobs import SftJob

    base = {"questions": "q", "mined": "m", "select": "zoomed", "train": {"init_from": "x", "data_path": "d", "out_dir": "o"},
            "mine": {"model": {"path": "x"}, "target": "ground_truth"}}
    assert SftJob.model_validate(base).select == "zoomed"
    with pytest.raises(ValueError, match="ground_truth"):
        SftJob.model_validate({**base, "mine": {"model": {"path": "x"}, "target": "base"}})
    with pytest.raises(ValueError, match="source: mined"):
        SftJob.model_validate({**base, "source": "pseudo_labels", "pseudo_labels": "p"})


def test_the_zoomed_selection_writes_every_zoomed_row_with_its_ground_truth(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qzoom_ray.train.datajobs import SftJob, train_on_mined

    def mined(i, route, base_ok, roi_ok, target):
        return {"id": f"q{i}", "image": b"png", "question": "Total?", "answers": ["7"], "base_prediction": "3",
                "roi_prediction": "5", "base_ok": base_ok, "roi_ok": roi_ok, "roi_route": route,
                "kind": "regression" if base_ok and not roi_ok else "same", "target": target}

    (tmp_path / "mined").mkdir()
    pq.write_table(pa.Table.from_pylist([mined(0, "zoom", True, False, "7"), mined(1, "zoom", False, False, "7"),
                                         mined(2, "fallback", False, False, "7"), mined(3, "zoom", True, True, "7")]),
                   tmp_path / "mined" / "part-0.parquet")
    seen = {}
    monkeypatch.setattr(sft, "train_sft", lambda cfg, summary: seen.update(cfg=cfg, summary=summary) or summary)
    job = SftJob.model_validate({
        "questions": "q", "mined": str(tmp_path / "mined"), "select": "zoomed",
        "mine": {"model": {"path": "x"}, "target": "ground_truth"},
        "train": {"init_from": "x", "data_path": "set-by-the-job", "out_dir": "o"},
    })
    summary = train_on_mined(job)
    rows = pq.read_table(seen["cfg"].data_path).to_pylist()
    assert sorted(r["id"] for r in rows) == ["q0", "q1", "q3"]  # the fallback answered directly: not a zoom verdict
    assert {r["target"] for r in rows} == {"7"} and all(r["roi_box_norm"] is None for r in rows)
    assert (summary["select"], summary["zoomed_wrong"], summary["training_rows"]) == ("zoomed", 2, 3)
