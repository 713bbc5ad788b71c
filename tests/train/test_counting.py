"""Count supervision for the base model: countable objects and count questions from the renderer, their
targets through encode/collate, and the two read-outs teach only the layers up to their own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from readout_helpers import assert_readout_teaches_only

from qzoom_ray.synth.generator import render_record
from qzoom_ray.synth.vocab import TEMPLATES
from qzoom_ray.train.data import TrainSample, collate, encode_sample
from qzoom_ray.train.grounding import (
    COUNT_ROWS,
    COUNT_VALUES,
    OBJECT_CENTRES,
    split_targets,
)
from qzoom_ray.train.readouts import CountReadout, ObjectCentreReadout, image_token_xy, object_centre_cells
from qzoom_ray.train.synth_source import countable_objects, make_sample_fn, question_counts

TINY_BASE = "qzoom_ray/assets/tiny-base"


@pytest.fixture(scope="module")
def base():
    from qzoom_ray.train.base_config import build_from_checkpoint

    torch.manual_seed(0)
    return build_from_checkpoint(TINY_BASE)


def _count_samples(n: int, seed: int = 0) -> list[TrainSample]:
    sample = make_sample_fn(templates=("scene_count", "doc_stamp_count"), full_budgets=(64,), crop_prob=0.0,
                            max_turns=2, count_objects=True)
    rng = np.random.default_rng(seed)
    return [sample(rng) for _ in range(n)]


def test_object_centre_cells_mark_one_cell_per_object():
    # A 280 x 140 view on a 5 x 10 grid: one cell is 28 x 28 view pixels.
    cells = object_centre_cells([(0, 0, 56, 56), (84, 56, 112, 84), (270, 130, 280, 140)], (280, 140), (5, 10))
    grid = cells.reshape(5, 10)
    assert cells.dtype == np.float32 and grid.sum() == 3
    assert grid[1, 1] == grid[2, 3] == grid[4, 9] == 1  # a 2x2-cell box marks only its centre's cell
    # Two objects whose centres share a cell mark it once; no objects, no marks.
    assert object_centre_cells([(0, 0, 10, 10), (2, 2, 12, 12)], (280, 140), (5, 10)).sum() == 1
    assert object_centre_cells([], (280, 140), (5, 10)).sum() == 0


def test_countable_objects_are_the_shapes_or_the_stamps_the_count_question_counts():
    scene = render_record(3, split="ordinary", template="scene_count")
    full = (0, 0, scene.width, scene.height)
    assert len(countable_objects(scene, full)) == len(scene.objects) == int(scene.answer)
    page = render_record(4, split="ordinary", template="doc_stamp_count")
    stamps = countable_objects(page, (0, 0, page.width, page.height))
    assert len(stamps) == int(page.answer) and len(stamps) < len(page.objects)  # not the header
    # A window keeps the objects whose centre it holds, in its own pixels, clipped to it.
    x0, y0, x1, y1 = page.objects[0]["box"]
    window = (x0 + 1, y0 - 3, x1 + 7, y1 + 2)
    assert countable_objects(page, window) == [(0, 3, x1 - x0 - 1, y1 - y0 + 3)]
    assert countable_objects(page, (0, 0, 2, 2)) == []
    qa = [(TEMPLATES["doc_stamp_count"], "3"), (TEMPLATES["doc_header_colour"], "red"),
          (TEMPLATES["scene_count"], "4")]
    assert question_counts(qa) == [("stamps", 3), None, ("shapes", 4)]


def test_count_targets_point_from_the_counted_word_and_mark_every_object(base):
    tok, proc, _ = base
    image_token = tok.convert_tokens_to_ids("<|image_pad|>")
    samples = _count_samples(6)
    assert any(s.counts and any(s.counts) for s in samples)
    encoded = [encode_sample(proc, s) for s in samples]
    for s, e in zip(samples, encoded, strict=True):
        asked = [c for c in s.counts if c is not None]
        assert [n for _, n in e.get("count", [])] == [n for _, n in asked]
        for (query, _), (word, _) in zip(e.get("count", []), asked, strict=True):
            assert tok.convert_ids_to_tokens(int(e["input_ids"][query])) == "Ġ" + word
        assert e["object_centres"].sum() >= 1 and e["object_centres"].sum() <= len(s.objects)
        assert len(e["object_centres"]) == int((e["input_ids"] == image_token).sum())
    # A sample without object targets gets -1 for each of its visual tokens, so the others still line up.
    plain = TrainSample(samples[0].image, samples[0].question, samples[0].answer, 64)
    batch = collate([*encoded, encode_sample(proc, plain)], int(tok.pad_token_id), image_token)
    targets = split_targets(batch)
    assert OBJECT_CENTRES not in batch and COUNT_ROWS not in batch and COUNT_VALUES not in batch
    rows, _, _ = image_token_xy(batch["input_ids"], batch["image_grid_thw"], image_token)
    assert targets[OBJECT_CENTRES].shape == rows.shape
    assert bool((targets[OBJECT_CENTRES][rows == len(encoded)] == -1).all())
    assert bool((targets[OBJECT_CENTRES][rows < len(encoded)] >= 0).all())
    assert targets[COUNT_ROWS].shape == (len(targets[COUNT_VALUES]), 2)
    with pytest.raises(ValueError, match="one per turn"):
        encode_sample(proc, TrainSample(plain.image, plain.question, "2", 64, counts=[None, ("stamps", 2)]))


def test_count_readout_teaches_the_counted_word_its_count(base):
    tok, proc, model = base
    batch = collate([encode_sample(proc, s) for s in _count_samples(8, seed=2)], int(tok.pad_token_id),
                    tok.convert_tokens_to_ids("<|image_pad|>"))
    layers = model.model.language_model.layers
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        CountReadout(layers, 3, model.config.text_config.hidden_size)
    torch.manual_seed(3)
    readout = CountReadout(layers, 1, model.config.text_config.hidden_size)
    assert not readout.bind(batch, {})  # no count questions: nothing to supervise
    assert {n for n, _ in readout.named_parameters()} == {"head.weight", "head.bias"}
    assert_readout_teaches_only(model, batch, readout, ("0", "1"), drop=0.25)
    assert not any(k.startswith("head.") for k in model.state_dict())


def test_object_centre_readout_teaches_layer_0_where_the_objects_are(base):
    tok, proc, model = base
    image_token = tok.convert_tokens_to_ids("<|image_pad|>")
    batch = collate([encode_sample(proc, s) for s in _count_samples(6, seed=4)], int(tok.pad_token_id), image_token)
    layers = model.model.language_model.layers
    torch.manual_seed(4)
    readout = ObjectCentreReadout(layers, 0, model.config.text_config.hidden_size, image_token)
    assert not readout.bind(batch, {})
    assert_readout_teaches_only(model, batch, readout, ("0",), drop=0.5)
