"""Model-card headings say which rows and which kind of run each history entry was."""

from __future__ import annotations

from qzoom_ray.train.card import STAGE_TITLES, stage_title


def test_stage_titles_name_the_data_and_the_refit():
    assert stage_title({"stage": "sft", "data": {"mined": 10}}) == STAGE_TITLES["sft"]
    pseudo = stage_title({"stage": "sft", "data": {"source": "pseudo_labels", "direct_rows": 0}})
    assert "pseudo-RoI" in pseudo and "direct rows" not in pseudo
    assert "direct rows" in stage_title({"stage": "sft", "data": {"source": "pseudo_labels", "direct_rows": 5}})
    assert stage_title({"stage": "rpn", "config": {"twig_init": True}}) == STAGE_TITLES["rpn"]
    assert "refit" in stage_title({"stage": "rpn", "config": {"twig_init": False}})
    assert stage_title({"stage": "something-new"}) == "something-new"
