"""Choose the twig's branch depth (K, T) on a backbone: train a twig per candidate on the same stage-1 labels,
from cached inputs at one budget, and compare how often its hottest cell lands in the evidence box of
held-out questions.

The spec's K / T are for the authors' 3B / 7B backbones; on another backbone the right depth is an
empirical question, and a full stage-1 run per candidate is hours. Caching the frozen part (vision
tower, embeddings) makes a candidate minutes: only the twig's layers run per step.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from qzoom_ray.model.heads import QZoomHeads
from qzoom_ray.train.common import set_trainable, twig_trainable
from qzoom_ray.train.forward import build_batch, encode, expand_to_square, image_columns
from qzoom_ray.train.labels import evidence_cells
from qzoom_ray.train.rpn import label_map, prepare_heads, selective_bce

logger = logging.getLogger(__name__)


@dataclass
class CachedSample:
    """One label row encoded at the probe's budget: everything before base layer 0, plus its targets."""

    embeds: torch.Tensor  # (1, seq, hidden)
    position_embeddings: tuple[torch.Tensor, ...]
    causal_mask: Any
    columns: slice  # the image tokens
    grid: tuple[int, int]
    labels: torch.Tensor  # tri-state label map at the label budget
    evidence: np.ndarray | None  # (h, w) cells of the evidence box on this grid
    group: str


def cache_samples(loaded: Any, rows: Iterable[dict[str, Any]], budget_tokens: int,
                  groups: dict[str, str] | None = None) -> list[CachedSample]:
    """Encode valid label rows at ``budget_tokens`` (rows without a usable map are skipped)."""
    a = loaded.adapter
    tok = loaded.processor.tokenizer
    pad, image_id = int(tok.pad_token_id), int(tok.convert_tokens_to_ids("<|image_pad|>"))
    out = []
    for r in tqdm(list(rows), desc=f"encoding at Max-{budget_tokens}", mininterval=5):
        if not r.get("valid", True):
            continue
        im = Image.open(io.BytesIO(bytes(r["image"]))).convert("RGB")
        box = r.get("evidence_box")
        if r.get("pad_to_square"):
            # The map covers the gray square (as stage 1 trains); the box moves with the centred image.
            w, h = im.size
            im, side = expand_to_square(im)
            dx, dy = (side - w) // 2, (side - h) // 2
            box = None if box is None else (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)
        wh = im.size
        enc = encode(loaded.processor, im, r["question"], budget_tokens, token_px=a.token_px)
        batch = build_batch(a, [enc], pad, image_id)
        out.append(CachedSample(
            embeds=batch.embeds,
            position_embeddings=batch.position_embeddings,
            causal_mask=batch.causal_mask,
            columns=image_columns(batch, [enc], 0),
            grid=enc.merged_grid,
            labels=torch.from_numpy(label_map(r)),
            evidence=None if box is None else evidence_cells(box, wh, enc.merged_grid),
            group=(groups or {}).get(str(r.get("id")), "all"),
        ))
    return out


def fresh_twig(loaded: Any, k: int, t: int) -> QZoomHeads:
    """A twig alone (no gate) at (k, t), copied from base layers k..k+t-1: stage 1's starting point."""
    return prepare_heads(loaded, k, t, enable_high_res=False, reuse_src_pos=True, twig_init=True, new_heads=True)


def _twig_map(loaded: Any, heads: QZoomHeads, h_k: torch.Tensor, s: CachedSample) -> torch.Tensor:
    kw = {"attention_mask": s.causal_mask, "position_embeddings": s.position_embeddings}
    scores, _ = loaded.adapter.roi_logits(heads.twig_score_layer, heads.twig_hidden(h_k, kw), s.position_embeddings)
    return scores[0, s.columns].reshape(s.grid)


def _hidden_k(loaded: Any, s: CachedSample, k: int) -> torch.Tensor:
    with torch.no_grad():
        return loaded.adapter.run_layers(s.embeds, 0, k, position_embeddings=s.position_embeddings,
                                         attention_mask=s.causal_mask, cache=None)


def peak_hit_rates(loaded: Any, heads: QZoomHeads, samples: list[CachedSample]) -> dict[str, tuple[float, int]]:
    """Per group: share of samples whose twig map peaks inside the evidence box, and how many were scored."""
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        for s in samples:
            if s.evidence is None:
                continue
            m = _twig_map(loaded, heads, _hidden_k(loaded, s, heads.spec.twig_K), s).numpy()
            r, c = np.unravel_index(int(m.argmax()), m.shape)
            hits.setdefault(s.group, []).append(bool(s.evidence[r, c]))
    return {g: (float(np.mean(v)), len(v)) for g, v in sorted(hits.items())}


def train_probe_twig(loaded: Any, samples: list[CachedSample], k: int, t: int, *, epochs: int, lr: float,
                     batch_size: int = 16, fg_weight: float | str = "balanced",
                     seed: int = 0) -> tuple[QZoomHeads, list[float]]:
    """A twig at (k, t), copied from base layers k..k+t-1 and trained as stage 1 trains it (AdamW, one-cycle);
    returns it with its mean loss per epoch."""
    a = loaded.adapter
    torch.manual_seed(seed)
    heads = fresh_twig(loaded, k, t)
    params = set_trainable(twig_trainable(heads), [a.model, heads])
    h_k = [_hidden_k(loaded, s, k) for s in samples]  # frozen: computed once
    steps_per_epoch = max(1, len(samples) // batch_size)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.05)
    rng = np.random.default_rng(seed)
    heads.train()
    t0 = time.perf_counter()
    history = []
    for epoch in range(epochs):
        order = rng.permutation(len(samples))
        losses = []
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            maps = [_twig_map(loaded, heads, h_k[i], samples[i]) for i in idx]
            loss = selective_bce(maps, [samples[i].labels for i in idx], fg_weight)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)))
        logger.info("K=%d T=%d epoch %d: loss %.4f (%.0f s)", k, t, epoch, history[-1], time.perf_counter() - t0)
    return heads.eval(), history


def probe_depths(loaded: Any, train: list[CachedSample], held_out: list[CachedSample],
                 depths: list[tuple[int, int]], *, epochs: int, lr: float, batch_size: int = 16,
                 seed: int = 0) -> list[dict[str, Any]]:
    """One result per (K, T): held-out hit rates per group before and after training, and the time taken."""
    results = []
    for k, t in depths:
        t0 = time.perf_counter()
        before = peak_hit_rates(loaded, fresh_twig(loaded, k, t).eval(), held_out)
        heads, history = train_probe_twig(loaded, train, k, t, epochs=epochs, lr=lr, batch_size=batch_size,
                                          seed=seed)
        results.append({
            "twig_K": k, "twig_T": t,
            "loss_by_epoch": [round(v, 4) for v in history],
            "held_out_hit_untrained": before,
            "held_out_hit": peak_hit_rates(loaded, heads, held_out),
            "train_hit": peak_hit_rates(loaded, heads, train[: len(held_out)]),
            "seconds": round(time.perf_counter() - t0, 1),
        })
    return results
