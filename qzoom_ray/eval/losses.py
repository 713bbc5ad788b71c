"""Where an escalation setting gains and loses against the reference: per group of records (split, category,
question type), and within a group by the answer each record ends with (the first budget's, a crop re-read's, a
larger budget's). An escalation rule can only move records between those answers, so the table says which part
of a gap a threshold can still buy and which part is a sure wrong answer that no threshold escalates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PathTally:
    """The records of a group that end with one answer: how many, and how many each side got right."""

    path: str
    records: int
    right: float
    reference_right: float


@dataclass(frozen=True)
class GroupLoss:
    group: str
    records: int
    right: float
    reference_right: float
    paths: tuple[PathTally, ...]

    @property
    def delta(self) -> float:
        """Records right under the setting minus those right under the reference (partial credit summed)."""
        return self.right - self.reference_right


def losses_by_group(score: np.ndarray, reference: Sequence[float], source: np.ndarray, names: Sequence[str],
                    groups: Sequence[str]) -> list[GroupLoss]:
    """Per group, largest loss first. ``score``/``source``: the setting's per-record scores and answer codes
    (``escalation.walk``), ``names`` what the codes stand for; ``reference`` and ``groups`` in the same order."""
    ref = np.asarray(reference, float)
    score, source = np.asarray(score, float), np.asarray(source, int)
    labels = np.asarray(list(groups), dtype=object)
    if not (score.size == ref.size == source.size == labels.size):
        raise ValueError("score, reference, source and groups must have one entry per record")
    if source.size and (source.min() < 0 or source.max() >= len(names)):
        raise ValueError(f"answer codes outside the {len(names)} names given")
    out = []
    for group in sorted(set(labels.tolist())):
        mask = labels == group
        paths = tuple(
            PathTally(names[code], int((mask & (source == code)).sum()), float(score[mask & (source == code)].sum()),
                      float(ref[mask & (source == code)].sum()))
            for code in range(len(names)) if (mask & (source == code)).any()
        )
        out.append(GroupLoss(group, int(mask.sum()), float(score[mask].sum()), float(ref[mask].sum()), paths))
    return sorted(out, key=lambda g: (g.delta, g.group))


def losses_text(losses: Sequence[GroupLoss], reference_name: str) -> str:
    """A markdown table of :func:`losses_by_group`; points are of the whole set."""
    total = sum(g.records for g in losses) or 1
    lines = [f"| group | records | {reference_name} right | setting right | points | ends with: records, right "
             f"(reference right) |", "|---|---|---|---|---|---|"]
    for g in losses:
        paths = "; ".join(f"{p.path} {p.records}: {p.right:g} ({p.reference_right:g})" for p in g.paths)
        lines.append(f"| {g.group} | {g.records} | {g.reference_right:g} | {g.right:g} | "
                     f"{100 * g.delta / total:+.1f} | {paths} |")
    return "\n".join(lines)
