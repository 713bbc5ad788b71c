"""Turning an ``image_url`` into checked image bytes: data: URIs, or fetches from an explicit allowlist.

The server never opens local paths or file:// URLs and never fetches a URL that is not under an
allowlisted prefix (no SSRF). Every failure is an `ApiError` 400 with a message the client can act on.
The bytes handed on are always ``bytes``: the engine would read a ``str`` as a local path.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from PIL import Image

from qzoom_ray.serve.api import ApiError
from qzoom_ray.serve.config import LimitsConfig, RemoteImageConfig

#: Formats Qwen's processor can use; anything else is refused before it reaches a decoder.
IMAGE_MIME_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp", "image/tiff"}
)
_PARAM = "messages.content.image_url.url"


def _bad(message: str, code: str = "invalid_image") -> ApiError:
    return ApiError(400, message, param=_PARAM, code=code)


def decode_data_uri(uri: str, max_bytes: int) -> bytes:
    """``data:image/<fmt>;base64,<payload>`` -> bytes (strict base64, image media types only)."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise _bad("malformed data URI: no ',' separating header and payload")
    fields = header[len("data:") :].split(";")
    mime = fields[0].strip().lower()
    if mime not in IMAGE_MIME_TYPES:
        raise _bad(
            f"data URI media type {mime or '(none)'!r} is not an image type; use one of "
            f"{sorted(IMAGE_MIME_TYPES)}",
            "invalid_image_format",
        )
    if "base64" not in (f.strip().lower() for f in fields[1:]):
        raise _bad("data URI must be base64-encoded (data:image/png;base64,...)", "invalid_base64")
    # A base64 payload is 4/3 of the data: refuse before decoding anything too big.
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise _bad(f"inline image is over the limit of {max_bytes} bytes", "image_too_large")
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad(f"data URI payload is not valid base64: {exc}", "invalid_base64") from None
    if not data:
        raise _bad("data URI payload is empty", "invalid_base64")
    if len(data) > max_bytes:
        raise _bad(f"inline image is {len(data)} bytes, over the limit of {max_bytes}", "image_too_large")
    return data


@dataclass(frozen=True)
class _Prefix:
    scheme: str
    host: str
    port: int
    path: str


def _port(parts) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


class UrlAllowlist:
    """Exact scheme, host and port, plus a path prefix; string-prefix matching would let
    ``https://cdn.example.com.evil.net/`` through, so URLs are compared by their parsed parts."""

    def __init__(self, entries: list[str]):
        self._prefixes = []
        for entry in entries:
            parts = urlsplit(entry)
            self._prefixes.append(
                _Prefix(parts.scheme, parts.hostname or "", _port(parts), parts.path or "/")
            )

    def __bool__(self) -> bool:
        return bool(self._prefixes)

    def check(self, url: str) -> None:
        try:
            parts = urlsplit(url)
            port = _port(parts)
        except ValueError as exc:
            raise _bad(f"malformed image URL: {exc}", "invalid_url") from None
        if parts.username or parts.password:
            raise _bad("image URLs with credentials are not accepted", "url_not_allowed")
        segments = unquote(parts.path).split("/")
        if ".." in segments or "\\" in unquote(parts.path):
            raise _bad("image URL path must not contain '..' or backslashes", "url_not_allowed")
        for p in self._prefixes:
            if (
                parts.scheme == p.scheme
                and (parts.hostname or "") == p.host
                and port == p.port
                and (parts.path or "/").startswith(p.path)
            ):
                return
        raise _bad(
            "image URL is not on this server's allowlist"
            + ("" if self else " (remote images are disabled; send a data: URI)"),
            "url_not_allowed",
        )


async def fetch_image(url: str, max_bytes: int, timeout_s: float) -> bytes:
    """GET an allowlisted URL: no redirects, image content types only, size counted while streaming."""
    import aiohttp  # a ray[serve] dependency; imported here so the parsers above stay light

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, trust_env=False) as session,
            session.get(url, allow_redirects=False) as resp,
        ):
            if resp.status != 200:
                raise _bad(f"fetching the image URL gave HTTP {resp.status}", "fetch_failed")
            mime = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if mime not in IMAGE_MIME_TYPES:
                raise _bad(
                    f"the image URL served {mime or 'no content type'!r}, not an image",
                    "invalid_image_format",
                )
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise _bad(
                    f"remote image is {resp.content_length} bytes, over the limit of {max_bytes}",
                    "image_too_large",
                )
            buf = bytearray()
            # Counted after transfer decoding, so a gzip bomb is stopped at max_bytes too.
            async for chunk in resp.content.iter_chunked(64 * 1024):
                buf += chunk
                if len(buf) > max_bytes:
                    raise _bad(f"remote image is over the limit of {max_bytes} bytes", "image_too_large")
            return bytes(buf)
    except ApiError:
        raise
    except TimeoutError:
        raise _bad(f"fetching the image URL took longer than {timeout_s:g} s", "fetch_failed") from None
    except aiohttp.ClientError as exc:
        raise _bad(f"fetching the image URL failed: {type(exc).__name__}", "fetch_failed") from None


def check_image_header(data: bytes, limits: LimitsConfig) -> tuple[int, int]:
    """(width, height) from the header only, so a bomb is refused before a pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit below
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Image.DecompressionBombError:
        raise _bad(
            f"image rejected as a possible decompression bomb (over {limits.max_image_pixels} pixels)",
            "image_too_large",
        ) from None
    except Exception as exc:  # PIL raises many types on malformed input
        raise _bad(f"image data is not a valid image ({type(exc).__name__})") from None
    if width * height > limits.max_image_pixels:
        raise _bad(
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{limits.max_image_pixels} (possible decompression bomb)",
            "image_too_large",
        )
    return width, height


async def load_image_bytes(
    url: str, limits: LimitsConfig, remote: RemoteImageConfig, allowlist: UrlAllowlist
) -> bytes:
    scheme = url[:8].lower()
    if scheme.startswith("data:"):
        data = decode_data_uri(url, limits.max_image_bytes)
    elif scheme.startswith(("https://", "http://")):
        allowlist.check(url)
        data = await fetch_image(url, limits.max_image_bytes, remote.timeout_s)
    else:
        raise _bad(
            "image_url must be a data: URI or an allowlisted https URL (no local paths or file://)",
            "url_not_allowed",
        )
    check_image_header(data, limits)
    return data
