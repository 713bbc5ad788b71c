"""The patch embedding as a matrix product: same function, same parameters, same checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import engine_config, make_image_bytes
from torch import nn

from qzoom_ray.model.engine import QZoomEngine
from qzoom_ray.model.patch_embed import LinearPatchEmbed, use_linear_patch_embed
from qzoom_ray.model.state import EngineRecord


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_patch_embed_matches_the_conv(dtype):
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 40, kernel_size=(2, 14, 14), stride=(2, 14, 14), bias=False).to(dtype)
    pixels = torch.randn(37, 3 * 2 * 14 * 14)  # the processor's flattened patches, float32
    want = conv(pixels.view(-1, 3, 2, 14, 14).to(dtype)).view(-1, 40)
    got = LinearPatchEmbed(conv)(pixels)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_overlapping_or_grouped_convs_are_refused():
    with pytest.raises(ValueError):
        LinearPatchEmbed(nn.Conv3d(3, 8, kernel_size=(2, 14, 14), stride=(1, 7, 7)))
    with pytest.raises(ValueError):
        LinearPatchEmbed(nn.Conv3d(4, 8, kernel_size=2, stride=2, groups=2))


def test_engine_swaps_it_and_keeps_answers_and_state_dict(tiny_model_dir):
    records = [EngineRecord(f"r{i}", make_image_bytes(420 + 60 * i, 300, i), "Which code?") for i in range(3)]
    fast = QZoomEngine(engine_config(tiny_model_dir))
    stock = QZoomEngine(engine_config(tiny_model_dir, model={"linear_patch_embed": False}))
    assert isinstance(fast.adapter.model.model.visual.patch_embed, LinearPatchEmbed)
    assert not isinstance(stock.adapter.model.model.visual.patch_embed, LinearPatchEmbed)
    assert fast.adapter.model.state_dict().keys() == stock.adapter.model.state_dict().keys()
    got, want = fast.generate(records, return_logits=True), stock.generate(records, return_logits=True)
    for a, b in zip(got, want, strict=True):
        assert (a.answer, a.route, a.roi_box_px) == (b.answer, b.route, b.roi_box_px)
        torch.testing.assert_close(a.first_logits, b.first_logits, atol=1e-4, rtol=1e-4)
    # A second call is a no-op, not a wrapper around the wrapper.
    assert use_linear_patch_embed(fast.adapter.model)
    assert isinstance(fast.adapter.model.model.visual.patch_embed.proj, nn.Conv3d)
