"""The direct route's own decoder (``ModelConfig.direct_route_path``, beyond the paper).

Stage 2 fine-tunes the decoder layers and lm_head on zoomed rows, and the same weights then answer the
records the gate does not zoom: on the benchmark they answer those a little worse than the base model
(counting most). Answering direct records with the base model's decoder instead, and zoomed ones with
the stage-2 decoder, gives a record that is not zoomed exactly the base model's answer. The two routes
share the vision tower, the embeddings, the RoI heads and the gate, and, below twig_K, the decoder
layers whose KV the zoom pass reuses: all checked here, so the split changes only what it claims to.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from qzoom_ray.model.backbone import BackboneAdapter, adapter_for
from qzoom_ray.model.checkpoint import CheckpointError

logger = logging.getLogger(__name__)


class TextStack(nn.Module):
    """Decoder layers, final norm and lm_head: what an adapter view decodes with."""

    def __init__(self, layers: nn.ModuleList, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.layers, self.norm, self.lm_head = layers, norm, lm_head


def _same(a: nn.Module, b: nn.Module) -> str | None:
    """None when the two modules hold equal tensors under equal names, else the first difference."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return f"different parameters ({sorted(set(sa) ^ set(sb))[:3]})"
    for name, t in sa.items():
        if t.shape != sb[name].shape or not torch.equal(t, sb[name].to(t.device, t.dtype)):
            return f"{name} differs"
    return None


def check_compatible(main: BackboneAdapter, other: BackboneAdapter, shared_layers: int, path: str) -> None:
    """Refuse a direct-route model that would not give its own answers when run on the main model's inputs."""
    mc, oc = main.text_config, other.text_config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        if getattr(mc, key, None) != getattr(oc, key, None):
            raise CheckpointError(f"direct_route_path {path}: text config {key} {getattr(oc, key, None)} != "
                                  f"the checkpoint's {getattr(mc, key, None)}")
    theirs = other.shared_parts()
    parts = {name: (m, theirs[name]) for name, m in main.shared_parts().items()}
    parts.update({f"decoder layer {i}": (main.layers[i], other.layers[i]) for i in range(shared_layers)})
    for name, (a, b) in parts.items():
        why = _same(a, b)
        if why is not None:
            raise CheckpointError(
                f"direct_route_path {path}: its {name} is not the checkpoint's ({why}); the direct route shares "
                "them, so its answers would not be that model's. Use the base model stage 2 started from."
            )


def load_direct_adapter(
    main: BackboneAdapter, ckpt_dir: Path, path: str, shared_layers: int, dtype: torch.dtype, attn: str
) -> BackboneAdapter:
    """A view of ``main`` that decodes with the decoder of the model at ``ckpt_dir``; the rest of it is dropped."""
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its Q-Zoom head tensors are not wanted here; transformers lists them
    try:
        other_model = AutoModelForImageTextToText.from_pretrained(ckpt_dir, dtype=dtype, attn_implementation=attn)
    finally:
        hf_logging.set_verbosity(previous)
    other = adapter_for(other_model)
    check_compatible(main, other, shared_layers, path)
    stack = other.text_stack_of().to(main.device).eval()
    for p in stack.parameters():
        p.requires_grad_(False)
    logger.info("direct route answers with the decoder of %s (%d layers)", ckpt_dir, len(stack.layers))
    return main.with_text_stack(stack)
