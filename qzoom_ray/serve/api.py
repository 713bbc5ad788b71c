"""OpenAI chat-completions request/response models, OpenAI-shaped errors, and message -> question + image.

Only the subset Q-Zoom can honour is accepted: one image and one question per request, greedy decoding,
no streaming. Unknown top-level fields (``user``, ``seed``, ...) are ignored, as OpenAI-compatible
servers usually do; anything we would silently answer wrongly (``n > 1``, ``stream``) is a 400.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from qzoom_ray.model.state import EngineResult
from qzoom_ray.serve.config import LimitsConfig


class ApiError(Exception):
    """An error the client should see, rendered as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(err.message, err.type, err.code, err.param), status_code=err.status, headers=err.headers
    )


# ---------------------------------------------------------------------------------------- request
class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class QZoomOptions(BaseModel):
    """Per-request overrides, sent by the openai client as ``extra_body={"qzoom": {...}}``."""

    model_config = ConfigDict(extra="forbid")
    gate_thresh: float | None = Field(None, ge=0.0, description=">1 never zooms, 0 always zooms.")
    roi_thresh: float | None = Field(None, ge=0.0)


class ChatCompletionRequest(_Lenient):
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool | None = False
    n: int | None = 1
    temperature: float | None = None  # accepted and ignored: decoding is greedy
    top_p: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    qzoom: QZoomOptions | None = None


# ---------------------------------------------------------------------------------------- response
class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class QZoomInfo(BaseModel):
    """The Q-Zoom extension: what the gate decided and where the model looked."""

    route: str
    zoomed: bool
    gate_score: float | None
    roi_box_px: tuple[int, int, int, int] | None = Field(
        None, description="(x0, y0, x1, y1) in source pixels."
    )
    roi_box_norm: tuple[float, float, float, float] | None = Field(
        None, description="The box divided by size."
    )
    image_width: int | None
    image_height: int | None
    coarse_visual_tokens: int
    roi_visual_tokens: int
    output_tokens: int
    answer_logprob: float | None = Field(
        None, description="Log-probability of the whole answer (sum over its tokens): a confidence to triage by."
    )
    escalated: bool = Field(
        False, description="The answer comes from a re-run at a larger budget (the first answer was unsure)."
    )
    escalated_visual_tokens: int = Field(0, description="Visual tokens the discarded earlier answers spent.")
    timings: dict[str, float]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    qzoom: QZoomInfo


def completion_from_result(
    result: EngineResult, model: str, prompt_tokens: int, max_new_tokens: int
) -> ChatCompletion:
    finish = "length" if result.output_tokens >= max_new_tokens else "stop"
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        choices=[Choice(message=ResponseMessage(content=result.answer or ""), finish_reason=finish)],
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=result.output_tokens,
            total_tokens=prompt_tokens + result.output_tokens,
        ),
        qzoom=QZoomInfo(
            route=result.route,
            zoomed=result.zoomed,
            gate_score=result.gate_score,
            roi_box_px=result.roi_box_px,
            roi_box_norm=result.roi_box_norm,
            image_width=result.image_width,
            image_height=result.image_height,
            coarse_visual_tokens=result.coarse_visual_tokens,
            roi_visual_tokens=result.roi_visual_tokens,
            output_tokens=result.output_tokens,
            answer_logprob=result.answer_logprob,
            escalated=result.escalated,
            escalated_visual_tokens=result.escalated_visual_tokens,
            timings={k: round(v, 6) for k, v in result.timings.items()},
        ),
    )


# ---------------------------------------------------------------------------------------- parsing
def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def question_and_image(req: ChatCompletionRequest, limits: LimitsConfig) -> tuple[str, str]:
    """The question (text of the last user message) and the one image_url of the conversation.

    Q-Zoom answers one question about one image; earlier turns carry no state we could use, so the
    last user message is the question, and exactly one image may appear in the user messages.
    """
    if not req.messages:
        raise _bad("'messages' must contain at least one message", "messages", "empty_messages")
    if len(req.messages) > limits.max_messages:
        raise _bad(f"too many messages ({len(req.messages)} > {limits.max_messages})", "messages")
    user_idx = [i for i, m in enumerate(req.messages) if m.role == "user"]
    if not user_idx:
        raise _bad("'messages' must contain a user message", "messages")
    images: list[str] = []
    for i in user_idx:
        content = req.messages[i].content
        if isinstance(content, list):
            images += [p.image_url.url for p in content if isinstance(p, ImagePart)]
    if len(images) != 1:
        raise _bad(
            f"exactly one image_url content part is required in the user messages, got {len(images)}",
            "messages",
            "image_count",
        )
    last = req.messages[user_idx[-1]].content
    if isinstance(last, str):
        question = last
    else:
        question = "\n".join(p.text for p in last or [] if isinstance(p, TextPart))
    question = question.strip()
    if not question:
        raise _bad("the last user message has no text question", f"messages[{user_idx[-1]}].content")
    if len(question) > limits.max_question_chars:
        raise _bad(
            f"question too long ({len(question)} > {limits.max_question_chars} characters)",
            f"messages[{user_idx[-1]}].content",
            "question_too_long",
        )
    return question, images[0]


def requested_max_tokens(req: ChatCompletionRequest, limits: LimitsConfig) -> int | None:
    value = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if value is not None and value > limits.max_tokens:
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        raise _bad(f"{param} is {value}, above this server's limit of {limits.max_tokens}", param)
    return value


def check_unsupported(req: ChatCompletionRequest, model_name: str) -> None:
    if req.model != model_name:
        raise ApiError(
            404,
            f"The model '{req.model}' does not exist; this server serves '{model_name}'",
            param="model",
            code="model_not_found",
        )
    if req.stream:
        raise _bad("stream=true is not supported by this server", "stream")
    if req.n not in (None, 1):
        raise _bad("only n=1 is supported (decoding is greedy)", "n")
    if req.logprobs or req.top_logprobs:
        raise _bad(
            "per-token logprobs are not supported; the response's qzoom.answer_logprob is the answer's "
            "log-probability",
            "top_logprobs" if req.top_logprobs and not req.logprobs else "logprobs",
        )
