"""Reading and writing Q-Zoom checkpoints in the authors' released layout (spec §5).

Released layout = a stock Qwen2.5-VL checkpoint in transformers-4.51 key names (``model.layers.*``,
``visual.*``, ``lm_head.*``) plus ``model.twig_layers.*``, ``model.high_res_layers.*`` and
``model.high_res_head.*`` tensors, and branch fields at the top of ``config.json``. Stock
transformers drops the extra tensors with a warning; here every extra tensor is consumed by the
heads or the load fails, and so does a head tensor that is missing.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qzoom_ray.model.heads import HEAD_MODULES, HEAD_PREFIX, QZoomHeads, QZoomHeadsSpec

logger = logging.getLogger(__name__)

HEADS_FILE = "qzoom_heads.safetensors"
HEADS_CONFIG_FILE = "qzoom_config.json"
SAFE_INDEX = "model.safetensors.index.json"
HEADS_SHARD = "model-qzoom-heads.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded faithfully (missing/unexpected/mismatched tensors)."""


def head_key_suffix(key: str) -> str | None:
    """``twig_layers.0.mlp...`` for any spelling of a head key (legacy ``model.``, 5.x ``model.language_model.``)."""
    for module in HEAD_MODULES:
        idx = key.find(module)
        if idx == 0 or (idx > 0 and key[idx - 1] == "."):
            return key[idx:]
    return None


def _safetensor_files(ckpt_dir: Path) -> list[Path]:
    index = ckpt_dir / SAFE_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({ckpt_dir / f for f in weight_map.values()})
    single = ckpt_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"no safetensors weights in {ckpt_dir} (expected model.safetensors or {SAFE_INDEX})")


def read_head_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """All head tensors in ``files``, keyed relative to :class:`QZoomHeads` (``twig_layers.0...``)."""
    out: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                suffix = head_key_suffix(key)
                if suffix is not None:
                    out[suffix] = f.get_tensor(key)
    return out


def load_heads_into(heads: QZoomHeads, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with a message that names what is wrong, instead of torch's generic one."""
    expected = heads.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = sorted(
        k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape)
    )
    if missing or unexpected or mismatched:
        spec = heads.spec
        parts = [
            f"Q-Zoom heads in {source} do not match the config (twig_K={spec.twig_K}, twig_T={spec.twig_T}, "
            f"enable_high_res={spec.enable_high_res})"
        ]
        if missing:
            parts.append(f"{len(missing)} missing tensors, e.g. {HEAD_PREFIX}{missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors, e.g. {HEAD_PREFIX}{unexpected[0]}")
        if mismatched:
            k = mismatched[0]
            parts.append(
                f"{len(mismatched)} shape mismatches, e.g. {k}: checkpoint {tuple(tensors[k].shape)} "
                f"vs model {tuple(expected[k].shape)}"
            )
        raise CheckpointError("; ".join(parts))
    heads.load_state_dict(tensors, strict=True)


def check_stock_load_info(info: dict[str, Any], consumed_head_keys: set[str], source: str) -> None:
    """Fail on anything stock transformers would silently skip, except head tensors we loaded ourselves."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    unexpected = sorted(info.get("unexpected_keys") or [])
    stray = [k for k in unexpected if head_key_suffix(k) not in consumed_head_keys]
    if missing or mismatched or stray:
        raise CheckpointError(
            f"backbone weights in {source} do not match the model: missing={missing[:5]} "
            f"(total {len(missing)}), mismatched={mismatched[:5]}, unconsumed={stray[:5]} (total {len(stray)})"
        )


def save_released_layout(model: torch.nn.Module, heads: QZoomHeads | None, out_dir: str | os.PathLike) -> Path:
    """Save ``model`` (stock save: legacy key names) plus ``heads`` as an extra shard and config fields."""
    out = Path(out_dir)
    model.save_pretrained(out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # A loaded Q-Zoom config carries the branch fields; they must describe exactly what is saved.
    for key in QZoomHeadsSpec.CONFIG_FIELDS:
        cfg.pop(key, None)
    if heads is not None:
        cfg.update(heads.spec.to_config_dict())
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if heads is None:
        return out

    head_sd = {HEAD_PREFIX + k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    save_file(head_sd, str(out / HEADS_SHARD), metadata={"format": "pt"})
    index_path = out / SAFE_INDEX
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:
        single = out / "model.safetensors"
        renamed = "model-backbone.safetensors"
        os.replace(single, out / renamed)
        with safe_open(str(out / renamed), framework="pt") as f:
            index = {"metadata": {}, "weight_map": dict.fromkeys(f.keys(), renamed)}
    index["weight_map"].update(dict.fromkeys(head_sd, HEADS_SHARD))
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    return out


def save_heads(heads: QZoomHeads, out_dir: str | os.PathLike) -> Path:
    """Heads alone, for a stock backbone kept elsewhere (``ModelConfig.heads_path``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {HEAD_PREFIX + k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    save_file(sd, str(out / HEADS_FILE), metadata={"format": "pt"})
    (out / HEADS_CONFIG_FILE).write_text(json.dumps(heads.spec.to_config_dict(), indent=2, sort_keys=True))
    return out


@dataclass(frozen=True)
class HeadsSource:
    spec: QZoomHeadsSpec | None
    files: list[Path]
    where: str


def find_heads(ckpt_dir: Path, heads_dir: Path | None) -> HeadsSource:
    """Where the head spec and tensors come from: a separate heads folder, or the checkpoint itself."""
    if heads_dir is not None:
        cfg_file = heads_dir / HEADS_CONFIG_FILE
        if not cfg_file.exists():
            raise CheckpointError(f"{heads_dir} has no {HEADS_CONFIG_FILE}")
        spec = QZoomHeadsSpec.from_config_dict(json.loads(cfg_file.read_text()))
        return HeadsSource(spec, [heads_dir / HEADS_FILE], str(heads_dir))
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    return HeadsSource(QZoomHeadsSpec.from_config_dict(cfg), _safetensor_files(ckpt_dir), str(ckpt_dir))
