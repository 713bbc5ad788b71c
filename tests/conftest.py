"""Shared fixtures: one tiny offline Q-Zoom model per session, and images made on the fly."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never reach a model hub; fail fast instead of waiting on network timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite compares the engine with stock forwards bit for bit, which holds in float32 on the CPU that CI has.
# On a machine with a GPU, device "auto" would pick CUDA and bfloat16, so this process does not see CUDA unless
# the GPU checks are asked for: QZOOM_GPU_TESTS=1 pytest -m gpu (tests/model/test_cuda.py). Not by emptying
# CUDA_VISIBLE_DEVICES: Ray then refuses the logical GPUs that the pipeline tests place actors on.
if os.environ.get("QZOOM_GPU_TESTS") != "1":
    import torch

    torch.cuda.is_available = lambda: False

# Small budgets keep CPU tests fast: 64..256 visual tokens.
TEST_MIN_PIXELS = 64 * 28 * 28
TEST_MAX_PIXELS = 256 * 28 * 28


def make_image_bytes(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((height, width, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from qzoom_ray.model.tiny import build_tiny_qzoom

    return str(build_tiny_qzoom(tmp_path_factory.mktemp("tiny") / "tiny-qzoom", seed=0))


def engine_config(model_dir: str, **overrides):
    from qzoom_ray.config import EngineConfig

    data = {
        "model": {"path": model_dir},
        "zoom": {"min_pixels": TEST_MIN_PIXELS, "max_pixels": TEST_MAX_PIXELS},
        "generation": {"max_new_tokens": 6},
        "torch_threads": 2,
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return EngineConfig.model_validate(data)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    from qzoom_ray.model.engine import QZoomEngine

    return QZoomEngine(engine_config(tiny_model_dir))


# ---- batch-job (qzoom_ray.pipeline) fixtures


@pytest.fixture(scope="module")
def ray_two_gpus():
    """A local Ray per test module with 2 CPUs and 2 logical GPUs (placement only, no CUDA)."""
    import ray

    token = os.path.expanduser("~/.ray/auth_token")
    had_token = os.path.exists(token)
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        if not had_token and os.path.exists(token):
            os.remove(token)


@pytest.fixture(scope="module")
def moto_s3():
    """A real S3 API (moto server mode) on loopback, reachable from Ray workers; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def load_job(name: str):
    """Import ``jobs/<name>.py`` as a module (jobs/ is a folder of scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"jobs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- training-stage (qzoom_ray.train) fixtures


@pytest.fixture(scope="session")
def tiny_base_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model's backbone alone (no Q-Zoom heads): what stage 1 starts from."""
    from qzoom_ray.config import ModelConfig
    from qzoom_ray.model.loader import load_model

    loaded = load_model(ModelConfig(path=tiny_model_dir, require_heads=False, device="cpu"))
    out = tmp_path_factory.mktemp("tiny-base") / "base"
    loaded.adapter.model.save_pretrained(out)
    loaded.processor.save_pretrained(out)
    # The branch fields ride along on the model config; a stock base checkpoint has none.
    import json

    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("enable_twig", "twig_K", "twig_T", "enable_high_res", "high_res_K", "high_res_T", "reuse_src_pos",
                "roi_source", "roi_multi_head"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return str(out)
