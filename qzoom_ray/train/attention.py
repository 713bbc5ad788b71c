"""Answer-token -> image-token attention for chosen (layer, head) pairs, without eager attention.

The authors run the whole model with ``output_attentions=True`` and eager attention in every layer to
read a handful of heads (spec §1.5, §8.22). Here a forward pre-hook on the ``self_attn`` of ONLY the
listed layers recomputes ``softmax(q k^T / sqrt(d))`` from the layer's own q/k projections and rotary
embedding, for the listed heads and the query rows of interest; the layer itself keeps running with
whatever fast kernel the model was loaded with. The probabilities are over every key the row may
see (causal + padding mask), exactly the rows eager attention would return.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

HeadSet = dict[int, list[int] | None]  # layer -> heads (None: every head of that layer)


def parse_heads(spec: dict | None) -> HeadSet:
    """YAML/JSON keys arrive as strings; normalise to ``{int: [int] | None}``."""
    return {int(k): (None if v is None else [int(h) for h in v]) for k, v in (spec or {}).items()}


def merge_head_sets(*sets: HeadSet) -> HeadSet:
    out: HeadSet = {}
    for s in sets:
        for layer, heads in s.items():
            if heads is None or out.get(layer, []) is None:
                out[layer] = None
            else:
                out[layer] = sorted(set(out.get(layer) or []) | set(heads))
    return out


class AttentionCapture:
    """Context manager that records attention probabilities ``(heads, rows, keys)`` per layer and batch row.

    Call :meth:`set_targets` before each forward with, per batch row, the query positions, the key
    positions to keep (e.g. the image tokens) and the 0/1 padding mask of the row.
    """

    def __init__(self, layers: nn.ModuleList, heads: HeadSet):
        bad = [layer for layer in heads if not 0 <= layer < len(layers)]
        if bad:
            raise ValueError(f"layers {bad} do not exist (the model has {len(layers)})")
        self.layers = layers
        self.heads = heads
        self.results: dict[int, list[torch.Tensor]] = {}
        self._handles: list = []
        self._targets: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None = None

    @property
    def deepest_layer(self) -> int:
        return max(self.heads)

    def set_targets(self, rows: Sequence[torch.Tensor], keys: Sequence[torch.Tensor], pad_mask: torch.Tensor) -> None:
        self._targets = (list(rows), list(keys), pad_mask)
        self.results = {}

    def __enter__(self) -> AttentionCapture:
        for layer in self.heads:
            attn = self.layers[layer].self_attn
            self._handles.append(attn.register_forward_pre_hook(self._hook(layer), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            if self._targets is None:
                raise RuntimeError("AttentionCapture.set_targets was not called before the forward")
            with torch.no_grad():
                self.results[layer] = [
                    row_attention_probs(module, hidden[b], cos[b], sin[b], self.heads[layer], rows, pad)[:, :, keys].cpu()
                    for b, (rows, keys, pad) in enumerate(zip(*self._targets[:2], self._targets[2], strict=True))
                ]

        return hook


def row_attention_probs(
    attn: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: list[int] | None,
    rows: torch.Tensor,
    pad: torch.Tensor,
) -> torch.Tensor:
    """Softmax attention of one sequence's ``rows`` over all its visible keys, for ``heads``: (h, r, seq).

    Differentiable: the stage-1 labeller calls it under no_grad, the grounding loss trains through it.
    """
    seq = x.shape[0]
    d = attn.head_dim
    q = attn.q_proj(x[rows]).view(len(rows), -1, d).transpose(0, 1)[None]  # (1, H, R, d)
    k = attn.k_proj(x).view(seq, -1, d).transpose(0, 1)[None]  # (1, Hkv, S, d)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms come before the rotary embedding
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, _ = apply_rotary_pos_emb(q, q, cos[rows][None], sin[rows][None])
    _, k = apply_rotary_pos_emb(k, k, cos[None], sin[None])
    n_heads, n_kv = q.shape[1], k.shape[1]
    sel = torch.arange(n_heads, device=x.device) if heads is None else torch.tensor(heads, device=x.device)
    q = q[0, sel].float()
    k = k[0, sel // (n_heads // n_kv)].float()  # the kv head each query head reads (GQA)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (d**-0.5)  # (h, R, S)
    visible = (torch.arange(seq, device=x.device)[None, :] <= rows[:, None]) & pad.bool()[None, :]
    return torch.softmax(scores.masked_fill(~visible[None], float("-inf")), dim=-1)


def head_maps(
    capture: AttentionCapture, b: int, grid_hw: tuple[int, int]
) -> dict[tuple[int, int], torch.Tensor]:
    """Per (layer, head): batch row ``b``'s attention averaged over its query rows, as a (h, w) grid map."""
    out = {}
    for layer, per_row in capture.results.items():
        probs = per_row[b].mean(dim=1)  # average over answer tokens (the authors' decode-step mean)
        heads = capture.heads[layer]
        ids = range(probs.shape[0]) if heads is None else heads
        for i, h in enumerate(ids):
            out[(layer, int(h))] = probs[i].reshape(grid_hw)
    return out


def aggregate(maps: dict[tuple[int, int], torch.Tensor], heads: HeadSet) -> torch.Tensor | None:
    """Mean of the listed heads' maps (the authors sum then divide by the head count); None for no heads."""
    picked = []
    for layer, hs in heads.items():
        picked += [m for (lay, h), m in maps.items() if lay == layer and (hs is None or h in hs)]
    if not picked:
        return None
    return torch.stack(picked).mean(dim=0)
