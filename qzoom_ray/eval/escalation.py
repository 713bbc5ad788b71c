"""Choosing the escalation threshold (``EngineConfig.escalation``) from evaluation runs, without re-running a model.

An evaluation run (``jobs/evaluate.py``) answers every record at each Q-Zoom budget and keeps each answer's score,
log-probability and model time. Escalating a record from budget ``a`` to ``b`` below threshold ``t`` gives exactly
the ``b`` answer where the ``a`` answer's log-probability is below ``t`` (the rule of ``model.driver.is_unsure``: an
error or a missing log-probability never escalates), and costs both answers' model time. So every threshold of a
grid, single steps and chains, can be scored from one run per validation set, and the choice made by a rule fixed
before anything is run on the test set.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: The thresholds tried per step unless told otherwise (log-probabilities of the whole answer).
DEFAULT_GRID = (-0.05, -0.1, -0.2, -0.3, -0.4, -0.5, -0.7, -1.0)


@dataclass(frozen=True)
class Rung:
    """One setting's answers to the same records, in the same order."""

    score: np.ndarray  # (N,) in [0, 1]
    logprob: np.ndarray  # (N,) NaN where there is none
    seconds: np.ndarray  # (N,) model time of the record
    error: np.ndarray  # (N,) bool

    @classmethod
    def of(cls, score: Sequence[float], logprob: Sequence[float | None], seconds: Sequence[float],
           error: Sequence[bool] | None = None) -> Rung:
        n = len(score)
        if not (len(logprob) == len(seconds) == n and (error is None or len(error) == n)):
            raise ValueError("score, logprob, seconds and error must have one entry per record")
        lp = np.array([math.nan if v is None else float(v) for v in logprob])
        return cls(np.asarray(score, float), lp, np.asarray(seconds, float),
                   np.zeros(n, bool) if error is None else np.asarray(error, bool))


@dataclass(frozen=True)
class Outcome:
    """A setting's accuracy (%) and model time on one set; ``escalated``: share of records answered again."""

    steps: tuple[int, ...]
    thresholds: tuple[float, ...]
    accuracy: float
    seconds: float
    escalated: float
    reread_below: float | None = None

    @property
    def name(self) -> str:
        hops = " -> ".join(str(b) for b in self.steps)
        if not self.thresholds:
            return f"Max-{hops}"
        reread = "" if self.reread_below is None else f", crop re-read below {self.reread_below:g}"
        return f"{hops} below {' / '.join(f'{t:g}' for t in self.thresholds)}{reread}"


def escalate(ladder: Mapping[int, Rung], steps: Sequence[int], thresholds: Sequence[float],
             rereads: Mapping[int, Rung] | None = None, reread_below: float | None = None) -> Outcome:
    """Answer at ``steps[0]``; an answer at ``steps[i]`` below ``thresholds[i]`` is answered again at ``steps[i+1]``.

    With ``reread_below`` (``EscalationConfig.reread_crop_below``) an unsure answer that has a crop re-read at its
    budget in ``rereads`` takes the re-read's answer first, and goes on only where that is below ``reread_below``.
    """
    score, seconds, answered_again = escalated_records(ladder, steps, thresholds, rereads, reread_below)
    return Outcome(tuple(steps), tuple(float(t) for t in thresholds), 100.0 * float(score.mean()),
                   float(seconds.sum()), float(answered_again.mean()),
                   None if reread_below is None else float(reread_below))


def escalated_records(ladder: Mapping[int, Rung], steps: Sequence[int], thresholds: Sequence[float],
                      rereads: Mapping[int, Rung] | None = None,
                      reread_below: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per record, under :func:`escalate`'s rule: the final answer's score, the model time of every answer the
    record got, and whether it was answered again.

    A crop re-read rung holds an answer for the records the zoom route answered at its budget; the others are
    marked as errors there (no re-read: they escalate as without one, like a re-read that failed in the engine).
    """
    score, seconds, answered_again, _ = walk(ladder, steps, thresholds, rereads, reread_below)
    return score, seconds, answered_again


def path_names(steps: Sequence[int]) -> list[str]:
    """What the codes of :func:`walk`'s ``source`` stand for: 0 the first budget's answer, then for each step a
    crop re-read at the budget before it (odd codes) and that step's own answer (even codes)."""
    names = [f"Max-{steps[0]}"]
    for before, budget in itertools.pairwise(steps):
        names += [f"crop re-read at Max-{before}", f"Max-{budget}"]
    return names


def walk(ladder: Mapping[int, Rung], steps: Sequence[int], thresholds: Sequence[float],
         rereads: Mapping[int, Rung] | None = None,
         reread_below: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`escalated_records`, and per record the code of the answer it ends with (:func:`path_names`)."""
    if len(thresholds) != len(steps) - 1:
        raise ValueError(f"{len(steps)} budgets need {len(steps) - 1} thresholds, got {len(thresholds)}")
    first = ladder[steps[0]]
    score, seconds = first.score.copy(), first.seconds.copy()
    source = np.zeros(score.size, int)
    asked = np.ones(score.size, bool)  # the records whose current answer is the latest rung's
    answered_again = np.zeros(score.size, bool)
    current, at = first, steps[0]
    for i, (budget, threshold) in enumerate(zip(steps[1:], thresholds, strict=True), start=1):
        # A NaN log-probability compares False: no answer to judge, no escalation (driver.is_unsure).
        asked = asked & ~current.error & (current.logprob < threshold)
        reread = (rereads or {}).get(at) if reread_below is not None else None
        if reread is not None:
            if reread.score.size != score.size:
                raise ValueError(f"the Max-{at} re-reads have {reread.score.size} records, not {score.size}")
            took = asked & ~reread.error
            score = np.where(took, reread.score, score)
            seconds = seconds + np.where(took, reread.seconds, 0.0)
            source = np.where(took, 2 * i - 1, source)
            answered_again |= took
            asked = (asked & reread.error) | (took & (reread.logprob < reread_below))
        answered_again |= asked
        current, at = ladder[budget], budget
        if current.score.size != score.size:
            raise ValueError(f"Max-{budget} has {current.score.size} records, Max-{steps[0]} {score.size}")
        score = np.where(asked, current.score, score)
        seconds = seconds + np.where(asked, current.seconds, 0.0)
        source = np.where(asked, 2 * i, source)
    return score, seconds, answered_again, source


def candidate_outcomes(ladder: Mapping[int, Rung], grid: Sequence[float] = DEFAULT_GRID,
                       rereads: Mapping[int, Rung] | None = None) -> list[Outcome]:
    """Every plain budget, every single step from the lowest budget, and every chain through all of them; with
    ``rereads``, each of those steps and chains again with every crop re-read threshold of ``grid``."""
    budgets = sorted(ladder)
    out = [escalate(ladder, [b], []) for b in budgets]
    paths = [([budgets[0], hi], [t]) for hi in budgets[1:] for t in grid]
    if len(budgets) > 2:
        paths += [(budgets, list(ts)) for ts in itertools.product(grid, repeat=len(budgets) - 1)]
    for steps, ts in paths:
        out.append(escalate(ladder, steps, ts))
        if rereads:
            out += [escalate(ladder, steps, ts, rereads, r) for r in grid]
    return out


@dataclass(frozen=True)
class Scored:
    """One setting judged on every set: accuracy minus the set's reference, and speed-up over it."""

    name: str
    steps: tuple[int, ...]
    thresholds: tuple[float, ...]
    margins: tuple[float, ...]  # accuracy - reference accuracy, points, one per set
    speedups: tuple[float, ...]  # reference seconds / setting seconds, one per set
    escalated: tuple[float, ...]
    reread_below: float | None = None


def score_settings(per_set: Sequence[Sequence[Outcome]], references: Sequence[tuple[float, float]]) -> list[Scored]:
    """Join each set's outcomes by setting. ``references``: (accuracy %, seconds) of the reference, per set."""
    if len(per_set) != len(references) or not per_set:
        raise ValueError("one list of outcomes and one reference per set")
    by_key = [{(o.steps, o.thresholds, o.reread_below): o for o in outs} for outs in per_set]
    keys = [k for k in by_key[0] if all(k in d for d in by_key[1:])]
    out = []
    for key in keys:
        outs = [d[key] for d in by_key]
        out.append(Scored(outs[0].name, key[0], key[1],
                          tuple(o.accuracy - ref_acc for o, (ref_acc, _) in zip(outs, references, strict=True)),
                          tuple(ref_s / o.seconds for o, (_, ref_s) in zip(outs, references, strict=True)),
                          tuple(o.escalated for o in outs), key[2]))
    return out


def rank(scored: Sequence[Scored], rule: str, min_speedup: float = 4.0,
         max_drop: float = 0.5) -> list[tuple[Scored, bool]]:
    """Every setting with whether the rule may pick it, best first by the rule's order; each judged by its worst set.

    * ``accuracy``: settings at least ``min_speedup`` x the reference on every set qualify; the higher worst-case
      margin ranks first (ties: the higher worst-case speed-up);
    * ``speed``: settings no more than ``max_drop`` points below the reference on every set qualify; the higher
      worst-case speed-up ranks first (ties: the higher worst-case margin).
    """
    if rule == "accuracy":
        def key(s: Scored) -> tuple[bool, float, float]:
            return min(s.speedups) >= min_speedup, min(s.margins), min(s.speedups)
    elif rule == "speed":
        def key(s: Scored) -> tuple[bool, float, float]:
            return min(s.margins) >= -max_drop, min(s.speedups), min(s.margins)
    else:
        raise ValueError(f"rule must be 'accuracy' or 'speed', got {rule!r}")
    return [(s, key(s)[0]) for s in sorted(scored, key=key, reverse=True)]


def choose(scored: Sequence[Scored], rule: str, min_speedup: float = 4.0, max_drop: float = 0.5) -> Scored | None:
    """The setting the rule picks (the first of :func:`rank`); None where no setting qualifies."""
    ranked = rank(scored, rule, min_speedup, max_drop)
    return ranked[0][0] if ranked and ranked[0][1] else None


def escalation_config(choice: Scored) -> dict:
    """The ``escalation:`` block serving ``choice``; a plain budget has none and is refused."""
    if len(choice.steps) < 2:
        raise ValueError(f"{choice.name} is a plain budget, not an escalation")
    hops = dict(zip(choice.steps[:-1], choice.steps[1:], strict=True))
    below = dict(zip(choice.steps[:-1], choice.thresholds, strict=True))
    block = {"below_logprob": below[choice.steps[0]] if len(below) == 1 else below, "to_budget": hops}
    if choice.reread_below is not None:
        block["reread_crop_below"] = choice.reread_below
    return block
