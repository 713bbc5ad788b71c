"""Hook-based attention capture equals eager attention's probabilities; head ranking and the labeller."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qzoom_ray.config import ModelConfig
from qzoom_ray.model.loader import load_model
from qzoom_ray.train.attention import AttentionCapture
from qzoom_ray.train.forward import build_batch, encode, image_columns


def _image(seed: int, w: int, h: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def eager_model(tiny_model_dir):
    return load_model(ModelConfig(path=tiny_model_dir, attn_implementation="eager"))


def test_hooked_rows_equal_eager_attention(eager_model):
    loaded = eager_model
    proc, a = loaded.processor, loaded.adapter
    tok = proc.tokenizer
    # Two rows of different lengths: the shorter one is left-padded, so the padding mask matters.
    enc = [encode(proc, _image(0, 150, 90), "What is the code?", 16, answer="ab 12"),
           encode(proc, _image(1, 90, 90), "Colour?", 9, answer="red")]
    batch = build_batch(a, enc, int(tok.pad_token_id), int(tok.convert_tokens_to_ids("<|image_pad|>")))
    heads = {1: [0, 3], 4: None}
    rows = [torch.arange(batch.pads[b] + e.prompt_len, batch.pads[b] + len(e.input_ids)) for b, e in enumerate(enc)]
    keys = [torch.arange(image_columns(batch, enc, b).start, image_columns(batch, enc, b).stop) for b in range(2)]
    grid = torch.tensor([e.grid_thw for e in enc])
    pixels = torch.from_numpy(np.concatenate([e.pixel_values for e in enc]))
    with AttentionCapture(a.layers, heads) as cap, torch.no_grad():
        cap.set_targets(rows, keys, batch.attention_mask)
        out = a.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels,
                      image_grid_thw=grid, mm_token_type_ids=(batch.input_ids == a.image_token_id).int(),
                      output_attentions=True)
    assert set(cap.results) == {1, 4}
    for layer, hs in heads.items():
        sel = list(range(a.text_config.num_attention_heads)) if hs is None else hs
        for b in range(2):
            eager = out.attentions[layer][b][sel][:, rows[b]][:, :, keys[b]].float()
            got = cap.results[layer][b]
            assert got.shape == eager.shape
            torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-6)
            assert got.sum() > 0


def test_rank_heads_and_labeller_rows(eager_model):
    from qzoom_ray.train.pseudo import (
        AttentionReader,
        PseudoLabelConfig,
        PseudoLabeler,
        _to_png,
        rank_heads,
        top_heads,
    )

    rows = [{"id": f"r{i}", "image": _to_png(_image(i, 112, 84)), "question": "What is the code?", "answer": "ab",
             "evidence_box": [0, 0, 56, 42]} for i in range(3)]
    reader = AttentionReader(None, 12, False, loaded=eager_model)
    ranked = rank_heads(reader, rows, batch_size=2)
    n_heads = eager_model.adapter.text_config.num_attention_heads * len(eager_model.adapter.layers)
    assert len(ranked) == n_heads and all(0 <= d["mass"] <= 1 and d["n"] == 3 for d in ranked)
    assert [(-d["peak_hit"], -d["mass"]) for d in ranked] == sorted((-d["peak_hit"], -d["mass"]) for d in ranked)
    best = top_heads(ranked, 2)
    assert sum(len(v) for v in best.values()) == 2

    cfg = PseudoLabelConfig(model=ModelConfig(path="unused"), budget_tokens=12, grounding_heads=best,
                            sink_heads={0: [1]}, answer_source="model", max_new_tokens=3, max_area_ratio=1.1,
                            pad_to_square=True)
    out = PseudoLabeler(cfg, loaded=eager_model)(rows)
    assert len(out) == 3
    for r in out:
        assert len(r["labels"]) == r["grid_h"] * r["grid_w"] == len(r["attn_map"])
        assert r["grid_h"] == r["grid_w"]  # square-padded view
        assert set(r["labels"]) <= {1, 0, -100} and r["answer"]


def test_reading_with_the_last_prompt_row_adds_the_row_that_produced_the_answer(eager_model):
    from qzoom_ray.train.pseudo import AttentionReader

    loaded = eager_model
    a, tok = loaded.adapter, loaded.processor.tokenizer
    image, question, answer = _image(5, 112, 84), "What is the code?", "ab"
    heads = {1: None}
    answer_only = AttentionReader(None, 12, False, loaded=loaded)
    with_producer = AttentionReader(None, 12, False, loaded=loaded, query_rows="with_last_prompt")
    (enc,), (maps_a,) = answer_only.read([image], [question], [answer], heads)
    _, (maps_p,) = with_producer.read([image], [question], [answer], heads)

    # Reference: eager attention of the last prompt row and of the answer rows, averaged.
    batch = build_batch(a, [enc], int(tok.pad_token_id), int(tok.convert_tokens_to_ids("<|image_pad|>")))
    with torch.no_grad():
        out = a.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      pixel_values=torch.from_numpy(enc.pixel_values), image_grid_thw=torch.tensor([enc.grid_thw]),
                      mm_token_type_ids=(batch.input_ids == a.image_token_id).int(), output_attentions=True)
    cols = image_columns(batch, [enc], 0)
    start = batch.pads[0] + enc.prompt_len
    att = out.attentions[1][0][:, :, cols.start : cols.stop].float()  # (heads, query, image)
    for h in range(a.text_config.num_attention_heads):
        ref_a = att[h, start : start + len(enc.input_ids) - enc.prompt_len].mean(0).reshape(enc.merged_grid)
        ref_p = att[h, start - 1 : start + len(enc.input_ids) - enc.prompt_len].mean(0).reshape(enc.merged_grid)
        torch.testing.assert_close(maps_a[(1, h)], ref_a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(maps_p[(1, h)], ref_p, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(maps_a[(1, 0)], maps_p[(1, 0)])


def test_tile_fallback_labels_a_large_image_from_the_tile_answered_right(eager_model):
    from qzoom_ray.train.labels import spread_tile_map
    from qzoom_ray.train.pseudo import PseudoLabelConfig, PseudoLabeler, _to_png

    page = _image(7, 224, 168)
    page.paste((255, 0, 0), (150, 100, 180, 130))  # the 'evidence': only tiles holding all of it answer right
    rows = [{"id": "big", "image": _to_png(page), "question": "Which colour?", "answer": "red"},
            {"id": "small", "image": _to_png(_image(8, 112, 84)), "question": "Which colour?", "answer": "red"}]
    cfg = PseudoLabelConfig(model=ModelConfig(path="unused"), budget_tokens=12, grounding_heads={1: None},
                            answer_source="model", max_new_tokens=3, max_area_ratio=1.1,
                            tile_fallback={"min_image_pixels": 20_000, "max_tile_pixels": 12_000, "overlap": 0.2})
    labeler = PseudoLabeler(cfg, loaded=eager_model)
    asked: list[tuple[int, int]] = []

    def answer(images, questions, max_new_tokens):  # a stand-in base model that reads only small images
        asked.extend(im.size for im in images)
        red = [(np.asarray(im) == (255, 0, 0)).all(-1).sum() == 900 for im in images]
        return ["red" if r and im.width * im.height <= 12_000 else "blue" for r, im in zip(red, images, strict=True)]

    labeler.reader.answer = answer
    big, small = labeler(rows)

    assert asked[:2] == [(224, 168), (112, 84)] and len(asked) > 2  # only the large, wrongly answered page is tiled
    assert all(w * h <= 12_000 for w, h in asked[2:])
    x0, y0, x1, y1 = big["read_box"]
    assert big["answer"] == "red" and x0 <= 150 and y0 <= 100 and x1 >= 180 and y1 >= 130
    assert (x1 - x0) * (y1 - y0) <= 12_000
    # The map is the tile's attention, read again on the tile and placed on the page's grid.
    grid = (big["grid_h"], big["grid_w"])
    (enc,), (maps,) = labeler.reader.read([page.crop((x0, y0, x1, y1))], ["Which colour?"], ["red"], {1: None})
    tile_attn = torch.stack([m for m in maps.values()]).mean(0).numpy()
    expected = spread_tile_map(tile_attn, (x0, y0, x1, y1), page.size, grid)
    np.testing.assert_allclose(np.reshape(big["attn_map"], grid), expected, rtol=1e-4, atol=1e-7)
    assert small["answer"] == "blue" and small["read_box"] == [0, 0, 112, 84]  # too small to tile: left as it was


def test_tile_fallback_needs_model_answers_on_the_unpadded_grid():
    from pydantic import ValidationError

    from qzoom_ray.train.pseudo import PseudoLabelConfig

    base = {"grounding_heads": {1: None}, "tile_fallback": {}}
    for bad in ({"pad_to_square": True}, {"answer_source": "ground_truth"}):
        with pytest.raises(ValidationError, match="tile_fallback needs"):
            PseudoLabelConfig.model_validate({**base, **bad})
    assert PseudoLabelConfig.model_validate(base).tile_fallback.max_tile_pixels == 1_500_000
