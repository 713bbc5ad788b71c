"""The reading warm-up source and the held-out views logged during base-model training."""

from __future__ import annotations

import numpy as np

from qzoom_ray.synth.vocab import CODE_ALPHABET
from qzoom_ray.train.heldout import synth_heldout_views
from qzoom_ray.train.reading_source import GLYPHS, READ_QUESTION, TOKEN_PX, make_sample_fn


def test_reading_views_hold_short_strings_at_a_few_tokens():
    fn = make_sample_fn(lengths=(1, 3), glyph_tokens=(1.0, 1.6))
    rng = np.random.default_rng(0)
    samples = [fn(rng) for _ in range(40)]
    assert {len(s.answer) for s in samples} == {1, 3}
    assert all(set(s.answer) <= set(GLYPHS) and s.question == READ_QUESTION for s in samples)
    assert set(CODE_ALPHABET) <= set(GLYPHS) and set("0123456789") <= set(GLYPHS)
    for s in samples:
        # The budget's pixel area is about the image's area at the asked glyph size: a few dozen tokens.
        w, h = s.image.size
        assert 4 <= s.budget_tokens <= 80
        assert s.budget_tokens * TOKEN_PX**2 <= w * h * (1.6 * TOKEN_PX / 30) ** 2 + TOKEN_PX**2
        # Ink is dark on a light background.
        px = np.asarray(s.image.convert("L"))
        assert px.min() < 90 and np.median(px) > 180


def test_reading_source_is_deterministic_per_seed():
    fn = make_sample_fn()
    a, b = fn(np.random.default_rng(5)), fn(np.random.default_rng(5))
    assert a.answer == b.answer and a.budget_tokens == b.budget_tokens
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_heldout_views_cover_every_view_of_fine_and_coarse_records():
    views = synth_heldout_views(n=12)
    groups = {g.split("/")[0] for g, _ in views}
    assert groups == {"crop128", "tight", "full1024", "full64"}
    tight = [s for g, s in views if g.startswith("tight/")]
    crops = [s for g, s in views if g.startswith("crop128/")]
    assert len(tight) == len(crops) > 0
    assert all(t.budget_tokens < 128 for t in tight)
    # Same records, same questions across views; held-out records are their own seed stream.
    assert [s.question for s in tight] == [s.question for s in crops]
    assert synth_heldout_views(n=12)[0][1].answer == views[0][1].answer
