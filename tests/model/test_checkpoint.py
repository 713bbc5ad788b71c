"""Released-layout checkpoints: written like the authors' 4.51 checkpoints, loaded strictly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qzoom_ray.config import ModelConfig
from qzoom_ray.model.checkpoint import HEADS_SHARD, SAFE_INDEX, CheckpointError, save_heads
from qzoom_ray.model.heads import QZoomHeadsSpec
from qzoom_ray.model.loader import load_model


def all_keys(ckpt: Path) -> set[str]:
    index = json.loads((ckpt / SAFE_INDEX).read_text())
    keys = set()
    for name in set(index["weight_map"].values()):
        with safe_open(str(ckpt / name), framework="pt") as f:
            keys.update(f.keys())
    assert keys == set(index["weight_map"])
    return keys


def test_written_in_released_451_layout(tiny_model_dir):
    ckpt = Path(tiny_model_dir)
    keys = all_keys(ckpt)
    assert any(k.startswith("model.layers.") for k in keys)
    assert any(k.startswith("visual.") for k in keys)
    assert "lm_head.weight" in keys
    assert not any(k.startswith("model.language_model.") or k.startswith("model.visual.") for k in keys)
    for prefix in ("model.twig_layers.", "model.high_res_layers.", "model.high_res_head."):
        assert any(k.startswith(prefix) for k in keys), prefix
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["enable_twig"] and cfg["enable_high_res"]
    assert (cfg["twig_K"], cfg["twig_T"]) == (3, 3)
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]


def test_loads_every_tensor_with_nothing_missing(tiny_model_dir):
    loaded = load_model(ModelConfig(path=tiny_model_dir))
    head_sd = load_file(str(Path(tiny_model_dir) / HEADS_SHARD))
    assert len(head_sd) == len(loaded.heads.state_dict())
    for key, value in head_sd.items():
        torch.testing.assert_close(loaded.heads.state_dict()[key.removeprefix("model.")], value)
    # The twig was initialised from base layers K..K+T-1 (the init the paper describes).
    base = loaded.adapter.layers[3].mlp.up_proj.weight
    torch.testing.assert_close(loaded.heads.twig_layers[0].mlp.up_proj.weight, base)


def _copy_with_heads(src: str, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    shard = dst / HEADS_SHARD
    tensors = load_file(str(shard))
    tensors = edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((dst / SAFE_INDEX).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != HEADS_SHARD}
    index["weight_map"].update(dict.fromkeys(tensors, HEADS_SHARD))
    (dst / SAFE_INDEX).write_text(json.dumps(index))
    return dst


def test_missing_head_tensor_fails_with_clear_message(tiny_model_dir, tmp_path):
    missing = "model.twig_layers.2.self_attn.k_proj.weight"
    ckpt = _copy_with_heads(tiny_model_dir, tmp_path / "ckpt", lambda t: {k: v for k, v in t.items() if k != missing})
    with pytest.raises(CheckpointError, match=r"1 missing tensors, e.g. model\.twig_layers\.2\.self_attn\.k_proj\.weight"):
        load_model(ModelConfig(path=str(ckpt)))


def test_missing_gate_head_fails(tiny_model_dir, tmp_path):
    ckpt = _copy_with_heads(
        tiny_model_dir, tmp_path / "ckpt", lambda t: {k: v for k, v in t.items() if "high_res_head" not in k}
    )
    with pytest.raises(CheckpointError, match="high_res_head"):
        load_model(ModelConfig(path=str(ckpt)))


def test_stray_extra_tensor_fails(tiny_model_dir, tmp_path):
    def add(t):
        t["model.twig_layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)
        return t

    ckpt = _copy_with_heads(tiny_model_dir, tmp_path / "ckpt", add)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_model(ModelConfig(path=str(ckpt)))


def test_stock_backbone_with_separately_saved_heads(tiny_model_dir, tmp_path):
    loaded = load_model(ModelConfig(path=tiny_model_dir))
    stock = tmp_path / "stock"
    loaded.adapter.model.save_pretrained(stock)  # plain transformers save: no head tensors
    loaded.processor.save_pretrained(stock)
    cfg = json.loads((stock / "config.json").read_text())
    assert not set(cfg) & set(QZoomHeadsSpec.CONFIG_FIELDS), "a plain save must not claim heads"
    # A config that declares branches without their tensors is an error of its own.
    (stock / "config.json").write_text(json.dumps({**cfg, **loaded.heads.spec.to_config_dict()}))
    with pytest.raises(CheckpointError, match="74 missing tensors"):
        load_model(ModelConfig(path=str(stock)))
    (stock / "config.json").write_text(json.dumps(cfg))
    heads_dir = save_heads(loaded.heads, tmp_path / "heads")

    with pytest.raises(CheckpointError, match="no Q-Zoom heads"):
        load_model(ModelConfig(path=str(stock)))
    assert load_model(ModelConfig(path=str(stock), require_heads=False)).heads is None

    again = load_model(ModelConfig(path=str(stock), heads_path=str(heads_dir)))
    for key, value in loaded.heads.state_dict().items():
        torch.testing.assert_close(again.heads.state_dict()[key], value)


def test_hub_id_offline_fails_clearly():
    with pytest.raises(FileNotFoundError, match="cannot fetch"):
        load_model(ModelConfig(path="YuhengSSS/Q-Zoom-Qwen2.5VL-7B"))
