"""The padded single-call vision attention computes what transformers' per-window loop computes."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.nn import functional as F

from qzoom_ray.model.vision_attention import ATTN_NAME, padded_varlen_attention, use_padded_vision_attention


class _Module(torch.nn.Module):
    pass


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6), heads=st.integers(1, 3), seed=st.integers(0, 99))
def test_padded_attention_equals_attention_per_segment(lengths, heads, seed):
    g = torch.Generator().manual_seed(seed)
    total, dim = sum(lengths), 8
    q, k, v = (torch.randn(1, heads, total, dim, generator=g) for _ in range(3))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    out, _ = padded_varlen_attention(_Module(), q, k, v, scaling=dim**-0.5, cu_seq_lens_q=cu)
    assert out.shape == (1, total, heads, dim)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        ref = F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=dim**-0.5)
        torch.testing.assert_close(out[:, a:b], ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_padded_attention_needs_segment_boundaries():
    q = torch.zeros(1, 1, 4, 8)
    try:
        padded_varlen_attention(_Module(), q, q, q)
    except ValueError as e:
        assert "cu_seq_lens_q" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_the_tower_gives_the_same_features_and_gradients_and_the_config_saves_clean(tiny_model_dir, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qzoom_ray.model.processor import image_size_kwargs, load_processor

    processor = load_processor(str(tiny_model_dir))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa")
    rng = np.random.default_rng(0)
    pixels, grids = [], []
    # Images of different sizes: windows of several lengths and a full-attention block over unequal images.
    for h, w in [(300, 500), (700, 420), (56, 84)]:
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        enc = processor.image_processor(images=[image], return_tensors="pt", **image_size_kwargs(h * w, h * w))
        pixels.append(enc["pixel_values"])
        grids.append(enc["image_grid_thw"])
    pv, thw = torch.cat(pixels).requires_grad_(), torch.cat(grids)
    visual = model.model.visual

    def features_and_grads():
        feats = visual(pv, grid_thw=thw).pooler_output
        return feats.detach(), torch.autograd.grad(feats.square().sum(), [pv, *visual.parameters()])

    ref_feats, ref_grads = features_and_grads()
    use_padded_vision_attention(model)
    assert model.config.vision_config._attn_implementation == ATTN_NAME
    assert model.config.text_config._attn_implementation == "sdpa"  # the language model keeps its kernel
    feats, grads = features_and_grads()
    torch.testing.assert_close(feats, ref_feats, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)
    model.save_pretrained(str(tmp_path))
    assert ATTN_NAME not in (tmp_path / "config.json").read_text()
