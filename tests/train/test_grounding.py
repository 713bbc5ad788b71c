"""Grounding supervision: box -> token cells, the targets carried through encode/collate, the hooked
head's probabilities equal eager attention's, and the loss teaches the head to look at the named shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from readout_helpers import assert_readout_teaches_only

from qzoom_ray.train.data import TrainSample, collate, encode_sample
from qzoom_ray.train.grounding import (
    GROUNDING_CENTRES,
    GROUNDING_KEYS,
    GROUNDING_ROWS,
    Grounding,
    GroundingLoss,
    box_centre,
    box_token_cells,
    head_row_probs,
    split_targets,
)
from qzoom_ray.train.readouts import LocationReadout, TokenPositionReadout, image_token_xy
from qzoom_ray.train.synth_source import make_sample_fn, shape_groundings

TINY_BASE = "qzoom_ray/assets/tiny-base"


def test_box_token_cells_on_hand_made_boxes():
    # A 280 x 140 view on a 10 x 5 grid: one cell is 28 x 28 view pixels.
    whole = box_token_cells((0, 0, 280, 140), (280, 140), (5, 10))
    assert whole.all() and whole.shape == (50,)
    left = box_token_cells((0, 0, 140, 140), (280, 140), (5, 10)).reshape(5, 10)
    assert left[:, :5].all() and not left[:, 5:].any()
    # Cell (row 2, col 3) exactly, and a box a quarter of a cell wide straddling two cells.
    one = box_token_cells((84, 56, 112, 84), (280, 140), (5, 10)).reshape(5, 10)
    assert one.sum() == 1 and one[2, 3]
    tiny = box_token_cells((100, 60, 104, 64), (280, 140), (5, 10)).reshape(5, 10)
    assert tiny.sum() == 1 and tiny[2, 3]  # too small to cover a quarter: the centre's cell


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 12), st.integers(1, 12), st.integers(50, 2000), st.integers(50, 2000),
    st.floats(0, 1), st.floats(0, 1), st.floats(0.001, 1), st.floats(0.001, 1),
)
def test_box_token_cells_always_has_the_centre_cell_or_a_quarter_covered_cells(h, w, vw, vh, fx, fy, fw, fh):
    x0, y0 = fx * vw * 0.99, fy * vh * 0.99
    box = (x0, y0, min(vw, x0 + fw * vw), min(vh, y0 + fh * vh))
    cells = box_token_cells(box, (vw, vh), (h, w)).reshape(h, w)
    assert cells.any()
    # Every chosen cell overlaps the box (in grid units).
    rows, cols = np.nonzero(cells)
    gx0, gx1, gy0, gy1 = box[0] * w / vw, box[2] * w / vw, box[1] * h / vh, box[3] * h / vh
    assert np.all(cols + 1 >= gx0) and np.all(cols <= gx1) and np.all(rows + 1 >= gy0) and np.all(rows <= gy1)


@pytest.fixture(scope="module")
def base():
    from qzoom_ray.train.base_config import build_from_checkpoint

    torch.manual_seed(0)
    return build_from_checkpoint(TINY_BASE)


def _scene_samples(n: int, seed: int = 0) -> list[TrainSample]:
    sample = make_sample_fn(templates=("scene_colour", "scene_side", "scene_count"), full_budgets=(64,),
                            ground_shapes=True)
    rng = np.random.default_rng(seed)
    return [sample(rng) for _ in range(n)]


def test_scene_questions_name_their_shape_and_its_box():
    from qzoom_ray.synth.generator import render_record
    from qzoom_ray.synth.vocab import TEMPLATES

    rec = render_record(5, split="ordinary", template="scene_colour")
    qs = [TEMPLATES["scene_colour"].format(shape=o["kind"]) for o in rec.objects] + [TEMPLATES["scene_count"]]
    got = shape_groundings(rec, (0, 0, rec.width, rec.height), qs)
    assert [g.word for g in got[:-1]] == [o["kind"] for o in rec.objects] and got[-1] is None
    assert [g.box for g in got[:-1]] == [tuple(o["box"]) for o in rec.objects]
    # In a window the box moves with it; a shape outside the window is not grounded.
    box = rec.objects[0]["box"]
    window = (box[0] - 5, box[1] - 5, box[2] + 5, box[3] + 5)
    moved = shape_groundings(rec, window, qs[:1])[0]
    assert moved.box == (5, 5, box[2] - box[0] + 5, box[3] - box[1] + 5)
    assert shape_groundings(rec, (0, 0, 1, 1), qs[:1]) == [None]


def test_targets_point_from_the_shape_word_to_image_tokens(base):
    tok, proc, _ = base
    image_token = tok.convert_tokens_to_ids("<|image_pad|>")
    samples = _scene_samples(4)
    encoded = [encode_sample(proc, s) for s in samples]
    for s, e in zip(samples, encoded, strict=True):
        named = [g for g in s.groundings if g is not None]
        assert len(e["grounding"]) == len(named) > 0
        for (query, keys, centre), g in zip(e["grounding"], named, strict=True):
            assert tok.convert_ids_to_tokens(int(e["input_ids"][query])) == "Ġ" + g.word
            assert len(keys) > 0 and np.all(e["input_ids"][keys] == image_token)
            assert centre == box_centre(g.box, s.image.size)
    batch = collate(encoded, int(tok.pad_token_id), image_token)
    targets = split_targets(batch)
    rows, keys, centres = (targets[k] for k in (GROUNDING_ROWS, GROUNDING_KEYS, GROUNDING_CENTRES))
    assert GROUNDING_ROWS not in batch and GROUNDING_KEYS not in batch and GROUNDING_CENTRES not in batch
    assert rows.shape == (sum(len(e["grounding"]) for e in encoded), 2) and keys.shape == (len(rows), batch["input_ids"].shape[1])
    assert centres.shape == (len(rows), 2) and bool(((centres >= 0) & (centres <= 1)).all())
    # A turn count that does not match the groundings is refused, not silently misaligned.
    bad = TrainSample(samples[0].image, "What colour is the star?", "red", 64, groundings=[None, None])
    with pytest.raises(ValueError, match="one per turn"):
        encode_sample(proc, bad)


def test_hooked_head_probabilities_equal_eager_attention(base):
    tok, proc, model = base
    image_token = tok.convert_tokens_to_ids("<|image_pad|>")
    # Two samples of different lengths, so the padding mask matters.
    encoded = [encode_sample(proc, s) for s in _scene_samples(2, seed=3)]
    batch = collate(encoded, int(tok.pad_token_id), image_token)
    rows = split_targets(batch)[GROUNDING_ROWS]
    layers = model.model.language_model.layers
    captured = {}

    def hook(module, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        captured["p"] = head_row_probs(module, args[0] if args else kwargs["hidden_states"], cos, sin, 1,
                                       rows[:, 0], rows[:, 1], batch["attention_mask"])

    model.set_attn_implementation("eager")
    try:
        handle = layers[1].self_attn.register_forward_pre_hook(hook, with_kwargs=True)
        with torch.no_grad():
            out = model(**batch, output_attentions=True)
        handle.remove()
    finally:
        model.set_attn_implementation("sdpa")
    eager = out.attentions[1][rows[:, 0], 1, rows[:, 1]]
    torch.testing.assert_close(captured["p"], eager.float(), rtol=1e-4, atol=1e-6)


def test_grounding_loss_trains_only_its_path_and_moves_attention_onto_the_shape(base):
    from qzoom_ray.train.base import Auxiliary, chat_loss_fn

    tok, proc, model = base
    image_token = tok.convert_tokens_to_ids("<|image_pad|>")
    batch = collate([encode_sample(proc, s) for s in _scene_samples(6, seed=7)], int(tok.pad_token_id), image_token)
    plain = {k: v for k, v in batch.items() if k not in (GROUNDING_ROWS, GROUNDING_KEYS, GROUNDING_CENTRES)}
    grounder = GroundingLoss(model.model.language_model.layers, [(0, 0)])
    off, on = Auxiliary("grounding", grounder, 0.0), Auxiliary("grounding", grounder, 1.0)
    with torch.no_grad():
        lm_only = chat_loss_fn(model, [off])(dict(batch))
        assert torch.allclose(lm_only, model(**plain).loss) and off.losses == []

    # Only the layer-0 q/k projections: what the grounding loss reaches and nothing else does.
    params = dict(model.named_parameters())
    train = [n for n in params if "language_model.layers.0.self_attn." in n and (".q_proj." in n or ".k_proj." in n)]
    before = {n: p.detach().clone() for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in train)
    opt = torch.optim.Adam([params[n] for n in train], lr=3e-3)
    try:
        for _ in range(15):
            total = chat_loss_fn(model, [on])(dict(batch))
            opt.zero_grad()
            (total - model(**plain).loss.detach()).backward()
            opt.step()
    finally:
        for p in params.values():
            p.requires_grad_(True)
    seen = on.losses
    assert len(seen) == 15 and seen[-1] < 0.7 * seen[0], seen
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert changed == set(train)
    for n, p in params.items():  # leave the module-scoped model as it was
        p.data.copy_(before[n])


def test_a_grounding_layer_or_head_that_does_not_exist_is_refused(base):
    layers = base[2].model.language_model.layers
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        GroundingLoss(layers, [(0, 0), (3, 0)])
    with pytest.raises(ValueError, match="head 4 does not exist"):
        GroundingLoss(layers, [(0, 4)])
    with pytest.raises(ValueError, match="at least one"):
        GroundingLoss(layers, [])
    assert Grounding("star", (0, 0, 1, 1)).word == "star"


def test_several_heads_average_their_losses(base):
    tok, proc, model = base
    batch = collate([encode_sample(proc, s) for s in _scene_samples(3, seed=11)], int(tok.pad_token_id),
                    tok.convert_tokens_to_ids("<|image_pad|>"))
    targets = split_targets(batch)
    layers = model.model.language_model.layers
    single = []
    for heads in ([(0, 0)], [(1, 2)], [(0, 0), (1, 2)]):
        grounder = GroundingLoss(layers, heads)
        assert grounder.bind(batch, targets)
        with grounder, torch.no_grad():
            model(**batch)
        single.append(grounder.loss)
    assert torch.isclose(single[2], (single[0] + single[1]) / 2)
    assert not torch.isclose(single[0], single[1])


def test_box_centre_is_a_fraction_of_the_view():
    assert box_centre((0, 0, 100, 50), (200, 100)) == (0.25, 0.25)
    assert box_centre((150, 60, 250, 140), (200, 100)) == (1.0, 1.0)  # clipped where the box leaves the view
    with pytest.raises(ValueError, match="empty view"):
        box_centre((0, 0, 1, 1), (0, 10))


def test_location_readout_trains_the_layers_up_to_its_own_and_is_not_part_of_the_model(base):
    from qzoom_ray.train.base import Auxiliary, chat_loss_fn

    tok, proc, model = base
    image_token = tok.convert_tokens_to_ids("<|image_pad|>")
    batch = collate([encode_sample(proc, s) for s in _scene_samples(6, seed=5)], int(tok.pad_token_id), image_token)
    plain = {k: v for k, v in batch.items() if k not in (GROUNDING_ROWS, GROUNDING_KEYS, GROUNDING_CENTRES)}
    layers = model.model.language_model.layers
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        LocationReadout(layers, 3, model.config.text_config.hidden_size)
    torch.manual_seed(1)
    readout = LocationReadout(layers, 0, model.config.text_config.hidden_size)
    # Its own parameters only: the decoder it hooks stays the model's.
    assert {n for n, _ in readout.named_parameters()} == {"head.weight", "head.bias"}
    aux = [Auxiliary("grounding", GroundingLoss(layers, [(0, 0)]), 0.0), Auxiliary("location", readout, 1.0)]
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    # Layers 1 and 2 come after the read-out: the loss cannot reach them.
    train = [n for n in params if "language_model.layers.0." in n or "language_model.layers.1." in n]
    for n, p in params.items():
        p.requires_grad_(n in train)
    opt = torch.optim.Adam([params[n] for n in train] + list(readout.parameters()), lr=3e-3)
    try:
        for _ in range(20):
            total = chat_loss_fn(model, aux)(dict(batch))
            assert torch.isclose(total.detach(), model(**plain).loss.detach() + readout.loss.detach())
            opt.zero_grad()
            readout.loss.backward()  # the read-out's own gradient: the next-token loss reaches every layer
            opt.step()
    finally:
        for p in params.values():
            p.requires_grad_(True)
    seen = aux[1].losses
    assert aux[0].losses == [] and len(seen) == 20 and seen[-1] < 0.5 * seen[0], seen
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert changed and all("language_model.layers.0." in n for n in changed), changed
    assert not any(k.startswith("head.") for k in model.state_dict())
    for n, p in params.items():  # leave the module-scoped model as it was
        p.data.copy_(before[n])


def test_image_token_xy_runs_row_major_over_the_merged_grid():
    # Row 0: two text tokens, a 2x3 merged grid (grid_thw 1x4x6), one text token; row 1: a 1x2 grid, padded.
    ids = torch.tensor([[5, 5, 9, 9, 9, 9, 9, 9, 5], [5, 9, 9, 5, 0, 0, 0, 0, 0]])
    grid = torch.tensor([[1, 4, 6], [1, 2, 4]])
    rows, pos, xy = image_token_xy(ids, grid, image_token_id=9)
    assert rows.tolist() == [0] * 6 + [1] * 2 and pos.tolist() == [2, 3, 4, 5, 6, 7, 1, 2]
    expected = [[1 / 6, 0.25], [0.5, 0.25], [5 / 6, 0.25], [1 / 6, 0.75], [0.5, 0.75], [5 / 6, 0.75], [0.25, 0.5], [0.75, 0.5]]
    torch.testing.assert_close(xy, torch.tensor(expected))
    with pytest.raises(ValueError, match="one image per row"):
        image_token_xy(ids, torch.tensor([[1, 4, 4], [1, 2, 4]]), image_token_id=9)


def test_token_position_readout_teaches_layer_0_where_each_visual_token_lies(base):
    tok, proc, model = base
    image_token = tok.convert_tokens_to_ids("<|image_pad|>")
    batch = collate([encode_sample(proc, s) for s in _scene_samples(4, seed=9)], int(tok.pad_token_id), image_token)
    layers = model.model.language_model.layers
    torch.manual_seed(2)
    readout = TokenPositionReadout(layers, 0, model.config.text_config.hidden_size, image_token)
    assert not readout.bind({"input_ids": torch.tensor([[1, 2]])})  # no image: nothing to supervise
    assert_readout_teaches_only(model, batch, readout, ("0",), drop=0.5)


def test_value_questions_ground_their_ledger_row_from_the_key_s_last_token(base):
    from qzoom_ray.synth.generator import render_record
    from qzoom_ray.synth.vocab import TEMPLATES
    from qzoom_ray.train.synth_source import document_fields, field_groundings

    rec = render_record(7, split="ordinary", template="doc_value")
    rows = document_fields(rec)
    assert len({name for name, _, _ in rows}) == len(rows) > 0  # a key names one row
    qs = [TEMPLATES["doc_value"].format(field=name) for name, _, _ in rows] + [TEMPLATES["doc_header_colour"]]
    got = field_groundings(rec, (0, 0, rec.width, rec.height), qs)
    assert [(g.word, g.box) for g in got[:-1]] == [(name, box) for name, _, box in rows] and got[-1] is None
    assert field_groundings(rec, (0, 0, 1, 1), qs[:1]) == [None]
    # Keys are several tokens after a quote ("of 'Cash'?"): the query is the key's last token.
    tok, proc, _ = base
    sample = make_sample_fn(templates=("doc_value",), full_budgets=(256,), crop_prob=0.0, tight_prob=0.0,
                            ground_fields=True)(np.random.default_rng(1))
    named = [g for g in sample.groundings if g is not None]
    encoded = encode_sample(proc, sample)
    assert len(encoded["grounding"]) == len(named) > 0
    for (query, keys, _), g in zip(encoded["grounding"], named, strict=True):
        last = tok(g.word, add_special_tokens=False)["input_ids"][-1]
        assert int(encoded["input_ids"][query]) == last and encoded["input_ids"][query + 1] == tok.convert_tokens_to_ids("'?")
        assert len(keys) > 0
