"""The endpoint over real HTTP on loopback: completions, auth, limits and bad input (4xx, never 5xx).

The app is deployed from configs/serve.yaml (CPU-sized args) the way `serve deploy` does it, which also
lets the last test change its `user_config` live.
"""

from __future__ import annotations

import base64
import http.client
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
import requests
from conftest import make_image_bytes
from serve_helpers import (
    MODEL,
    TOKEN,
    assert_openai_error,
    body_with_url,
    deploy_config,
    free_port,
    post,
    running_yaml_app,
    serve_args_for,
    with_user_config,
    yaml_config,
)

from qzoom_ray.serve.bench import chat_body

MAX_BODY = 1024 * 1024
MAX_IMAGE = 700 * 1024
PNG = make_image_bytes(320, 240, 1)


def png_bomb(side: int = 20000) -> bytes:
    """A ~50 KB 1-bit PNG that claims side x side pixels (400 MP when decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class _ImageHandler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, str, bytes]] = {
        "/ok/img.png": (200, "image/png", PNG),
        "/ok/big.png": (200, "image/png", b"\x89PNG" + b"\x00" * (MAX_IMAGE + 10)),
        "/ok/page.html": (200, "text/html", b"<html></html>"),
        "/ok/redirect.png": (302, "text/plain", b""),
        "/private/img.png": (200, "image/png", PNG),
    }

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        status, ctype, data = self.routes.get(self.path, (404, "text/plain", b"nope"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        if status == 302:
            self.send_header("Location", "/private/img.png")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def image_host():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def app_args(tiny_model_dir, image_host):
    return serve_args_for(
        tiny_model_dir,
        limits={
            "max_body_bytes": MAX_BODY,
            "max_image_bytes": MAX_IMAGE,
            "max_image_pixels": 4_000_000,
            "max_question_chars": 500,
            "max_tokens": 64,
        },
        remote_images={"allowlist": [f"{image_host}/ok/"], "allow_http": True, "timeout_s": 5},
    )


@pytest.fixture(scope="module")
def config(app_args):
    return yaml_config(app_args, free_port())


@pytest.fixture(scope="module")
def url(config):
    with running_yaml_app(config) as base:
        yield base


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# ------------------------------------------------------------------------------------ happy paths
def test_completion_direct_and_zoomed(url):
    direct = post(url, chat_body(PNG, "What is the total?", max_tokens=4, gate_thresh=2.0))
    assert direct.status_code == 200, direct.text
    out = direct.json()
    assert out["object"] == "chat.completion" and out["model"] == MODEL
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = out["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 4
    q = out["qzoom"]
    assert q["route"] == "direct" and not q["zoomed"] and q["roi_box_px"] is None
    assert 0.0 <= q["gate_score"] <= 1.0 and q["coarse_visual_tokens"] > 0
    assert (q["image_width"], q["image_height"]) == (320, 240)
    assert q["answer_logprob"] <= 0.0

    zoomed = post(url, chat_body(PNG, "What is the total?", max_tokens=4, gate_thresh=0.0)).json()
    z = zoomed["qzoom"]
    assert z["zoomed"] and z["route"] == "zoom" and z["roi_visual_tokens"] > 0
    x0, y0, x1, y1 = z["roi_box_px"]
    assert 0 <= x0 < x1 <= 320 and 0 <= y0 < y1 <= 240
    assert z["answer_logprob"] <= 0.0
    assert zoomed["usage"]["prompt_tokens"] > out["usage"]["prompt_tokens"]


def test_openai_client(url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url + "/v1", api_key=TOKEN, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is the value of Total?"},
                    {"type": "image_url", "image_url": {"url": data_uri(PNG)}},
                ],
            },
        ],
        max_tokens=3,
        extra_body={"qzoom": {"gate_thresh": 0.0}},
    )
    assert isinstance(resp.choices[0].message.content, str)
    assert resp.usage.completion_tokens <= 3
    assert resp.model_extra["qzoom"]["zoomed"] is True
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(
            model=MODEL,
            max_tokens=10_000,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "hi"},
                        {"type": "image_url", "image_url": {"url": data_uri(PNG)}},
                    ],
                }
            ],
        )


def test_models_and_health(url):
    assert requests.get(url + "/healthz", timeout=10).json() == {"status": "ok"}  # no token needed
    models = requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert models.json()["data"][0]["id"] == MODEL


def test_second_token_accepted(url):
    assert post(url, chat_body(PNG, "Total?", max_tokens=2, gate_thresh=2.0), token="second-token").ok


def test_remote_image_on_allowlist(url, image_host):
    resp = post(url, body_with_url(f"{image_host}/ok/img.png", max_tokens=2))
    assert resp.status_code == 200, resp.text


# ------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("token", [None, "wrong-token", ""])
def test_auth_refused(url, token):
    resp = post(url, chat_body(PNG, "Total?"), token=token)
    err = assert_openai_error(resp, 401, "api key")
    assert err["code"] == "invalid_api_key" and resp.headers["WWW-Authenticate"] == "Bearer"
    resp = requests.get(url + "/v1/models", timeout=10)
    assert resp.status_code == 401


def test_body_over_limit_by_content_length(url):
    big = b'{"model": "qzoom", "messages": [], "pad": "' + b"x" * (MAX_BODY + 10) + b'"}'
    resp = post(url, big)
    assert_openai_error(resp, 413, "over the limit")


def test_body_over_limit_while_streaming(url):
    """No Content-Length (chunked): the cap is enforced as bytes arrive, not after reading it all."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    chunk = b"x" * 65536
    sent = 0
    try:
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        # Send up to 4x the limit; the server may answer (and close) before all of it is sent.
        while sent < 4 * MAX_BODY:
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    resp = conn.getresponse()
    assert resp.status == 413, resp.read()
    assert b"over the limit" in resp.read()
    conn.close()


BAD_REQUESTS = {
    "empty messages": ({"model": MODEL, "messages": []}, 400, "at least one message"),
    "no user message": (
        {"model": MODEL, "messages": [{"role": "system", "content": "x"}]},
        400,
        "user message",
    ),
    "no image": (
        {"model": MODEL, "messages": [{"role": "user", "content": "What?"}]},
        400,
        "exactly one image",
    ),
    "two images": (
        {
            "model": MODEL,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Q?"},
                        {"type": "image_url", "image_url": {"url": data_uri(PNG)}},
                        {"type": "image_url", "image_url": {"url": data_uri(PNG)}},
                    ],
                }
            ],
        },
        400,
        "exactly one image",
    ),
    "bad base64": (body_with_url("data:image/png;base64,@@@not-base64@@@"), 400, "base64"),
    "non-image data uri": (body_with_url(data_uri(b"hello world", "text/plain")), 400, "not an image type"),
    "image mime, not an image": (
        body_with_url(data_uri(b"GIF89a but not really" * 10)),
        400,
        "not a valid image",
    ),
    "decompression bomb": (body_with_url(data_uri(png_bomb())), 400, "decompression bomb"),
    "inline image too large": (body_with_url(data_uri(b"\x89PNG" + bytes(MAX_IMAGE))), 400, "over the limit"),
    "remote url not on allowlist": (body_with_url("https://example.com/cat.png"), 400, "allowlist"),
    "file url": (body_with_url("file:///etc/passwd"), 400, "no local paths"),
    "local path": (body_with_url("/etc/passwd"), 400, "no local paths"),
    "max_tokens too large": (chat_body(PNG, "Total?", max_tokens=65), 400, "above this server's limit"),
    "question too long": (chat_body(PNG, "x" * 501), 400, "question too long"),
    "wrong model": (chat_body(PNG, "Total?", model="gpt-4o"), 404, "does not exist"),
    "stream": ({**chat_body(PNG, "Total?"), "stream": True}, 400, "stream"),
    "n > 1": ({**chat_body(PNG, "Total?"), "n": 2}, 400, "n=1"),
    "unknown content part": (
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "input_audio", "x": 1}]}]},
        400,
        "invalid request",
    ),
    "missing messages": ({"model": MODEL}, 400, "messages"),
    "negative max_tokens": ({**chat_body(PNG, "Total?"), "max_tokens": -1}, 400, "max_tokens"),
    "per-token logprobs": ({**chat_body(PNG, "Total?"), "logprobs": True}, 400, "answer_logprob"),
    "top logprobs": ({**chat_body(PNG, "Total?"), "top_logprobs": 3}, 400, "answer_logprob"),
    "extreme aspect ratio (engine check)": (
        chat_body(make_image_bytes(2000, 5, 3), "Total?"),
        400,
        "aspect ratio",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_a_clear_4xx(url, case):
    body, status, contains = BAD_REQUESTS[case]
    assert_openai_error(post(url, body), status, contains)


def test_malformed_json(url):
    assert_openai_error(post(url, b'{"model": "qzoom", "messages": [}'), 400, "invalid request")


@pytest.mark.parametrize(
    ("path", "contains"),
    [
        ("/private/img.png", "allowlist"),
        ("/ok/big.png", "over the limit"),
        ("/ok/page.html", "not an image"),
        ("/ok/redirect.png", "HTTP 302"),
        ("/ok/missing.png", "HTTP 404"),
        ("/ok/../private/img.png", ".."),
    ],
)
def test_remote_image_refusals(url, image_host, path, contains):
    assert_openai_error(post(url, body_with_url(image_host + path)), 400, contains)


def test_allowlist_matches_host_exactly(url, image_host):
    # A string-prefix match would accept these; the parsed comparison must not.
    port = urlsplit(image_host).port
    for bad in (
        f"http://127.0.0.1:{port}.evil.net/ok/img.png",
        f"http://user:pw@127.0.0.1:{port}/ok/img.png",
        f"https://127.0.0.1:{port}/ok/img.png",
        f"http://localhost:{port}/ok/img.png",
    ):
        resp = post(url, body_with_url(bad))
        assert 400 <= resp.status_code < 500, (bad, resp.text)


def _model_replicas() -> set[str]:
    import ray

    names = (a["name"] for a in ray.util.list_named_actors(all_namespaces=True))
    return {n for n in names if "CoarseServer" in n or "ZoomServer" in n}


def test_user_config_changes_live_without_restart(url, config):
    """Editing a deployment's user_config and re-deploying reaches the running replicas through
    reconfigure; none is replaced (no model reload)."""
    from ray import serve

    from qzoom_ray.serve.local import APP_NAME, wait_for

    body = chat_body(PNG, "Total?", max_tokens=2)  # no per-request override: the live config decides

    def route() -> str:
        resp = post(url, body)
        assert resp.status_code == 200, resp.text
        return resp.json()["qzoom"]["route"]

    assert route() == "zoom"  # yaml_config's gate_thresh 0.1 is below the random model's ~0.52 score
    before = _model_replicas()
    try:
        deploy_config(with_user_config(config, "CoarseServer", gate_thresh=2.0))
        assert wait_for(lambda: serve.status().applications[APP_NAME].status == "RUNNING", 60)
        assert wait_for(lambda: route() == "direct", 30)
        assert _model_replicas() == before, "a user_config change must not replace replicas"
    finally:
        deploy_config(config)
    assert wait_for(lambda: route() == "zoom", 30)
