"""Stage-1 label denoising on hand-made attention maps (spec §1.6)."""

from __future__ import annotations

import numpy as np

from qzoom_ray.train.labels import IGNORE, LabelParams, evidence_cells, make_pseudo_label, padding_cells


def _map(h: int = 10, w: int = 10, base: float = 1e-4) -> np.ndarray:
    return np.full((h, w), base)


def test_foreground_box_background_and_ignore():
    a = _map()
    a[4, 4], a[4, 5], a[5, 4] = 0.10, 0.08, 0.02  # 0.02 < 0.25 * 0.10: inside the box but not foreground
    a[0, 9] = 0.02  # moderate attention far away: ambiguous, not background
    lab = make_pseudo_label(a)
    assert lab.valid and lab.reason == "ok"
    assert lab.fg_box == (3, 3, 7, 6)  # FG cells (row 4, cols 4..5) dilated by one cell by the blur
    assert lab.labels[4, 4] == 1 and lab.labels[4, 5] == 1
    assert lab.labels[5, 4] == IGNORE and lab.labels[3, 3] == IGNORE  # in the box, below the FG threshold
    assert lab.labels[0, 9] == IGNORE  # 0.02 >= 0.05 * 0.10
    assert lab.labels[9, 0] == 0 and lab.labels[0, 0] == 0
    assert set(np.unique(lab.labels)) == {1, 0, IGNORE}


def test_sink_cells_are_removed_before_the_maximum_and_ignored():
    a = _map()
    a[0, 0] = 0.9  # a sink would dominate the max and wipe out the real evidence
    a[6, 6] = 0.05
    sink = np.zeros_like(a)
    sink[0, 0] = 0.5
    lab = make_pseudo_label(a, sink)
    assert lab.valid and lab.peak == 0.05
    assert lab.labels[6, 6] == 1 and lab.labels[0, 0] == IGNORE
    no_sink = make_pseudo_label(a)
    assert no_sink.labels[0, 0] == 1 and no_sink.labels[6, 6] == IGNORE


def test_padding_cells_are_background_and_never_foreground():
    a = _map(8, 8)
    a[0, :] = 0.5  # attention on the gray padding row (content is a landscape strip)
    a[4, 3] = 0.05
    pad = padding_cells((8, 8), (200, 100), 200)
    assert pad[0].all() and pad[-1].all() and not pad[4].any()
    lab = make_pseudo_label(a, padding=pad)
    assert lab.labels[4, 3] == 1
    assert (lab.labels[pad] == 0).all()


def test_validity_filter_weak_and_too_large():
    weak = _map()
    weak[2, 2] = 4e-3
    lab = make_pseudo_label(weak)
    assert not lab.valid and lab.reason == "weak" and (lab.labels == IGNORE).all()

    spread = np.full((6, 6), 0.03)  # everything is foreground: the box covers the whole map
    lab = make_pseudo_label(spread)
    assert not lab.valid and lab.reason == "too_large" and (lab.labels == IGNORE).all()
    assert make_pseudo_label(spread, params=LabelParams(max_area_ratio=1.1)).valid

    assert make_pseudo_label(np.zeros((4, 4))).reason == "empty"


def test_evidence_cells_cover_the_box():
    cells = evidence_cells((50, 0, 150, 40), (200, 100), (5, 4))
    assert cells.shape == (5, 4)
    assert cells[0:2, 1:3].all() and cells.sum() == 4
