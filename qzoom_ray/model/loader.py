"""One call that loads a Q-Zoom model: stock backbone + heads + processor + decoding defaults."""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText
from transformers.utils import logging as hf_logging

from qzoom_ray.config import ModelConfig
from qzoom_ray.model import qwen2_5_vl  # noqa: F401 - registers the Qwen2.5-VL adapter
from qzoom_ray.model.backbone import BackboneAdapter, adapter_for
from qzoom_ray.model.checkpoint import (
    CheckpointError,
    check_stock_load_info,
    find_heads,
    load_heads_into,
    read_head_tensors,
)
from qzoom_ray.model.heads import QZoomHeads, QZoomHeadsSpec
from qzoom_ray.model.processor import load_processor

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"


@dataclass
class LoadedModel:
    adapter: BackboneAdapter
    heads: QZoomHeads | None
    processor: Any
    repetition_penalty: float
    source: str
    #: A view of ``adapter`` decoding with another model's decoder for the direct route
    #: (``ModelConfig.direct_route_path``); None: the direct route uses ``adapter``.
    direct_adapter: BackboneAdapter | None = None

    @property
    def spec(self) -> QZoomHeadsSpec | None:
        return None if self.heads is None else self.heads.spec


def resolve_checkpoint_dir(path: str, revision: str | None = None) -> Path:
    """Local folder as is; ``embedded:NAME`` a model that ships with the package (or, ``tiny-random``,
    is built offline); anything else is a hub id to download."""
    if path.startswith(EMBEDDED_PREFIX):
        from qzoom_ray.model.embedded import embedded_checkpoint_dir

        return embedded_checkpoint_dir(path[len(EMBEDDED_PREFIX) :])
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists() or path.startswith((".", "/")):
        raise FileNotFoundError(f"model path {path!r} is not a directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=path, revision=revision))
    except Exception as exc:  # hub errors come in many classes; the message is what matters
        raise FileNotFoundError(f"cannot fetch {path!r} from the hub (offline? wrong id?): {exc}") from exc


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def pick_attn_implementation(name: str, device: torch.device) -> str:
    if name == "auto":
        if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        return "sdpa"
    if name == "flash_attention_2" and device.type != "cuda":
        raise RuntimeError("flash_attention_2 needs a CUDA device; use sdpa on CPU")
    return name


def _repetition_penalty(ckpt_dir: Path, override: float | None) -> float:
    if override is not None:
        return float(override)
    gen = ckpt_dir / "generation_config.json"
    if gen.exists():
        return float(json.loads(gen.read_text()).get("repetition_penalty") or 1.0)
    return 1.0


def load_model(cfg: ModelConfig, repetition_penalty: float | None = None) -> LoadedModel:
    ckpt_dir = resolve_checkpoint_dir(cfg.path, cfg.revision)
    heads_dir = resolve_checkpoint_dir(cfg.heads_path, None) if cfg.heads_path else None
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    attn = pick_attn_implementation(cfg.attn_implementation, device)

    source = find_heads(ckpt_dir, heads_dir)
    # transformers prints a report of the head tensors it cannot place; we load and check them below.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForImageTextToText.from_pretrained(
            ckpt_dir, dtype=dtype, attn_implementation=attn, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(previous)
    model.to(device).eval()
    adapter = adapter_for(model)
    direct_adapter = None
    if cfg.direct_route_path:
        from qzoom_ray.model.direct_route import load_direct_adapter

        # Before the patch-embedding swap below, so the vision towers compare parameter by parameter.
        direct_adapter = load_direct_adapter(
            adapter, resolve_checkpoint_dir(cfg.direct_route_path, None), cfg.direct_route_path,
            source.spec.twig_K if source.spec is not None else 0, dtype, attn,
        )
    if cfg.linear_patch_embed:
        from qzoom_ray.model.patch_embed import use_linear_patch_embed

        use_linear_patch_embed(model)
    # The heads live apart from the backbone; a plain `save_pretrained` must not claim to have them.
    for key in QZoomHeadsSpec.CONFIG_FIELDS:
        if hasattr(model.config, key):
            delattr(model.config, key)

    heads = None
    consumed: set[str] = set()
    if source.spec is not None:
        heads = QZoomHeads(source.spec, adapter.text_config, adapter.decoder_layer_cls)
        tensors = read_head_tensors(source.files)
        load_heads_into(heads, tensors, source.where)
        consumed = set(tensors)
        heads.to(device=device, dtype=dtype).eval()
    elif cfg.require_heads:
        raise CheckpointError(
            f"{cfg.path} has no Q-Zoom heads (config.json lacks enable_twig); set model.require_heads=false "
            "to run it in baseline mode, or point model.heads_path at trained heads"
        )
    check_stock_load_info(info, consumed if heads_dir is None else set(), str(ckpt_dir))

    processor = load_processor(str(cfg.processor_path or ckpt_dir), revision=cfg.revision)
    for p in list(model.parameters()) + ([] if heads is None else list(heads.parameters())):
        p.requires_grad_(False)
    logger.info(
        "loaded %s (%s, %s, attn=%s)%s",
        ckpt_dir,
        device,
        dtype,
        attn,
        "" if heads is None else f" with heads K={heads.spec.twig_K} T={heads.spec.twig_T} gate={heads.has_gate}",
    )
    return LoadedModel(
        adapter=adapter,
        heads=heads,
        processor=processor,
        repetition_penalty=_repetition_penalty(ckpt_dir, repetition_penalty),
        source=str(ckpt_dir),
        direct_adapter=direct_adapter,
    )
