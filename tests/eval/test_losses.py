"""The per-group loss table of an escalation setting: which answer each record ends with, and the tallies."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qzoom_ray.eval.escalation import Rung, escalated_records, path_names, walk
from qzoom_ray.eval.escalation_runs import record_groups
from qzoom_ray.eval.losses import losses_by_group, losses_text

LOW = Rung.of([1, 0, 0, 0], [-0.1, -0.9, -0.05, -0.8], [1.0] * 4)
HIGH = Rung.of([1, 1, 1, 0], [-0.05, -0.6, -0.01, -2.0], [3.0] * 4)
TOP = Rung.of([0, 1, 1, 1], [-0.2, -0.1, -0.3, -0.1], [9.0] * 4)
# Re-reads at Max-128 for records 1 and 3: record 1's sure (it stands), record 3's unsure (it goes on).
REREAD = Rung.of([0, 1, 0, 1], [0.0, -0.1, 0.0, -3.0], [0.5] * 4, [True, False, True, False])


def test_each_record_is_traced_to_the_answer_it_ends_with():
    ladder = {128: LOW, 256: HIGH, 576: TOP}
    score, seconds, again, source = walk(ladder, [128, 256, 576], [-0.5, -0.5], {128: REREAD}, -0.5)
    names = path_names([128, 256, 576])
    assert names == ["Max-128", "crop re-read at Max-128", "Max-256", "crop re-read at Max-256", "Max-576"]
    # 0: sure at Max-128. 1: re-read stands. 2: sure at Max-128. 3: re-read unsure -> Max-256 (-2.0) -> Max-576.
    assert [names[c] for c in source] == ["Max-128", "crop re-read at Max-128", "Max-128", "Max-576"]
    assert score.tolist() == [1.0, 1.0, 0.0, 1.0] and seconds.tolist() == [1.0, 1.5, 1.0, 13.5]
    assert again.tolist() == [False, True, False, True]
    # walk is escalated_records with the trace: the two never disagree.
    for got, want in zip(escalated_records(ladder, [128, 256, 576], [-0.5, -0.5], {128: REREAD}, -0.5),
                         (score, seconds, again), strict=True):
        assert np.array_equal(got, want)


def test_losses_are_tallied_per_group_and_answer_largest_loss_first():
    score = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 0.5])
    reference = [1.0, 1.0, 1.0, 1.0, 0.0, 0.5]
    source = np.array([0, 1, 2, 0, 2, 0])
    groups = ["doc", "doc", "doc", "scene", "scene", "scene"]
    losses = losses_by_group(score, reference, source, ["Max-128", "re-read", "Max-256"], groups)
    assert [g.group for g in losses] == ["doc", "scene"]  # doc -1, scene 0
    doc, scene = losses
    assert (doc.records, doc.right, doc.reference_right, doc.delta) == (3, 2.0, 3.0, -1.0)
    assert [(p.path, p.records, p.right, p.reference_right) for p in doc.paths] == [
        ("Max-128", 1, 1.0, 1.0), ("re-read", 1, 0.0, 1.0), ("Max-256", 1, 1.0, 1.0)]
    assert [(p.path, p.records) for p in scene.paths] == [("Max-128", 2), ("Max-256", 1)]  # no empty paths
    text = losses_text(losses, "baseline Max-1024")
    assert "| doc | 3 | 3 | 2 | -16.7 | Max-128 1: 1 (1); re-read 1: 0 (1); Max-256 1: 1 (1) |" in text
    assert "| scene | 3 | 1.5 | 1.5 | +0.0 |" in text


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="one entry per record"):
        losses_by_group(np.ones(2), [1.0], np.zeros(2, int), ["a"], ["g", "g"])
    with pytest.raises(ValueError, match="answer codes"):
        losses_by_group(np.ones(1), [1.0], np.array([3]), ["a"], ["g"])


def test_groups_are_read_in_the_ladders_order(tmp_path):
    rows = [{"method": m, "budget": b, "id": i, "split": s, "category": "document", "question_type": None}
            for m, b in (("baseline", 1024), ("qzoom", 256), ("qzoom", 128))
            for i, s in (("b", "ultra_hr"), ("a", "ordinary"))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "predictions.parquet")
    assert record_groups(tmp_path) == ["ordinary/document", "ultra_hr/document"]  # sorted by id; nulls left out
