"""A plain optimisation loop (AdamW, warm-up + cosine), shared by every training stage."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class LoopConfig:
    steps: int
    lr: float
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    log_every: int = 20
    #: Wall-clock budget: the schedule decays by whichever comes first, steps or time, so a job
    #: with a deadline still ends on a fully decayed learning rate.
    max_seconds: float | None = None
    #: False: hold the peak rate after warm-up (a curriculum phase that hands over to the next one).
    decay: bool = True


@dataclass
class LoopStats:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    samples: int = 0


def cosine_lr(step: int, cfg: LoopConfig, time_progress: float = 0.0) -> float:
    """Linear warm-up then cosine decay, over steps or wall-clock time, whichever runs out first.

    Both phases advance with the larger of step progress and time progress, so a run whose
    deadline ends it long before ``steps`` warms up smoothly over the first ``warmup_ratio`` of its
    time instead of jumping to the peak.
    """
    warmup = max(1, int(cfg.steps * cfg.warmup_ratio))
    warm = max((step + 1) / warmup, time_progress / cfg.warmup_ratio if cfg.warmup_ratio > 0 else 1.0)
    if warm < 1.0:
        return cfg.lr * warm
    if not cfg.decay:
        return cfg.lr
    step_progress = (step - warmup) / max(1, cfg.steps - warmup)
    time_after = (time_progress - cfg.warmup_ratio) / (1.0 - cfg.warmup_ratio) if cfg.warmup_ratio < 1 else 1.0
    progress = max(step_progress, time_after)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def train_loop(
    params: Iterable[torch.nn.Parameter],
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: LoopConfig,
    on_log: Callable[[int, float, float], None] | None = None,
) -> LoopStats:
    """Run ``cfg.steps`` optimiser steps of ``loss_fn`` over ``batches``; only ``params`` are updated."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    stats = LoopStats()
    t0 = time.perf_counter()
    lr = cfg.lr
    window: list[float] = []
    for step in range(cfg.steps):
        elapsed = time.perf_counter() - t0
        time_progress = elapsed / cfg.max_seconds if cfg.max_seconds else 0.0
        if time_progress >= 1.0:
            break
        batch = next(batches)
        lr = cosine_lr(step, cfg, time_progress)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        value = float(loss.detach())
        stats.losses.append(value)
        # Chat batches count sequences; vision batches (no text) count images.
        key = "input_ids" if "input_ids" in batch else "image_grid_thw"
        stats.samples += int(batch[key].shape[0]) if key in batch else 0
        window.append(value)
        if on_log and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            on_log(step + 1, sum(window) / len(window), lr)
            window = []
    stats.seconds = time.perf_counter() - t0
    return stats
