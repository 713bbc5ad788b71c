"""ASGI middleware: bearer-token auth and a request-body cap, both before the route reads the body.

FastAPI dependencies run only after the whole body has been read, which is too late for a body cap
and wasteful for an unauthenticated caller. This middleware sits in front: it refuses a missing or
wrong token from the headers alone, refuses a declared ``Content-Length`` over the cap at once, and
counts the bytes of a streamed (chunked) body as they arrive, stopping at the cap.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from starlette.exceptions import HTTPException

from qzoom_ray.serve.api import error_body
from qzoom_ray.serve.config import AuthConfig

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def load_tokens(auth: AuthConfig) -> tuple[bytes, ...]:
    """Accepted tokens from the environment; refuses to start an auth-enabled server with none."""
    if not auth.enabled:
        return ()
    tokens = tuple(t.strip().encode() for t in os.environ.get(auth.token_env, "").split(",") if t.strip())
    if not tokens:
        raise RuntimeError(
            f"auth is enabled but ${auth.token_env} holds no tokens on this node; set it (comma-separated) "
            "in the Ray nodes' environment, or set auth.enabled=false for a loopback-only test"
        )
    return tokens


@dataclass
class GuardPolicy:
    tokens: tuple[bytes, ...]  # empty: auth off
    max_body_bytes: int
    public_paths: frozenset[str] = field(default_factory=lambda: frozenset({"/healthz"}))

    def token_ok(self, header: bytes | None) -> bool:
        if not self.tokens:
            return True
        if not header or header[:7].lower() != b"bearer ":
            return False
        given = header[7:].strip()
        # Compare against every token without short-circuit so timing does not tell which one is close.
        ok = False
        for token in self.tokens:
            ok |= hmac.compare_digest(given, token)
        return ok


class BodyTooLarge(HTTPException):
    """Raised from inside ``receive``; FastAPI re-raises HTTPExceptions from body parsing as they are."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is over the limit of {limit} bytes")


async def _send_json(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})


class RequestGuard:
    """Reads its `GuardPolicy` from ``app.state.guard``, which the ingress sets in its constructor
    (each replica process has its own app object, so this is per-replica state, not a global)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        policy: GuardPolicy | None = getattr(scope["app"].state, "guard", None)
        if policy is None:
            return await _send_json(
                send, 503, error_body("server is starting", "server_error", "unavailable")
            )
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        headers = dict(scope.get("headers") or [])
        if path not in policy.public_paths and not policy.token_ok(headers.get(b"authorization")):
            return await _send_json(
                send,
                401,
                error_body(
                    "missing or invalid API key: send 'Authorization: Bearer <token>'",
                    "invalid_request_error",
                    "invalid_api_key",
                ),
                [(b"www-authenticate", b"Bearer")],
            )
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > policy.max_body_bytes
            except ValueError:
                return await _send_json(
                    send, 400, error_body("invalid Content-Length", "invalid_request_error")
                )
            if too_big:
                return await _send_json(send, 413, self._too_large(policy.max_body_bytes))

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > policy.max_body_bytes:
                    raise BodyTooLarge(policy.max_body_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            # FastAPI's handlers normally render it; this catches a read outside a route's body parsing.
            if not started:
                await _send_json(send, 413, self._too_large(policy.max_body_bytes))

    @staticmethod
    def _too_large(limit: int) -> dict:
        return error_body(
            f"request body is over the limit of {limit} bytes", "invalid_request_error", "request_too_large"
        )
