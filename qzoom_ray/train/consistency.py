"""Stage-3 gate labels from answers at a ladder of budgets (spec §2.3). Pure functions.

A record is kept only when its answers tell a clean story: the two highest budgets agree with each
other and with the ground truth (the "target"), and any wrong answers sit at a prefix of the lowest
budgets (wrong -> right as resolution grows). Such a record is "hard" (it needs resolution: label
1 at a wrong budget) or "easy" (right everywhere: label 0). Hard and easy are mixed 1:1 with a seed
(the authors' unseeded ``random.sample`` differs per DDP rank, spec §8.16).
"""

from __future__ import annotations

import math
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_PUNCT = str.maketrans("", "", string.punctuation)

UNSTABLE, HALLUCINATED, NON_MONOTONIC, HARD, EASY = "unstable", "hallucinated", "non_monotonic", "hard", "easy"


def normalise(text: str) -> str:
    """The authors' normalisation: lowercase, strip, drop ASCII punctuation."""
    return str(text).lower().strip().translate(_PUNCT).strip()


def answers_match(a: str, b: str) -> bool:
    """Containment either way after normalisation; an empty answer matches nothing (it would match all)."""
    na, nb = normalise(a), normalise(b)
    return bool(na) and bool(nb) and (na in nb or nb in na)


@dataclass(frozen=True)
class LadderVerdict:
    kind: str  # hard | easy | unstable | hallucinated | non_monotonic
    target: str | None
    wrong: tuple[int, ...]  # budget indices (ascending) whose answer does not match the target

    @property
    def kept(self) -> bool:
        return self.kind in (HARD, EASY)


def classify_ladder(answers: Sequence[str], ground_truth: Sequence[str] | str) -> LadderVerdict:
    """Verdict for one record; ``answers`` are the model's answers at ascending budgets (>= 2 budgets)."""
    if len(answers) < 2:
        raise ValueError("a ladder needs at least two budgets")
    gts = [ground_truth] if isinstance(ground_truth, str) else list(ground_truth)
    top = [normalise(a) for a in answers[-2:]]
    # "Most common of the top two" has a majority only when both are the same (normalised) answer.
    if top[0] != top[1] or not top[0]:
        return LadderVerdict(UNSTABLE, None, ())
    target = top[0]
    if not any(answers_match(target, g) for g in gts):
        return LadderVerdict(HALLUCINATED, target, ())
    wrong = tuple(i for i, a in enumerate(answers) if not answers_match(a, target))
    if not wrong:
        return LadderVerdict(EASY, target, ())
    if wrong != tuple(range(len(wrong))):
        return LadderVerdict(NON_MONOTONIC, target, wrong)
    return LadderVerdict(HARD, target, wrong)


def draw_label(verdict: LadderVerdict, n_budgets: int, rng: np.random.Generator,
               p_positive: float = 0.9, zoom_correct: Sequence[float | None] | None = None) -> tuple[int, int] | None:
    """(budget index, label) for one fetch of a kept record, or None when the draw yields nothing.

    Easy: a correct budget other than the top two -> 0. Hard: with ``p_positive`` one of the last two
    wrong budgets (closest to the transition) -> 1; otherwise a correct non-top budget -> 0 when more
    than two correct budgets exist (the authors' rule).

    ``zoom_correct`` (beyond the paper; per budget, None where not checked) is whether the Q-Zoom path
    answered right at that budget. A drawn wrong budget where the zoom pass was checked and failed is
    labelled 0: a higher budget would have helped, but this model's zoom does not, so zooming there only
    costs time (counting questions: the crop shows one of the shapes a second time).
    """
    if verdict.kind == EASY:
        choices = list(range(n_budgets - 2))
        return (int(rng.choice(choices)), 0) if choices else None
    if verdict.kind != HARD:
        return None
    if rng.random() < p_positive:
        b = int(rng.choice(verdict.wrong[-2:]))
        checked = zoom_correct[b] if zoom_correct is not None and b < len(zoom_correct) else None
        # NaN, like None, marks a budget that was not checked (it keeps a Parquet column's type fixed).
        return b, int(checked is None or math.isnan(checked) or checked >= 0.5)
    correct = [i for i in range(n_budgets) if i not in verdict.wrong]
    if len(correct) > 2:
        return int(rng.choice(correct[:-2])), 0
    return None


def mix_hard_easy(hard: Sequence[int], easy: Sequence[int], seed: int, max_samples: int | None = None) -> list[int]:
    """All hard records + as many easy ones (seeded sample), shuffled with the seed, capped at ``max_samples``."""
    rng = np.random.default_rng(seed)
    n_easy = min(len(hard), len(easy))
    picked = [easy[int(i)] for i in rng.choice(len(easy), size=n_easy, replace=False)] if n_easy else []
    mixed = list(hard) + picked
    order = rng.permutation(len(mixed))
    mixed = [mixed[int(i)] for i in order]
    return mixed[:max_samples] if max_samples is not None else mixed


def filter_summary(verdicts: Sequence[LadderVerdict]) -> dict[str, int]:
    counts = Counter(v.kind for v in verdicts)
    return {k: int(counts.get(k, 0)) for k in (HARD, EASY, UNSTABLE, HALLUCINATED, NON_MONOTONIC)}
