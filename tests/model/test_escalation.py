"""Escalation: unsure answers are answered again at a larger budget; the cost of both stays on the record."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import engine_config, make_image_bytes
from PIL import Image
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
    out = driver.escalate_results(engine, recs, first, {}, False)
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


ZOOM_ALL = {"gate_thresh": 0.0, "roi_thresh": 0.0}  # every record zooms, on the whole-map box


def test_unsure_zoomed_answers_are_reread_on_their_crop_first(tiny_model_dir):
    """The re-read is the crop asked alone at the same budget, never zoomed; it stands where it is sure enough."""
    from qzoom_ray.images import crop_image, load_image

    plain = QZoomEngine(engine_config(tiny_model_dir, zoom=ZOOM_ALL))
    recs = records(16)[:3]
    first = plain.generate(recs)
    assert all(r.route == "zoom" and r.roi_box_px for r in first)
    crops = [dataclasses.replace(rec, image=crop_image(load_image(rec.image), res.roi_box_px), gate_thresh=2.0)
             for rec, res in zip(recs, first, strict=True)]
    alone = plain.generate(crops)
    assert all(r.route == "direct" for r in alone)

    # Every first answer is unsure (threshold 0); every re-read stands (threshold -1e9): no Max-32 pass.
    esc = {"below_logprob": 0.0, "to_budget": {16: 32}, "reread_crop_below": -1e9}
    got = QZoomEngine(engine_config(tiny_model_dir, zoom=ZOOM_ALL, escalation=esc), loaded=plain.loaded).generate(recs)
    for g, f, a in zip(got, first, alone, strict=True):
        assert g.route == "crop_reread" and g.escalated and g.answer == a.answer
        assert g.token_ids == a.token_ids and g.roi_box_px == f.roi_box_px and g.gate_score == f.gate_score
        assert g.visual_tokens == f.visual_tokens + a.visual_tokens
        assert g.coarse_visual_tokens == f.coarse_visual_tokens


def test_the_reread_floor_reads_a_small_crop_below_source_resolution(tiny_model_dir):
    """ZoomConfig.reread_min_downscale: the re-read is the crop asked alone at the floored budget."""
    from qzoom_ray.box_cap import crop_max_pixels
    from qzoom_ray.images import crop_image, load_image

    plain = QZoomEngine(engine_config(tiny_model_dir, zoom=ZOOM_ALL))
    recs = records(64)[:2]
    first = plain.generate(recs)
    floors = [crop_max_pixels(res.roi_box_px, 4 * PX, 64 * PX, 2.0) for res in first]
    assert all(f < 64 * PX for f in floors)  # these crops are small: the floor lowers their budget
    alone = plain.generate([
        dataclasses.replace(rec, image=crop_image(load_image(rec.image), res.roi_box_px), gate_thresh=2.0,
                            max_pixels=f) for rec, res, f in zip(recs, first, floors, strict=True)])
    esc = {"below_logprob": 0.0, "to_budget": {64: 128}, "reread_crop_below": -1e9}
    zoom = {**ZOOM_ALL, "reread_min_downscale": 2.0}
    got = QZoomEngine(engine_config(tiny_model_dir, zoom=zoom, escalation=esc), loaded=plain.loaded).generate(recs)
    for g, f, a in zip(got, first, alone, strict=True):
        assert g.route == "crop_reread" and (g.answer, g.token_ids) == (a.answer, a.token_ids)
        assert g.visual_tokens == f.visual_tokens + a.visual_tokens
        assert a.coarse_visual_tokens * PX <= crop_max_pixels(f.roi_box_px, 4 * PX, 64 * PX, 2.0)


def test_an_unsure_reread_goes_on_to_the_larger_budget(tiny_model_dir, monkeypatch):
    from qzoom_ray.model import driver

    esc = {"below_logprob": 0.0, "to_budget": {16: 32}, "reread_crop_below": 0.0}
    engine = QZoomEngine(engine_config(tiny_model_dir, zoom=ZOOM_ALL, escalation=esc))
    recs = records(16)[:2]
    larger = QZoomEngine(engine_config(tiny_model_dir, zoom=ZOOM_ALL), loaded=engine.loaded).generate(
        [dataclasses.replace(r, max_pixels=32 * PX) for r in recs])
    passes = []
    real = driver._run_once
    monkeypatch.setattr(driver, "_run_once", lambda eng, rs, logits=False: passes.append(
        [(r.max_pixels // PX, r.gate_thresh, type(r.image).__name__) for r in rs]) or real(eng, rs, logits))
    got = engine.generate(recs)
    # Max-16; the crops (Max-16, no gate, decoded crops); Max-32 on the records themselves. Max-32 is the chain's
    # end, so its answers are neither re-read nor escalated.
    assert [[p[:2] for p in ps] for ps in passes] == [[(16, None)] * 2, [(16, 2.0)] * 2, [(32, None)] * 2]
    assert [p[2] for p in passes[1]] == ["Image", "Image"]
    for g, big in zip(got, larger, strict=True):
        assert g.escalated and g.route == "zoom" and (g.answer, g.token_ids) == (big.answer, big.token_ids)
        assert g.coarse_visual_tokens == big.coarse_visual_tokens


def test_reread_keeps_the_first_answer_when_the_crop_fails(tiny_model_dir, monkeypatch):
    from qzoom_ray.model import driver
    from qzoom_ray.model.state import EngineResult

    engine = QZoomEngine(engine_config(tiny_model_dir, escalation={"below_logprob": -0.5, "to_budget": {16: 32},
                                                                    "reread_crop_below": -0.5}))
    first = EngineResult("r0", answer="7", route="zoom", roi_box_px=(0, 0, 10, 10), token_logprobs=[-2.0])
    failed = EngineResult("r0", error="internal error: boom")
    assert driver.merge_reread(first, failed) is first
    direct = dataclasses.replace(first, route="direct")
    rec = records(16)[0]
    assert driver.wants_reread(engine, rec, first)
    assert not driver.wants_reread(engine, rec, direct)  # only zoom-route answers are re-read
    assert not driver.wants_reread(engine, rec, dataclasses.replace(first, token_logprobs=[-0.1]))  # sure
    # A re-read is judged by its own threshold; a first answer by the step's.
    assert driver.escalated_record(engine, rec, None, -0.4, reread=True) is None
    assert driver.escalated_record(engine, rec, None, -0.6, reread=True).max_pixels == 32 * PX
    monkeypatch.setattr(driver, "_run_once", lambda *a, **k: ([failed], {}))
    assert driver._reread_crops(engine, [rec], [first], {0: Image.new("RGB", (20, 20))}, False) == [first]
