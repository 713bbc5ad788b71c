"""The learning-rate schedule: smooth warm-up and a full decay whether steps or the clock end the run."""

from __future__ import annotations

import numpy as np

from qzoom_ray.train.loop import LoopConfig, cosine_lr


def test_step_schedule_warms_up_peaks_and_decays_to_zero():
    cfg = LoopConfig(steps=1000, lr=1e-3, warmup_ratio=0.1)
    lrs = [cosine_lr(s, cfg) for s in range(1000)]
    assert np.isclose(lrs[0], 1e-5) and np.isclose(max(lrs), 1e-3)
    assert np.all(np.diff(lrs[:99]) > 0) and np.all(np.diff(lrs[100:]) <= 0)
    assert lrs[-1] < 1e-8


def test_a_deadline_run_warms_up_smoothly_in_time_then_decays():
    # Far fewer steps than configured get done: time drives both phases, with no jump to the peak.
    cfg = LoopConfig(steps=100_000, lr=4e-3, warmup_ratio=0.03)
    times = np.linspace(0, 1, 2001)
    lrs = np.array([cosine_lr(int(t * 3000), cfg, t) for t in times])
    assert np.max(np.abs(np.diff(lrs))) < 0.05 * cfg.lr
    assert np.isclose(lrs.max(), cfg.lr, rtol=0.02)
    assert lrs[-1] < 1e-8 and lrs[times.searchsorted(0.03)] > 0.9 * cfg.lr


def test_a_phase_without_decay_holds_the_peak_after_warm_up():
    cfg = LoopConfig(steps=1000, lr=2e-3, warmup_ratio=0.05, decay=False)
    lrs = np.array([cosine_lr(s, cfg) for s in range(1000)])
    assert np.all(np.diff(lrs[:49]) > 0)
    assert np.allclose(lrs[50:], 2e-3)
