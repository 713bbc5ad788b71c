"""Stage 2's per-row budgets: zoomed rows drawn from ``zoom_budgets``, direct rows at ``budget_tokens``."""

from __future__ import annotations

from types import SimpleNamespace

import torch

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
