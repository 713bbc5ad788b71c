"""The branch-depth probe: cached inputs, twigs trained per (K, T) on hand-made labels, held-out hit rates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_job, make_image_bytes

from qzoom_ray.config import ModelConfig
from qzoom_ray.model.loader import load_model
from qzoom_ray.train.depth_probe import cache_samples, peak_hit_rates, probe_depths

GRID = (4, 4)


def label_row(i: int, valid: bool = True) -> dict:
    w, h = 224 + 28 * (i % 3), 224
    r, c = i % GRID[0], (i // GRID[0]) % GRID[1]
    labels = np.zeros(GRID, dtype=np.int64)
    labels[r, c] = 1
    labels[(r + 2) % GRID[0], (c + 1) % GRID[1]] = -100
    box = [c * w // GRID[1], r * h // GRID[0], (c + 1) * w // GRID[1] - 1, (r + 1) * h // GRID[0] - 1]
    return {"id": f"q{i}", "image": make_image_bytes(w, h, i), "question": f"Where is item {i}?",
            "labels": labels.ravel().tolist(), "grid_h": GRID[0], "grid_w": GRID[1], "valid": valid,
            "evidence_box": box, "pad_to_square": False}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(ModelConfig(path=tiny_model_dir, require_heads=False, device="cpu"))


def test_cache_skips_invalid_rows_and_groups_by_id(loaded):
    rows = [label_row(0), label_row(1, valid=False), label_row(2)]
    samples = cache_samples(loaded, rows, 16, groups={"q0": "doc_value"})
    assert [s.group for s in samples] == ["doc_value", "all"]
    for s in samples:
        assert s.evidence is not None and s.evidence.shape == s.grid and s.evidence.any()
        assert s.columns.stop - s.columns.start == s.grid[0] * s.grid[1]
        assert tuple(s.labels.shape) == GRID


def test_probe_trains_each_depth_and_leaves_the_backbone_alone(loaded):
    train = cache_samples(loaded, [label_row(i) for i in range(8)], 16)
    held_out = cache_samples(loaded, [label_row(i) for i in range(8, 12)], 16)
    before = {k: v.clone() for k, v in loaded.adapter.model.state_dict().items()}
    results = probe_depths(loaded, train, held_out, [(3, 2), (1, 3)], epochs=10, lr=3e-3, batch_size=8)
    assert [(r["twig_K"], r["twig_T"]) for r in results] == [(3, 2), (1, 3)]
    for r in results:
        assert r["loss_by_epoch"][-1] < r["loss_by_epoch"][0]
        rate, n = r["held_out_hit"]["all"]
        assert n == 4 and 0.0 <= rate <= 1.0
    after = loaded.adapter.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_hit_rate_counts_the_peak_cell(loaded, monkeypatch):
    # A map that peaks on the evidence scores 1, one that peaks off it 0; rows without a box are not scored.
    import qzoom_ray.train.depth_probe as probe

    samples = cache_samples(loaded, [label_row(i) for i in range(3)], 16)
    samples[2].evidence = None
    heads = probe.fresh_twig(loaded, 0, 2)
    monkeypatch.setattr(probe, "_twig_map", lambda _l, _h, _k, s: torch.from_numpy(s.evidence.astype(np.float32)))
    assert peak_hit_rates(loaded, heads, samples) == {"all": (1.0, 2)}
    monkeypatch.setattr(probe, "_twig_map", lambda _l, _h, _k, s: torch.from_numpy(1.0 - s.evidence.astype(np.float32)))
    assert peak_hit_rates(loaded, heads, samples) == {"all": (0.0, 2)}


def test_depths_argument():
    job = load_job("probe_twig_depth")
    assert job.parse_depths("1:2, 0:3") == [(1, 2), (0, 3)]
    with pytest.raises(Exception, match="K:T"):
        job.parse_depths("1")
