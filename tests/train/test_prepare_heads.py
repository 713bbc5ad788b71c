"""Stage 1's heads: kept from the checkpoint, or rebuilt at another branch depth with ``new_heads``."""

from __future__ import annotations

import pytest
import torch

from qzoom_ray.config import ModelConfig
from qzoom_ray.model.loader import load_model
from qzoom_ray.train.rpn import prepare_heads


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(ModelConfig(path=tiny_model_dir, require_heads=False, device="cpu"))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_heads_are_kept_by_default(loaded):
    old = loaded.heads
    with torch.no_grad():  # make the checkpoint's twig differ from any base layer
        old.twig_layers[0].mlp.down_proj.weight.add_(0.5)
    heads = prepare_heads(loaded, None, 2, True, True, twig_init=False)
    assert (heads.spec.twig_K, heads.spec.twig_T) == (old.spec.twig_K, old.spec.twig_T)
    assert _same(heads.twig_layers, old.twig_layers)
    assert _same(heads.high_res_head, old.high_res_head)


def test_another_depth_needs_new_heads(loaded):
    k = loaded.heads.spec.twig_K - 2
    with pytest.raises(ValueError, match="new_heads"):
        prepare_heads(loaded, k, 2, True, True, twig_init=True)


def test_new_heads_are_rebuilt_from_base_layers_at_the_new_depth(loaded):
    base = loaded.adapter.layers
    k = loaded.heads.spec.twig_K - 2
    heads = prepare_heads(loaded, k, 2, True, True, twig_init=False, new_heads=True)
    assert (heads.spec.twig_K, heads.spec.twig_T, heads.spec.high_res_K, heads.spec.high_res_T) == (k, 2, k, 2)
    for i in range(2):
        assert _same(heads.twig_layers[i], base[k + i])
        assert _same(heads.high_res_layers[i], base[k + i])
    assert not _same(heads.twig_layers[0], loaded.heads.twig_layers[0])
