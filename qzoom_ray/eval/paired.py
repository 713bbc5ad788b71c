"""How sure a comparison of two settings on the same records is: paired bootstrap intervals.

Two settings answered on the same records differ on few of them, so the accuracy gap between them is far
less noisy than either accuracy, but at a few hundred records a one-point gap is still inside the noise
(the standard error of the gap is about sqrt(discordant share / n)). A target such as "within 1 point of the
baseline's peak at 4x its records/s" can only be judged with the interval next to the point estimate.

Records are resampled with replacement, the same indices for both settings, and each resample gives the
accuracy gap (points) and the speed-up (the baseline's total model time over the other setting's, which is
the ratio of their records/s). The interval is the resamples' percentile interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 2000


@dataclass(frozen=True)
class PairedGap:
    """A setting against a reference on the same ``n`` records: point estimates and bootstrap intervals."""

    n: int
    gap_points: float
    gap_interval: tuple[float, float]
    speedup: float
    speedup_interval: tuple[float, float]
    discordant: int  # records whose two scores differ by more than half a credit (one right, one wrong)
    level: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "gap_points": self.gap_points,
            "gap_interval": list(self.gap_interval),
            "speedup": self.speedup,
            "speedup_interval": list(self.speedup_interval),
            "discordant": self.discordant,
            "level": self.level,
        }


def paired_gap(
    scores: Sequence[float],
    reference_scores: Sequence[float],
    times: Sequence[float],
    reference_times: Sequence[float],
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> PairedGap:
    """``scores`` / ``times`` of a setting and of the reference, aligned record by record.

    The gap is the setting's accuracy minus the reference's, in points; the speed-up is sum(reference_times) /
    sum(times) (NaN when either total is zero). Scores may be partial credit (any float in [0, 1]); times are
    per-record model seconds.
    """
    s, r = np.asarray(scores, float), np.asarray(reference_scores, float)
    t, rt = np.asarray(times, float), np.asarray(reference_times, float)
    n = len(s)
    if n == 0 or not (len(r) == len(t) == len(rt) == n):
        raise ValueError(f"need equal, non-empty aligned arrays, got lengths {len(s)}, {len(r)}, {len(t)}, {len(rt)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    diff = s - r
    gaps = 100.0 * diff[idx].mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    # Without timings (both totals must be positive) there is no speed-up to state, but the gap still stands.
    speedup, speedup_interval = math.nan, (math.nan, math.nan)
    if t.sum() > 0 and rt.sum() > 0:
        with np.errstate(divide="ignore"):
            ratios = rt[idx].sum(axis=1) / t[idx].sum(axis=1)
        speedup = float(rt.sum() / t.sum())
        speedup_interval = (float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100.0 - tail)))
    return PairedGap(
        n=n,
        gap_points=float(100.0 * diff.mean()),
        gap_interval=(float(np.percentile(gaps, tail)), float(np.percentile(gaps, 100.0 - tail))),
        speedup=speedup,
        speedup_interval=speedup_interval,
        discordant=int(np.sum(np.abs(diff) > 0.5)),
        level=level,
    )


def align_by_id(
    predictions: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]]
) -> tuple[list[float], list[float], list[float], list[float]]:
    """(scores, reference scores, times, reference times) over the ids both settings answered, in the
    reference's order. Each prediction needs ``id``, ``score`` and ``model_s``."""
    by_id = {p["id"]: p for p in predictions}
    if len(by_id) != len(predictions):
        raise ValueError("a setting answered some id more than once")
    pairs = [(by_id[r["id"]], r) for r in reference if r["id"] in by_id]
    if not pairs:
        raise ValueError("the two settings share no record id")
    return (
        [float(p["score"]) for p, _ in pairs],
        [float(r["score"]) for _, r in pairs],
        [float(p["model_s"]) for p, _ in pairs],
        [float(r["model_s"]) for _, r in pairs],
    )
