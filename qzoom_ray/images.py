"""Decoding and validating input images (PIL + stdlib only).

Records come from untrusted datasets and user requests, so every failure mode of a bad image is turned
into one exception type, `ImageError`, whose message can be shown to the user as the record's error.
"""

from __future__ import annotations

import io
import operator
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import ExifTags, Image, ImageOps

_WHITE = (255, 255, 255)
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_ORIENTATION_TAG = ExifTags.Base.Orientation


class ImageError(ValueError):
    """A record's image cannot be used; message is user-facing and says why."""


# PIL checks its global MAX_IMAGE_PIXELS inside Image.open (and in some plugins' load), which would reject
# images our own, configurable max_pixels allows. We raise PIL's limit to ours only while decodes are in
# flight, reference-counted so concurrent decodes neither serialise nor restore it under each other.
_limit_lock = threading.Lock()
_limit_users = 0
_limit_saved: int | None = None


@contextmanager
def _pil_limit_at_least(max_pixels: int) -> Iterator[None]:
    global _limit_users, _limit_saved
    with _limit_lock:
        if _limit_users == 0:
            _limit_saved = Image.MAX_IMAGE_PIXELS
        _limit_users += 1
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and current < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        with _limit_lock:
            _limit_users -= 1
            if _limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _limit_saved


def _check_size(width: int, height: int, max_pixels: int, max_aspect_ratio: float, min_side: int) -> None:
    # Runs on the header size, before any pixel is decoded, so a bomb never gets allocated.
    if width < 1 or height < 1:
        raise ImageError(f"image has an empty size: {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "(possible decompression bomb)"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        raise ImageError(
            f"extreme aspect ratio {ratio:.1f} (image is {width}x{height}, limit {max_aspect_ratio:g})"
        )
    if min(width, height) < min_side:
        raise ImageError(f"image is too small: {width}x{height}, each side must be >= {min_side} pixels")


def _needs_exif_transpose(image: Image.Image) -> bool:
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:
        # A broken EXIF block is not worth rejecting the image over; treat it as upright.
        return False
    return orientation in (2, 3, 4, 5, 6, 7, 8)


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float greyscale to 8 bits; PIL's own convert would just clip to 255."""
    img = image.convert("I") if image.mode.startswith("I;16") else image
    lo, hi = img.getextrema()
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scale, offset = 255.0, 0.0  # normalised float data
    elif lo >= 0 and hi <= 255:
        scale, offset = 1.0, 0.0  # 8-bit data stored in a wide mode
    elif lo >= 0 and hi <= 65535:
        scale, offset = 255.0 / 65535.0, 0.0  # 16-bit sensor / PNG data
    else:
        span = float(hi - lo)
        scale = 255.0 / span if span > 0 else 0.0
        offset = -float(lo) * scale
    if img.mode == "I":
        img = img.convert("F")  # do the scaling in float so it neither truncates nor wraps
    img = img.point(lambda v: v * scale + offset)
    return img.convert("L")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_l(image).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        # Transparent pixels often hold black RGB; compositing on white matches how viewers show them.
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return image.convert("RGB")


def _finish(image: Image.Image, *, owned: bool) -> Image.Image:
    """Orientation + RGB for an already size-checked, loaded image."""
    if _needs_exif_transpose(image):
        if owned:
            ImageOps.exif_transpose(image, in_place=True)
        else:
            image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def _read_path(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ImageError(f"image file not found: {os.fspath(path)}") from None
    except IsADirectoryError:
        raise ImageError(f"image path is a directory: {os.fspath(path)}") from None
    except OSError as exc:
        raise ImageError(f"cannot read image file {os.fspath(path)}: {exc}") from exc


def _decode_bytes(data: bytes, max_pixels: int, max_aspect_ratio: float, min_side: int) -> Image.Image:
    if not data:
        raise ImageError("empty image bytes")
    with _pil_limit_at_least(max_pixels):
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageError(f"image rejected as a possible decompression bomb: {exc}") from exc
        except Image.UnidentifiedImageError as exc:
            raise ImageError("unrecognised or corrupt image data (not a supported image format)") from exc
        except Exception as exc:
            # Plugins raise a zoo of types (SyntaxError, struct.error, ValueError...) on malformed headers.
            raise ImageError(f"corrupt image header: {type(exc).__name__}: {exc}") from exc
        width, height = image.size
        _check_size(width, height, max_pixels, max_aspect_ratio, min_side)
        try:
            image.load()
        except Image.DecompressionBombError as exc:
            raise ImageError(f"image rejected as a possible decompression bomb: {exc}") from exc
        except Exception as exc:
            raise ImageError(f"truncated or corrupt image: {type(exc).__name__}: {exc}") from exc
        # Multi-frame formats may change size on load (e.g. GIF frames); re-check what was decoded.
        _check_size(*image.size, max_pixels, max_aspect_ratio, min_side)
    try:
        return _finish(image, owned=True)
    except Exception as exc:
        raise ImageError(f"cannot convert image (mode {image.mode}) to RGB: {exc}") from exc


def load_image(
    source: bytes | bytearray | memoryview | Image.Image | str | os.PathLike[str],
    *,
    max_pixels: int = 200_000_000,
    max_aspect_ratio: float = 200.0,
    min_side: int = 1,
) -> Image.Image:
    """Decode and validate an image, returning an upright RGB PIL image.

    Accepts encoded bytes, a local file path or a PIL image. Size limits are checked on the header
    before pixels are decoded. EXIF orientation is applied, alpha is composited on white and 16-bit /
    float greyscale is rescaled to 8 bits. An RGB PIL input with no EXIF rotation is returned as is
    (not copied). Any unusable input raises `ImageError`, never another exception type.
    """
    if isinstance(source, Image.Image):
        return _check_pil_image(source, max_pixels, max_aspect_ratio, min_side)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(source), max_pixels, max_aspect_ratio, min_side)
    if isinstance(source, (str, os.PathLike)):
        return _decode_bytes(_read_path(source), max_pixels, max_aspect_ratio, min_side)
    raise ImageError(f"unsupported image source type: {type(source).__name__}")


def _check_pil_image(
    image: Image.Image, max_pixels: int, max_aspect_ratio: float, min_side: int
) -> Image.Image:
    _check_size(*image.size, max_pixels, max_aspect_ratio, min_side)
    try:
        # A lazily opened image from the caller still has to decode; do it under the same guards.
        with _pil_limit_at_least(max_pixels):
            image.load()
    except Exception as exc:
        raise ImageError(f"truncated or corrupt image: {type(exc).__name__}: {exc}") from exc
    try:
        return _finish(image, owned=False)
    except Exception as exc:
        raise ImageError(f"cannot convert image (mode {image.mode}) to RGB: {exc}") from exc


def crop_image(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """Crop (x0, y0, x1, y1), x1/y1 exclusive; the box must be a non-empty region inside the image."""
    width, height = image.size
    try:
        # operator.index accepts numpy integers but refuses floats, which would silently resample.
        x0, y0, x1, y1 = (operator.index(v) for v in box)
    except (TypeError, ValueError) as exc:
        raise ImageError(f"crop box {box} must be 4 integers") from exc
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ImageError(f"crop box {box} is not a non-empty box inside the {width}x{height} image")
    return image.crop((x0, y0, x1, y1))


def encode_png(image: Image.Image) -> bytes:
    """Lossless encoding, keeping the image's mode."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG encoding; modes JPEG cannot store are converted to RGB first (alpha on white)."""
    if image.mode not in ("RGB", "L", "CMYK"):
        image = _to_rgb(image)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
