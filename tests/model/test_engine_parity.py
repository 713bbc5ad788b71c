"""The engine's own loop against stock transformers on the same tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_MAX_PIXELS, TEST_MIN_PIXELS, engine_config, make_image_bytes

from qzoom_ray.images import load_image
from qzoom_ray.model.engine import QZoomEngine
from qzoom_ray.model.processor import build_prompt, image_size_kwargs
from qzoom_ray.model.state import ROUTE_DIRECT, EngineRecord


def stock_generate(engine: QZoomEngine, records: list[EngineRecord], max_new_tokens: int, penalty: float):
    proc = engine.processor
    images = [load_image(r.image) for r in records]
    prompts = [build_prompt(proc, r.question) for r in records]
    inputs = proc(
        text=prompts,
        images=images,
        padding=True,
        return_tensors="pt",
        **image_size_kwargs(TEST_MIN_PIXELS, TEST_MAX_PIXELS),
    )
    model = engine.adapter.model
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        repetition_penalty=penalty,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=engine.pad_id,
        eos_token_id=sorted(engine.eos_ids),
    )
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    return new, out.logits[0]


def trim(ids: list[int], eos: set[int], pad: int) -> list[int]:
    kept = []
    for t in ids:
        if t == pad and not kept:
            continue
        kept.append(t)
        if t in eos:
            break
    return kept


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_gate_off_equals_stock_generate(tiny_model_dir, penalty):
    engine = QZoomEngine(
        engine_config(tiny_model_dir, zoom={"gate_thresh": 2.0}, generation={"repetition_penalty": penalty})
    )
    # Different sizes and question lengths -> left padding inside the batch.
    records = [
        EngineRecord("a", make_image_bytes(300, 200, 0), "What is the total?"),
        EngineRecord("b", make_image_bytes(448, 336, 1), "Which code is on the red triangle of the form?"),
        EngineRecord("c", make_image_bytes(224, 224, 2), "Colour?"),
    ]
    ours = engine.generate(records, return_logits=True)
    assert all(r.route == ROUTE_DIRECT for r in ours)
    # Stock HF penalises prompt pad tokens too; with penalty the comparison runs unpadded (batch 1).
    groups = [records] if penalty == 1.0 else [[r] for r in records]
    for group in groups:
        tokens, first_logits = stock_generate(engine, group, 6, penalty)
        for row, rec in enumerate(group):
            mine = next(r for r in ours if r.id == rec.id)
            torch.testing.assert_close(mine.first_logits, first_logits[row].float(), atol=1e-4, rtol=1e-4)
            assert mine.token_ids == trim(tokens[row].tolist(), engine.eos_ids, engine.pad_id)
            assert mine.answer == engine.processor.tokenizer.decode(mine.token_ids, skip_special_tokens=True).strip()
