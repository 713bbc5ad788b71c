"""Escalation: unsure answers are answered again at a larger budget; the cost of both stays on the record."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import engine_config, make_image_bytes
from pydantic import ValidationError

from qzoom_ray.config import EngineConfig
from qzoom_ray.model.engine import QZoomEngine
from qzoom_ray.model.state import EngineRecord

PX = 28 * 28


def records(budget: int) -> list[EngineRecord]:
    out = [
        EngineRecord(f"r{i}", make_image_bytes(300 + 90 * i, 260, i), "Which code is on the red square?",
                     min_pixels=4 * PX, max_pixels=budget * PX)
        for i in range(3)
    ]
    out.append(EngineRecord("bad", b"not an image", "Which code?", min_pixels=4 * PX, max_pixels=budget * PX))
    out.append(EngineRecord("other-budget", make_image_bytes(320, 240, 9), "Which code?", min_pixels=4 * PX,
                            max_pixels=24 * PX))
    return out


def test_unsure_answers_are_answered_again_at_the_larger_budget(tiny_model_dir):
    plain = QZoomEngine(engine_config(tiny_model_dir))
    first = plain.generate(records(16))
    larger = plain.generate([dataclasses.replace(r, max_pixels=32 * PX) for r in records(16)])

    esc = QZoomEngine(
        engine_config(tiny_model_dir, escalation={"below_logprob": 0.0, "to_budget": {16: 32}}), loaded=plain.loaded
    )
    got = esc.generate(records(16))
    assert [r.id for r in got] == [r.id for r in records(16)]
    for i in range(3):  # every answer has log-probability < 0, so all three go to Max-32
        g, f, big = got[i], first[i], larger[i]
        assert g.escalated and (g.answer, g.route) == (big.answer, big.route)
        assert g.coarse_visual_tokens == big.coarse_visual_tokens
        assert g.escalated_visual_tokens == f.visual_tokens
        assert g.visual_tokens == f.visual_tokens + big.visual_tokens
    assert got[3].error and not got[3].escalated  # an error is not retried
    assert not got[4].escalated and got[4].answer == first[4].answer  # Max-24 has no escalation entry


def test_a_retry_reuses_the_decoded_image(tiny_model_dir, monkeypatch):
    from qzoom_ray.model import preprocess

    engine = QZoomEngine(engine_config(tiny_model_dir, escalation={"below_logprob": 0.0, "to_budget": {16: 32}}))
    sources = []
    real = preprocess.load_image
    monkeypatch.setattr(preprocess, "load_image", lambda src, **kw: sources.append(type(src).__name__) or real(src, **kw))
    got = engine.generate(records(16)[:3])
    assert all(r.escalated for r in got)
    assert sources.count("bytes") == 3 and len(sources) == 6  # the Max-32 pass gets the decoded images


def test_both_passes_costs_are_summed(tiny_model_dir, monkeypatch):
    from qzoom_ray.model import driver
    from qzoom_ray.model.state import EngineResult

    engine = QZoomEngine(engine_config(tiny_model_dir, escalation={"below_logprob": -0.5, "to_budget": {16: 32}}))
    recs = records(16)[:2]
    first = [
        EngineResult("r0", answer="7", route="direct", coarse_visual_tokens=16, token_logprobs=[-2.0, -0.1],
                     timings={"coarse_s": 0.5, "decode_s": 0.25}),
        EngineResult("r1", answer="8", route="direct", coarse_visual_tokens=16, token_logprobs=[-0.1, -0.1],
                     timings={"coarse_s": 0.5}),
    ]
    again = EngineResult("r0", answer="9", route="zoom", coarse_visual_tokens=32, roi_visual_tokens=30,
                         token_logprobs=[-0.2], timings={"coarse_s": 1.0, "zoom_s": 2.0})
    seen = []
    monkeypatch.setattr(driver, "run_records", lambda eng, rs, logits: seen.extend(rs) or [again])
    out = driver._escalate(engine, recs, first, {}, False)
    assert [r.max_pixels for r in seen] == [32 * PX]  # only r0 is unsure (-2.1 < -0.5)
    assert out[1] is first[1]
    assert out[0].answer == "9" and out[0].escalated and out[0].route == "zoom"
    assert out[0].timings == {"coarse_s": 1.5, "decode_s": 0.25, "zoom_s": 2.0}
    assert out[0].visual_tokens == 16 + 32 + 30


def test_sure_answers_are_kept(tiny_model_dir):
    plain = QZoomEngine(engine_config(tiny_model_dir))
    esc = QZoomEngine(
        engine_config(tiny_model_dir, escalation={"below_logprob": -1e9, "to_budget": {16: 32}}), loaded=plain.loaded
    )
    a, b = plain.generate(records(16)), esc.generate(records(16))
    assert [(r.answer, r.escalated, r.visual_tokens) for r in a] == [(r.answer, r.escalated, r.visual_tokens) for r in b]


def test_escalation_config_is_checked():
    with pytest.raises(ValidationError, match="larger budget"):
        EngineConfig.model_validate({"escalation": {"below_logprob": -0.5, "to_budget": {256: 128}}})
    with pytest.raises(ValidationError, match="<= 0"):
        EngineConfig.model_validate({"escalation": {"below_logprob": 0.5, "to_budget": {128: 256}}})
    with pytest.raises(ValidationError, match="<= 0"):
        EngineConfig.model_validate({"escalation": {"below_logprob": {128: 0.5}, "to_budget": {128: 256}}})
    with pytest.raises(ValidationError, match="one threshold per step"):
        EngineConfig.model_validate({"escalation": {"below_logprob": {128: -0.3}, "to_budget": {128: 256, 256: 576}}})
    esc = EngineConfig.model_validate(
        {"escalation": {"below_logprob": {128: -0.3, 256: -0.5}, "to_budget": {128: 256, 256: 576}}}
    ).escalation
    assert (esc.step(128), esc.step(256), esc.step(576)) == ((256, -0.3), (576, -0.5), None)


def test_each_step_of_a_chain_has_its_own_threshold(tiny_model_dir, monkeypatch):
    """16 -> 32 escalates everything (threshold 0), 32 -> 64 nothing (threshold -1e9)."""
    from qzoom_ray.model import driver

    esc = {"below_logprob": {16: 0.0, 32: -1e9}, "to_budget": {16: 32, 32: 64}}
    engine = QZoomEngine(engine_config(tiny_model_dir, escalation=esc))
    budgets = []
    real = driver._run_once
    monkeypatch.setattr(driver, "_run_once", lambda eng, rs, logits=False: budgets.append(
        sorted({r.max_pixels // PX for r in rs})) or real(eng, rs, logits))
    got = engine.generate(records(16)[:3])
    assert budgets == [[16], [32]] and all(r.escalated for r in got)
