"""The stage-1 selective BCE: ignored cells, resizing to the label grid, foreground weighting."""

from __future__ import annotations

import math

import pytest
import torch

from qzoom_ray.train.rpn import RpnConfig, selective_bce


def _bce(logit: float, target: int) -> float:
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_ignored_cells_do_not_count():
    pred = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    labels = torch.tensor([[1, -100], [0, -100]])
    want = (_bce(2.0, 1) + _bce(0.5, 0)) / 2
    assert selective_bce([pred], [labels]).item() == pytest.approx(want, rel=1e-6)


def test_prediction_is_resized_to_the_label_grid():
    pred = torch.full((2, 2), 1.5)  # constant, so bilinear resizing keeps every value
    labels = torch.tensor([[1, 0, -100, 0], [0, 0, 1, -100], [-100, 0, 0, 0], [1, 1, 0, -100]])
    keep = labels[labels >= 0]
    want = sum(_bce(1.5, int(t)) for t in keep) / keep.numel()
    assert selective_bce([pred], [labels]).item() == pytest.approx(want, rel=1e-6)


def test_balanced_weight_gives_both_classes_equal_mass():
    # 1 foreground cell, 5 background ones over two maps: the foreground term is weighted 5x.
    preds = [torch.tensor([[0.3, -0.2, 0.1]]), torch.tensor([[-1.0, 0.7, 2.0]])]
    labels = [torch.tensor([[1, 0, 0]]), torch.tensor([[0, 0, 0]])]
    fg = _bce(0.3, 1)
    bg = [_bce(v, 0) for v in (-0.2, 0.1, -1.0, 0.7, 2.0)]
    want = (5 * fg + sum(bg)) / 6
    assert selective_bce(preds, labels, "balanced").item() == pytest.approx(want, rel=1e-6)
    assert selective_bce(preds, labels, 5.0).item() == pytest.approx(want, rel=1e-6)
    plain = (fg + sum(bg)) / 6
    assert selective_bce(preds, labels, 1.0).item() == pytest.approx(plain, rel=1e-6)


def test_balanced_weight_pushes_foreground_up_harder():
    labels = torch.zeros(10, 10, dtype=torch.long)
    labels[4, 4] = 1
    grads = {}
    for mode in (1.0, "balanced"):
        pred = torch.zeros(10, 10, requires_grad=True)
        selective_bce([pred], [labels], mode).backward()
        grads[mode] = float(pred.grad[4, 4])
    # Gradient descent raises a cell's logit where the gradient is negative.
    assert grads["balanced"] < grads[1.0] < 0
    assert grads["balanced"] == pytest.approx(99 * grads[1.0], rel=1e-5)  # 99 background cells per foreground one


def test_balanced_weight_without_foreground_is_the_plain_mean():
    pred = torch.tensor([[0.4, -0.3]])
    labels = torch.tensor([[0, 0]])
    assert selective_bce([pred], [labels], "balanced").item() == pytest.approx(
        selective_bce([pred], [labels]).item()
    )


def test_all_ignored_batch_keeps_the_graph():
    pred = torch.zeros(2, 2, requires_grad=True)
    loss = selective_bce([pred], [torch.full((2, 2), -100)], "balanced")
    loss.backward()
    assert loss.item() == 0.0 and pred.grad is not None


def test_config_accepts_balanced_or_a_number_only():
    base = {"init_from": "x", "data_path": "d", "out_dir": "o"}
    assert RpnConfig.model_validate({**base, "fg_weight": "balanced"}).fg_weight == "balanced"
    assert RpnConfig.model_validate({**base, "fg_weight": 20}).fg_weight == 20.0
    with pytest.raises(ValueError):
        RpnConfig.model_validate({**base, "fg_weight": "auto"})


def test_a_budget_list_draws_one_budget_per_batch(monkeypatch):
    from types import SimpleNamespace

    import qzoom_ray.train.rpn as rpn

    calls: list[list[int]] = []
    monkeypatch.setattr(rpn, "_image", lambda image, pad: image)
    monkeypatch.setattr(rpn, "encode", lambda proc, image, question, budget, token_px: budget)
    monkeypatch.setattr(rpn, "twig_logit_maps", lambda loaded, heads, enc: calls.append(list(enc)) or [torch.zeros(2, 2)] * len(enc))
    monkeypatch.setattr(rpn, "label_map", lambda row: torch.zeros(2, 2, dtype=torch.long).numpy())
    loaded = SimpleNamespace(processor=None, adapter=SimpleNamespace(token_px=28))
    rows = [{"image": b"", "question": "q", "budget_tokens": 1024}] * 3

    def drawn(budgets, seed):
        calls.clear()
        loss = rpn.rpn_loss_fn(loaded, None, budgets, seed=seed)
        for _ in range(30):
            loss(rows)
        return [c[0] for c in calls], calls

    got, batches = drawn([64, 128, 576], seed=5)
    assert all(len(set(b)) == 1 for b in batches)  # every row of a batch at the same budget
    assert set(got) == {64, 128, 576}
    assert got == drawn([64, 128, 576], seed=5)[0]  # seeded
    assert drawn(128, seed=5)[0] == [128] * 30
    assert drawn(None, seed=5)[0] == [1024] * 30  # each row's label budget
    assert RpnConfig(init_from="x", data_path="y", out_dir="z", budget_tokens=[64, 128]).budget_tokens == [64, 128]


def _label_row(answer: str, gt: str | None, valid: bool = True) -> dict:
    return {"valid": valid, "answer": answer, "gt_answer": gt, "labels": [1, 0, -100, 0]}


def test_correct_answers_only_drops_maps_read_from_a_wrong_answer():
    from qzoom_ray.train.rpn import label_row_usable

    right, wrong, unknown = _label_row(" Seven", "7"), _label_row("3", "7"), _label_row("3", None)
    assert all(label_row_usable(r) for r in (right, wrong, unknown))  # the paper's rule: every valid map
    assert label_row_usable(right, True) and label_row_usable(unknown, True)
    assert not label_row_usable(wrong, True)
    assert not label_row_usable(_label_row("7", "7", valid=False), True)


def test_a_batch_without_usable_rows_teaches_nothing():
    from qzoom_ray.train.rpn import usable_batch

    rows = [_label_row("3", "7"), _label_row("1", "7")]
    assert usable_batch(rows) == rows
    ignored = usable_batch(rows, correct_answers_only=True)
    assert len(ignored) == 2 and all(set(r["labels"]) == {-100} for r in ignored)
    assert rows[0]["labels"] == [1, 0, -100, 0]  # the caller's rows are not modified
    mixed = [_label_row("7", "7"), _label_row("3", "7")]
    assert usable_batch(mixed, correct_answers_only=True) == mixed[:1]
