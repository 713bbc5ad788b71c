"""Shared by the read-out tests: a few optimiser steps on one read-out's loss, restoring the model after."""

from __future__ import annotations

import torch
from torch import nn


def train_readout(
    model: nn.Module, batch: dict[str, torch.Tensor], readout: nn.Module, trainable: tuple[str, ...], steps: int = 20
) -> tuple[list[float], set[str]]:
    """Train the decoder layers ``trainable`` and the read-out head on the read-out's own loss alone for
    ``steps``; the logged losses and the names of the model parameters that changed. The model is left
    as it was."""
    from qzoom_ray.train.base import Auxiliary, chat_loss_fn

    aux = Auxiliary("readout", readout, 1.0)
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    train = [n for n in params if any(f"language_model.layers.{i}." in n for i in trainable)]
    for n, p in params.items():
        p.requires_grad_(n in train)
    opt = torch.optim.Adam([params[n] for n in train] + list(readout.parameters()), lr=3e-3)
    try:
        for _ in range(steps):
            chat_loss_fn(model, [aux])(dict(batch))
            opt.zero_grad()
            readout.loss.backward()  # the read-out's own gradient: the next-token loss reaches every layer
            opt.step()
        changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    finally:
        for n, p in params.items():  # leave the module-scoped model as it was
            p.requires_grad_(True)
            p.data.copy_(before[n])
    return aux.losses, changed


def assert_readout_teaches_only(
    model: nn.Module, batch: dict[str, torch.Tensor], readout: nn.Module, trainable: tuple[str, ...], drop: float
) -> None:
    """Trained on its own loss, the read-out's loss falls below ``drop`` x its first value and only the
    decoder layers ``trainable`` (those up to the read-out's) change."""
    losses, changed = train_readout(model, batch, readout, trainable)
    assert len(losses) == 20 and losses[-1] < drop * losses[0], losses
    assert changed and all(any(f"language_model.layers.{i}." in n for i in trainable) for n in changed), changed
