"""Resizing before the processor: the same patches as the processor's own resize, at a fraction of the cost."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import engine_config, make_image_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qzoom_ray import geometry
from qzoom_ray.model.engine import QZoomEngine
from qzoom_ray.model.preprocess import presize_image
from qzoom_ray.model.processor import image_size_kwargs, load_processor
from qzoom_ray.model.state import EngineRecord, PreparedRecord

PX = 28


@pytest.fixture(scope="module")
def image_processor(tiny_model_dir):
    return load_processor(tiny_model_dir).image_processor


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def patches(ip, image: Image.Image, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    out = ip(images=[image], return_tensors="np", **image_size_kwargs(lo, hi))
    return out["pixel_values"], out["image_grid_thw"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    width=st.integers(20, 1400),
    height=st.integers(20, 1400),
    budget=st.sampled_from([16, 64, 128, 256, 576]),
    min_tokens=st.sampled_from([4, 16, 64]),
    seed=st.integers(0, 3),
)
def test_presized_image_gives_the_processors_patches(image_processor, width, height, budget, min_tokens, seed):
    lo, hi = min(min_tokens, budget) * PX * PX, budget * PX * PX
    image = noise_image(width, height, seed)
    want_pixels, want_grid = patches(image_processor, image, lo, hi)
    view = presize_image(image, image_processor, lo, hi, 200.0)
    got_pixels, got_grid = patches(image_processor, view, lo, hi)
    np.testing.assert_array_equal(got_grid, want_grid)
    np.testing.assert_array_equal(got_pixels, want_pixels)
    h, w = geometry.smart_resize(height, width, PX, lo, hi)
    if geometry.smart_resize(h, w, PX, lo, hi) == (h, w):
        assert view.size == (w, h)
    else:  # the rule overshoots the budget (tiny images, tiny budgets): the processor resizes the original
        assert view is image


def test_sizes_the_rule_would_move_again_are_left_to_the_processor(image_processor):
    # 28 x 5000 at 64 tokens: the budget branch clamps the short side to 28, which is over budget, so a
    # second pass of the rule would shrink it further; the pre-resize must then step aside.
    lo, hi = 4 * PX * PX, 64 * PX * PX
    image = noise_image(30, 5000, 0)
    h, w = geometry.smart_resize(5000, 30, PX, lo, hi)
    assert geometry.smart_resize(h, w, PX, lo, hi) != (h, w)
    assert presize_image(image, image_processor, lo, hi, 200.0) is image


def test_processor_without_resizing_gets_the_original(image_processor):
    class NoResize:
        do_resize = False

    image = noise_image(300, 200, 0)
    assert presize_image(image, NoResize(), 16 * PX * PX, 64 * PX * PX, 200.0) is image


def test_prepare_hands_the_processor_a_small_view(tiny_model_dir, monkeypatch):
    engine = QZoomEngine(engine_config(tiny_model_dir))
    lo, hi = 16 * PX * PX, 64 * PX * PX
    record = EngineRecord("big", make_image_bytes(1600, 1200), "What is shown?", min_pixels=lo, max_pixels=hi)
    seen: list[tuple[int, int]] = []
    real_call = type(engine.processor).__call__

    def spy(self, *args, images=None, **kwargs):
        seen.extend(im.size for im in images)
        return real_call(self, *args, images=images, **kwargs)

    monkeypatch.setattr(type(engine.processor), "__call__", spy)
    prep = engine.prepare(record)
    assert isinstance(prep, PreparedRecord)
    h, w = geometry.smart_resize(1200, 1600, PX, lo, hi)
    assert seen == [(w, h)]
    # The crop stays cut from the full-resolution original.
    assert prep.image.size == (1600, 1200)
    with Image.open(io.BytesIO(record.image)) as original:
        rgb = original.convert("RGB")
        want, _ = patches(engine.processor.image_processor, rgb, lo, hi)
    np.testing.assert_array_equal(prep.pixel_values, want)


def test_bench_prepare_runs_and_reports_identical_patches(tiny_model_dir):
    import subprocess
    import sys
    from pathlib import Path

    job = Path(__file__).resolve().parents[2] / "jobs" / "bench_prepare.py"
    args = ["--model", tiny_model_dir, "--records", "2", "--budgets", "64", "--batch", "2", "--repeats", "1"]
    out = subprocess.run([sys.executable, str(job), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "identical patches: True" in out.stdout
    assert "vision tower: Conv3d" in out.stdout and "speedup" in out.stdout


def test_crop_patches_are_the_processors_on_the_raw_crop(tiny_model_dir):
    from qzoom_ray.images import crop_image
    from qzoom_ray.model.preprocess import roi_budget

    engine = QZoomEngine(engine_config(tiny_model_dir))
    lo, hi = 16 * PX * PX, 64 * PX * PX
    record = EngineRecord("big", make_image_bytes(1600, 1200), "Which code?", min_pixels=lo, max_pixels=hi)
    prep = engine.prepare(record)
    request = engine.request_for_box(prep, (0.1, 0.2, 0.7, 0.9))
    roi = engine.prepare_roi(request)
    crop = crop_image(prep.image, request.box_px)
    want, grid = patches(engine.processor.image_processor, crop, *roi_budget(engine, prep))
    assert crop.size[0] * crop.size[1] > 4 * hi  # big enough that the pre-resize does the work
    np.testing.assert_array_equal(roi.pixel_values, want)
    assert tuple(grid[0]) == roi.grid_thw
