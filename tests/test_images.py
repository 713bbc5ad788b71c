"""Tests for qzoom_ray.images: every bad image becomes an ImageError; good ones come back upright RGB."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qzoom_ray.images import ImageError, crop_image, encode_jpeg, encode_png, load_image

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny 1-bit PNG that claims a huge size: decoding it would allocate width*height bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def gradient(width: int = 48, height: int = 32) -> Image.Image:
    img = Image.new("RGB", (width, height))
    img.putdata([((x * 5) % 256, (y * 7) % 256, 128) for y in range(height) for x in range(width)])
    return img


# ---------------------------------------------------------------- bad inputs


def test_empty_bytes() -> None:
    with pytest.raises(ImageError, match="empty image bytes"):
        load_image(b"")


@pytest.mark.parametrize(
    "data", [b"definitely not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"\xff\xd8\xff" + b"\x13" * 30]
)
def test_corrupt_bytes(data: bytes) -> None:
    with pytest.raises(ImageError):
        load_image(data)


def test_truncated_jpeg() -> None:
    data = encode_jpeg(gradient(64, 64))
    with pytest.raises(ImageError, match="truncated or corrupt image"):
        load_image(data[: len(data) // 2])


def test_bomb_header_rejected_before_decoding() -> None:
    data = png_header_only(20000, 20000)
    assert len(data) < 200
    with pytest.raises(ImageError, match="decompression bomb") as info:
        load_image(data)
    assert "20000x20000" in str(info.value)
    # Far beyond PIL's own hard limit: PIL's error is converted too.
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(png_header_only(60000, 60000))


def test_our_max_pixels_applies() -> None:
    data = encode_png(gradient(100, 100))
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(data, max_pixels=5000)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(gradient(100, 100), max_pixels=5000)
    assert load_image(data, max_pixels=10000).size == (100, 100)


def test_pil_global_limit_relaxed_only_temporarily(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    img = load_image(encode_png(gradient(100, 100)))  # 10000 px: PIL alone would refuse it
    assert img.size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_extreme_aspect_ratio() -> None:
    with pytest.raises(ImageError, match="extreme aspect ratio"):
        load_image(encode_png(Image.new("L", (1, 300))))
    with pytest.raises(ImageError, match="extreme aspect ratio"):
        load_image(Image.new("RGB", (300, 1)))
    assert load_image(encode_png(Image.new("L", (1, 200)))).size == (1, 200)
    with pytest.raises(ImageError, match="extreme aspect ratio"):
        load_image(encode_png(Image.new("L", (10, 60))), max_aspect_ratio=5.0)


def test_min_side() -> None:
    with pytest.raises(ImageError, match="too small"):
        load_image(encode_png(gradient(10, 40)), min_side=28)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="image file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="image file not found"):
        load_image(str(tmp_path / "nope.png"))
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_unsupported_source_type() -> None:
    with pytest.raises(ImageError, match="unsupported image source"):
        load_image(123)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the corrupt EXIF we create
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]),
    cut=st.floats(0.0, 1.0),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=6),
)
def test_mangled_files_only_raise_image_error(fmt: str, cut: float, flips: list[tuple[float, int]]) -> None:
    buf = io.BytesIO()
    gradient(24, 16).save(buf, format=fmt)
    data = bytearray(buf.getvalue())
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    data = data[: max(1, int(len(data) * cut))] if cut < 1.0 else data
    try:
        img = load_image(bytes(data), max_pixels=1_000_000)
    except ImageError:
        return
    assert img.mode == "RGB" and img.width * img.height <= 1_000_000


# ---------------------------------------------------------------- good inputs


def test_bytes_like_and_paths(tmp_path: Path) -> None:
    src = gradient()
    data = encode_png(src)
    path = tmp_path / "img.png"
    path.write_bytes(data)
    for source in (data, bytearray(data), memoryview(data), path, str(path)):
        img = load_image(source)
        assert img.mode == "RGB" and img.size == (48, 32)
        assert img.tobytes() == src.tobytes()


def test_exif_rotated_jpeg() -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    data = _jpeg_with_exif(img, exif)
    out = load_image(data)
    assert out.size == (20, 40)
    r, g, b = out.getpixel((17, 2))  # stored top-left is now the top-right
    assert r > 200 and b < 60
    r, g, b = out.getpixel((2, 2))
    assert b > 200 and r < 60
    # A PIL input with the same tag is rotated without touching the caller's image.
    opened = Image.open(io.BytesIO(data))
    rotated = load_image(opened)
    assert rotated.size == (20, 40) and opened.size == (40, 20)


def _jpeg_with_exif(img: Image.Image, exif: Image.Exif) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_pil_rgb_passthrough() -> None:
    img = gradient()
    assert load_image(img) is img


def test_alpha_composited_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    for source in (rgba, encode_png(rgba)):
        out = load_image(source)
        assert out.mode == "RGB"
        assert out.getpixel((0, 0)) == (255, 255, 255)
        assert out.getpixel((1, 1)) == (255, 0, 0)
        assert all(120 <= c <= 135 for c in out.getpixel((2, 2)))  # black at half alpha over white
    assert rgba.mode == "RGBA"  # caller's image untouched


def test_la_and_palette_transparency() -> None:
    la = Image.new("LA", (3, 3), (0, 0))
    la.putpixel((0, 0), (50, 255))
    out = load_image(encode_png(la))
    assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (50, 50, 50)

    pal = Image.new("P", (3, 3), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((2, 2), 1)
    pal.info["transparency"] = 0
    out = load_image(encode_png(pal))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((2, 2)) == (0, 255, 0)
    pal.info.pop("transparency")
    assert load_image(pal).getpixel((0, 0)) == (0, 0, 0)


def test_cmyk_and_one_bit() -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    for source in (cmyk, encode_jpeg(cmyk)):
        r, g, b = load_image(source).getpixel((4, 4))
        assert r > 200 and g < 60 and b < 60
    one = Image.new("1", (8, 8), 1)
    assert load_image(encode_png(one)).getpixel((3, 3)) == (255, 255, 255)


def test_high_depth_modes_are_rescaled() -> None:
    i16 = Image.new("I;16", (4, 2), 0)
    i16.putpixel((1, 0), 65535)
    i16.putpixel((2, 0), 32896)
    for source in (i16, encode_png(i16)):
        out = load_image(source)
        assert out.mode == "RGB"
        assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)
        assert 126 <= out.getpixel((2, 0))[0] <= 129  # scaled, not clipped to 255

    small_i = Image.new("I", (2, 1), 100)
    assert load_image(small_i).getpixel((0, 0)) == (100, 100, 100)  # 8-bit data in a wide mode
    wide_i = Image.new("I", (2, 1), -500)
    wide_i.putpixel((1, 0), 100_000)
    out = load_image(wide_i)
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)

    f = Image.new("F", (2, 1), 0.5)
    f.putpixel((1, 0), 1.0)
    out = load_image(f)
    assert 126 <= out.getpixel((0, 0))[0] <= 128 and out.getpixel((1, 0)) == (255, 255, 255)


# ---------------------------------------------------------------- helpers


def test_crop_image() -> None:
    img = gradient(48, 32)
    crop = crop_image(img, (4, 2, 20, 30))
    assert crop.size == (16, 28)
    assert crop.getpixel((0, 0)) == img.getpixel((4, 2))
    assert crop_image(img, tuple(np.array([0, 0, 48, 32]))).size == (48, 32)  # type: ignore[arg-type]
    for bad in [(0, 0, 49, 32), (-1, 0, 10, 10), (5, 5, 5, 10), (0, 0, 10.5, 10)]:
        with pytest.raises(ImageError):
            crop_image(img, bad)  # type: ignore[arg-type]


def test_encoders_roundtrip() -> None:
    img = gradient()
    assert Image.open(io.BytesIO(encode_png(img))).tobytes() == img.tobytes()
    jpeg = Image.open(io.BytesIO(encode_jpeg(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), quality=80)))
    assert jpeg.format == "JPEG" and jpeg.mode == "RGB"
    assert jpeg.getpixel((3, 3))[0] > 240  # transparent became white, not black
