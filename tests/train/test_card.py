"""Model-card headings say which rows and which kind of run each history entry was."""

from __future__ import annotations

from qzoom_ray.train.card import STAGE_TITLES, stage_title


def test_stage_titles_name_the_data_and_the_refit():
    mined = stage_title({"stage": "sft", "data": {"mined": 10}})
    assert mined == STAGE_TITLES["sft"].format(positions="aligned RoI positions")
    # The positions stage 2 was tuned on are part of what the model is.
    fresh = {"stage": "sft", "config": {"reuse_src_pos": False}}
    assert "fresh-grid RoI positions" in stage_title(fresh)
    assert "fresh-grid" in stage_title({**fresh, "data": {"source": "pseudo_labels"}})
    pseudo = stage_title({"stage": "sft", "data": {"source": "pseudo_labels", "direct_rows": 0}})
    assert "pseudo-RoI" in pseudo and "direct rows" not in pseudo
    assert "direct rows" in stage_title({"stage": "sft", "data": {"source": "pseudo_labels", "direct_rows": 5}})
    zoomed = stage_title({"stage": "sft", "data": {"source": "mined", "select": "zoomed"}})
    assert "every crop its own twig served" in zoomed and "ground truth" in zoomed
    assert stage_title({"stage": "sft", "data": {"source": "mined", "select": "regressions"}}) == mined
    assert stage_title({"stage": "rpn", "config": {"twig_init": True}}) == STAGE_TITLES["rpn"]
    assert "refit" in stage_title({"stage": "rpn", "config": {"twig_init": False}})
    rebuilt = stage_title({"stage": "rpn", "config": {"twig_init": True, "new_heads": True, "twig_K": 0, "twig_T": 2}})
    assert "rebuilt at K=0, T=2" in rebuilt
    assert stage_title({"stage": "something-new"}) == "something-new"


def test_card_settings_name_the_branch_depth_and_skip_unset_fields(tmp_path):
    import json

    from qzoom_ray.train.card import write_model_card

    history = [
        {"stage": "rpn", "init_from": "base", "config": {"twig_K": 1, "twig_T": 2, "lr": 1e-4, "seed": 0}},
        {"stage": "rpn", "init_from": "s2", "config": {"twig_K": None, "twig_T": 2, "lr": 3e-4, "twig_init": False}},
    ]
    (tmp_path / "qzoom_training.json").write_text(json.dumps(history))
    (tmp_path / "config.json").write_text(json.dumps({"twig_K": 0, "twig_T": 2}))
    card = write_model_card(tmp_path).read_text()
    settings = [line for line in card.splitlines() if line.startswith("- settings:")]
    assert settings == ["- settings: twig_K=1, twig_T=2, lr=0.0001, seed=0", "- settings: twig_T=2, lr=0.0003"]


def test_a_stage_started_from_the_embedded_model_carries_its_history(tmp_path):
    from qzoom_ray.train.card import append_history, read_history
    from qzoom_ray.train.common import checkpoint_folder

    shipped = read_history(checkpoint_folder("embedded:tiny"))
    assert [e["stage"] for e in shipped][:2] == ["rpn", "sft"]
    append_history(tmp_path, checkpoint_folder("embedded:tiny"), {"stage": "rpn", "config": {}}, [])
    assert len(read_history(tmp_path)) == len(shipped) + 1
    assert checkpoint_folder(str(tmp_path / "gone")) == tmp_path / "gone"


def test_card_names_every_folder_of_a_multi_path_stage(tmp_path):
    import json

    from qzoom_ray.train.card import write_model_card

    history = [{"stage": "rpn", "init_from": "m", "data": {"path": ["labels-d", "labels-e"], "rows": 3}, "config": {}}]
    (tmp_path / "qzoom_training.json").write_text(json.dumps(history))
    card = write_model_card(tmp_path).read_text()
    assert "- data: path=labels-d + labels-e, rows=3" in card.splitlines()
