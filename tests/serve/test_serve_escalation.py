"""Escalation at the endpoint: the ingress answers an unsure request again at the larger budget."""

from __future__ import annotations

import asyncio
import dataclasses

from conftest import engine_config, make_image_bytes

from qzoom_ray.config import EscalationConfig
from qzoom_ray.model.state import EngineRecord, EngineResult
from qzoom_ray.serve import handoff
from qzoom_ray.serve.api import completion_from_result
from qzoom_ray.serve.config import LiveConfig
from qzoom_ray.serve.handoff import DONE, FAILED, CoarseJob, Outcome

PX = 28 * 28
ESC = EscalationConfig(below_logprob={16: -0.5, 32: -1.0}, to_budget={16: 32, 32: 64})


def done(answer: str, logprob: float, tokens: int, escalate_to: int | None, below: float | None = -0.5) -> Outcome:
    res = EngineResult("j", answer=answer, route="direct", coarse_visual_tokens=tokens,
                       token_logprobs=[logprob], timings={"coarse_s": 1.0})
    return Outcome(DONE, result=res, prompt_tokens=tokens + 10, max_new_tokens=8, escalate_max_pixels=escalate_to,
                   escalate_below=None if escalate_to is None else below)


def run(job: CoarseJob, outcomes: list[Outcome]) -> tuple[Outcome, list[CoarseJob]]:
    seen: list[CoarseJob] = []

    async def answer_once(j: CoarseJob) -> Outcome:
        seen.append(j)
        out = outcomes[len(seen) - 1]
        if isinstance(out, Exception):
            raise out
        return out

    return asyncio.run(handoff.answer_with_escalation(job, answer_once)), seen


def test_unsure_answer_is_answered_again_and_carries_both_costs():
    job = CoarseJob("j", b"img", "q?")
    out, seen = run(job, [done("7", -2.0, 16, 32 * PX), done("9", -0.1, 32, 64 * PX)])
    assert [j.max_pixels for j in seen] == [None, 32 * PX]
    assert out.result.answer == "9" and out.result.escalated
    assert out.result.escalated_visual_tokens == 16 and out.result.visual_tokens == 48
    assert out.result.timings == {"coarse_s": 2.0} and out.prompt_tokens == 26 + 42


def test_chains_follow_and_stop_where_no_budget_is_configured():
    job = CoarseJob("j", b"img", "q?")
    out, seen = run(job, [done("7", -2.0, 16, 32 * PX), done("8", -2.0, 32, 64 * PX, -1.0), done("9", -3.0, 64, None)])
    assert [j.max_pixels for j in seen] == [None, 32 * PX, 64 * PX]
    assert out.result.answer == "9" and out.result.escalated_visual_tokens == 16 + 32
    # Each step has its own threshold: -0.8 is unsure at the first step, sure enough at the second.
    out, seen = run(job, [done("7", -0.8, 16, 32 * PX), done("8", -0.8, 32, 64 * PX, -1.0)])
    assert len(seen) == 2 and out.result.answer == "8"


def test_sure_answers_failed_retries_and_no_config_keep_the_first_answer():
    job = CoarseJob("j", b"img", "q?")
    out, seen = run(job, [done("7", -0.1, 16, 32 * PX)])
    assert len(seen) == 1 and not out.result.escalated
    out, seen = run(job, [done("7", -2.0, 16, 32 * PX), Outcome(FAILED, result=EngineResult("j", error="boom"))])
    assert len(seen) == 2 and out.result.answer == "7" and not out.result.escalated
    out, seen = run(job, [done("7", -2.0, 16, 32 * PX), RuntimeError("zoom deployment at capacity")])
    assert len(seen) == 2 and out.result.answer == "7" and not out.result.escalated
    out, seen = run(job, [done("7", -2.0, 16, None)])  # no escalation configured for this budget
    assert len(seen) == 1 and out.result.answer == "7"


def test_retry_budget_reaches_the_engine_record(tiny_model_dir):
    from qzoom_ray.model.engine import QZoomEngine

    live = LiveConfig(max_pixels=16 * PX)
    assert handoff.engine_record(CoarseJob("j", b"x", "q"), live).max_pixels == 16 * PX
    assert handoff.engine_record(CoarseJob("j", b"x", "q", max_pixels=32 * PX), live).max_pixels == 32 * PX
    engine = QZoomEngine(engine_config(tiny_model_dir, escalation=ESC.model_dump()))
    at = lambda n: EngineRecord("j", b"x", "q", max_pixels=n * PX)  # noqa: E731
    assert handoff.escalation_step(engine, at(16)) == (32 * PX, -0.5, None)
    assert handoff.escalation_step(engine, at(32)) == (64 * PX, -1.0, None)
    reread = QZoomEngine(engine_config(tiny_model_dir, escalation={**ESC.model_dump(), "reread_crop_below": -0.7}),
                         loaded=engine.loaded)
    assert handoff.escalation_step(reread, at(16)) == (32 * PX, -0.5, -0.7)
    assert handoff.escalation_step(engine, at(24)) is None


def test_response_says_the_answer_was_escalated():
    res = EngineResult("j", answer="9", route="zoom", coarse_visual_tokens=32, token_logprobs=[-0.1],
                       escalated=True, escalated_visual_tokens=16)
    info = completion_from_result(res, "qzoom", 40, 8).qzoom
    assert info.escalated and info.escalated_visual_tokens == 16


def test_endpoint_answers_unsure_requests_again(tiny_model_dir):
    """The real app: threshold 0 makes every answer unsure, so each request goes through the model
    deployments twice (Max-256, then Max-512) and says so."""
    from serve_helpers import post, running_app, serve_args_for

    from qzoom_ray.serve.bench import chat_body

    args = serve_args_for(tiny_model_dir)
    args = args.model_copy(update={"engine": args.engine.model_copy(
        update={"escalation": EscalationConfig(below_logprob=0.0, to_budget={256: 512})})})
    png = make_image_bytes(320, 240, 3)
    with running_app(args) as url:
        for gate, route in ((2.0, "direct"), (0.0, "zoom")):
            resp = post(url, chat_body(png, "What is the total?", max_tokens=4, gate_thresh=gate))
            assert resp.status_code == 200, resp.text
            q = resp.json()["qzoom"]
            assert q["escalated"] and q["route"] == route
            # The first answer's tokens: its global view, and its crop when zoomed.
            assert q["escalated_visual_tokens"] >= q["coarse_visual_tokens"] > 0
            assert q["timings"]["coarse_s"] > 0


def zoomed(answer: str, logprob: float, escalate_to: int | None = 32 * PX) -> Outcome:
    res = EngineResult("j", answer=answer, route="zoom", zoomed=True, roi_box_px=(10, 20, 110, 60),
                       coarse_visual_tokens=16, roi_visual_tokens=12, token_logprobs=[logprob], timings={"zoom_s": 1.0})
    return Outcome(DONE, result=res, prompt_tokens=40, max_new_tokens=8, escalate_max_pixels=escalate_to,
                   escalate_below=-0.5, reread_below=-0.7)


def test_an_unsure_zoomed_answer_is_reread_on_its_crop_first():
    import io

    from PIL import Image

    job = CoarseJob("j", make_image_bytes(300, 200, 1), "q?")
    # The re-read (-0.3) is sure enough: it stands, and the larger budget is never asked.
    out, seen = run(job, [zoomed("7", -2.0), done("9", -0.3, 8, 32 * PX)])
    assert len(seen) == 2 and seen[1].gate_thresh == 2.0 and seen[1].max_pixels is None
    assert Image.open(io.BytesIO(seen[1].image)).size == (100, 40)  # the RoI box alone
    assert out.result.answer == "9" and out.result.route == "crop_reread" and out.result.escalated
    assert out.result.roi_box_px == (10, 20, 110, 60) and out.result.visual_tokens == 16 + 12 + 8
    assert out.prompt_tokens == 40 + 18
    # An unsure re-read (-1.0 < -0.7) goes on to Max-32, from the whole image; every answer's cost is kept.
    out, seen = run(job, [zoomed("7", -2.0), done("9", -1.0, 8, 32 * PX), done("5", -0.1, 32, None)])
    assert [j.max_pixels for j in seen] == [None, None, 32 * PX] and seen[2].image == job.image
    assert seen[2].gate_thresh is None
    assert out.result.answer == "5" and out.result.visual_tokens == 16 + 12 + 8 + 32
    # A failed re-read escalates as if there were none; a sure zoomed answer is not re-read.
    out, seen = run(job, [zoomed("7", -2.0), RuntimeError("at capacity"), done("5", -0.1, 32, None)])
    assert len(seen) == 3 and out.result.answer == "5"
    out, seen = run(job, [zoomed("7", -0.1)])
    assert len(seen) == 1 and out.result.route == "zoom"
    # The coarse replica's re-read budget (ZoomConfig.reread_min_downscale) is the crop job's.
    floored = dataclasses.replace(zoomed("7", -2.0), reread_max_pixels=5 * PX)
    out, seen = run(job, [floored, done("9", -0.3, 5, 32 * PX)])
    assert seen[1].max_pixels == 5 * PX and out.result.answer == "9"


def test_the_coarse_replica_gives_the_reread_budget(tiny_model_dir):
    from qzoom_ray.model.driver import reread_max_pixels
    from qzoom_ray.model.engine import QZoomEngine

    engine = QZoomEngine(engine_config(tiny_model_dir, zoom={"reread_min_downscale": 2.0}))
    record = EngineRecord("r", make_image_bytes(320, 240, 0), "q?", min_pixels=4 * PX, max_pixels=64 * PX)
    # A 140 x 112 box at floor 2: 3920 pixels (5 tokens), under the record's 64-token budget.
    assert reread_max_pixels(engine, record, (0, 0, 140, 112)) == 140 * 112 // 4
    assert reread_max_pixels(engine, record, (0, 0, 320, 240)) == 320 * 240 // 4
    assert reread_max_pixels(engine, record, (0, 0, 20, 20)) == 4 * PX  # never below the lower budget
