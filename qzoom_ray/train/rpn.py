"""Stage 1: train the twig (SD-RPN) on pseudo-label maps (spec §1.4).

Frozen base layers 0..K-1 run under no_grad; the T-1 full twig layers and the last twig layer's
q/k scoring are the only graph; nothing past the twig runs (no base layers >= K, no lm_head: spec
§8.18). Loss: BCE on cells labelled 0/1, -100 ignored, the prediction bilinearly resized to the
label grid when the two differ.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field

from qzoom_ray.eval.metrics import exact_match
from qzoom_ray.model.heads import QZoomHeads, QZoomHeadsSpec
from qzoom_ray.train.common import (
    LossModule,
    StageConfig,
    endless,
    load_for_training,
    read_rows,
    run_stage,
    save_checkpoint,
    set_trainable,
    shard_rows,
    train_and_report,
    twig_trainable,
    worker_setup,
)
from qzoom_ray.train.forward import Encoded, build_batch, encode, expand_to_square, hidden_at_k, image_columns


class RpnConfig(StageConfig):
    twig_K: int | None = Field(None, description="Branch point K; None: the starting checkpoint's (required for a base model).")
    twig_T: int = Field(3, ge=2, description="Twig depth T (used when the checkpoint has no heads yet).")
    enable_high_res: bool = Field(True, description="Also build the gate branch (trained in stage 3).")
    reuse_src_pos: bool = Field(True, description="Written to config.json: stage 2 trains with aligned positions.")
    twig_init: bool = Field(True, description="Copy base layers K..K+T-1 into the twig before training.")
    new_heads: bool = Field(
        False,
        description="Discard the starting checkpoint's heads (twig and gate) and build new ones at twig_K / twig_T from "
        "its own base layers: re-branching a fine-tuned checkpoint at another depth.",
    )
    budget_tokens: int | list[int] | None = Field(
        None,
        description="Image budget while training; a list: one drawn per batch (seeded; repeat a value to weight it), "
        "for a twig that serves every budget of the ladder; None: each row's label budget.",
    )
    fg_weight: float | Literal["balanced"] = Field(
        1.0,
        description="Weight of foreground cells in the BCE. 1.0: the paper's plain mean. 'balanced': n_bg / n_fg of "
        "each batch, for backbones whose attention is so peaked that foreground is a fraction of a percent of the "
        "labelled cells (a plain mean then learns 'background everywhere').",
    )
    correct_answers_only: bool = Field(
        False,
        description="Beyond the paper: train only on maps whose label-time answer matches the row's ground truth "
        "(normalised exact match; rows without one are kept). Where the base model misreads, as on text too small "
        "even at the label budget, its attention does not point at the evidence either.",
    )
    lr: float = 1e-4


def copy_base_layers(branch: torch.nn.ModuleList, base_layers: torch.nn.ModuleList, start: int) -> None:
    """branch[i] <- base layer start+i (the initialisation the paper describes, spec §1.1 / §2.4)."""
    if start + len(branch) > len(base_layers):
        raise ValueError(f"base layers {start}..{start + len(branch) - 1} do not exist ({len(base_layers)} layers)")
    for i, layer in enumerate(branch):
        layer.load_state_dict(base_layers[start + i].state_dict())


def prepare_heads(loaded: Any, k: int | None, t: int, enable_high_res: bool, reuse_src_pos: bool,
                  twig_init: bool, new_heads: bool = False) -> QZoomHeads:
    """Heads for stage 1: the starting checkpoint's (a base model has none: new ones from backbone copies).

    A gate branch that did not exist yet is initialised from base layers K..K+T-1 too. ``new_heads`` ignores
    the checkpoint's heads, so twig and gate are rebuilt at (k, t) from its base layers.
    """
    a = loaded.adapter
    old = None if new_heads else loaded.heads
    if old is None and k is None:
        raise ValueError("the starting checkpoint has no Q-Zoom heads: set twig_K")
    if old is not None and k not in (None, old.spec.twig_K):
        raise ValueError(
            f"twig_K={k} differs from the checkpoint's {old.spec.twig_K}: set new_heads: true to rebuild the heads "
            "at the new depth (the checkpoint's twig and gate are discarded)"
        )
    k = old.spec.twig_K if old is not None else k
    t = old.spec.twig_T if old is not None else t
    gate = enable_high_res or (old is not None and old.spec.enable_high_res)
    heads = QZoomHeads(QZoomHeadsSpec(True, k, t, gate, k, t, reuse_src_pos), a.text_config, a.decoder_layer_cls)
    heads.to(device=a.device, dtype=a.dtype)
    if old is not None:
        heads.twig_layers.load_state_dict(old.twig_layers.state_dict())
    if twig_init or old is None:
        copy_base_layers(heads.twig_layers, a.layers, k)
    if gate:
        if old is not None and old.has_gate:
            heads.high_res_layers.load_state_dict(old.high_res_layers.state_dict())
            heads.high_res_head.load_state_dict(old.high_res_head.state_dict())
        else:
            copy_base_layers(heads.high_res_layers, a.layers, k)
    return heads


def _image(value: Any, pad_to_square: bool) -> Image.Image:
    im = Image.open(io.BytesIO(bytes(value))).convert("RGB")
    return expand_to_square(im)[0] if pad_to_square else im


def label_map(row: dict[str, Any]) -> np.ndarray:
    return np.asarray(row["labels"], dtype=np.int64).reshape(int(row["grid_h"]), int(row["grid_w"]))


def selective_bce(
    logit_maps: list[torch.Tensor], labels: list[torch.Tensor], fg_weight: float | str = 1.0
) -> torch.Tensor:
    """Mean BCE over every cell labelled 0/1 in the batch; predictions resized to their label grid.

    ``fg_weight`` scales the foreground cells' terms; ``"balanced"`` uses n_bg / n_fg of the batch, so both
    classes weigh the same in the mean.
    """
    logits, targets = [], []
    for pred, lab in zip(logit_maps, labels, strict=True):
        if pred.shape != lab.shape:
            pred = F.interpolate(pred[None, None], size=tuple(lab.shape), mode="bilinear", align_corners=False)[0, 0]
        keep = lab >= 0
        logits.append(pred[keep])
        targets.append(lab[keep].to(pred.dtype))
    logit = torch.cat(logits)
    if logit.numel() == 0:
        return sum(p.sum() for p in logit_maps) * 0.0  # keeps the graph so every rank still syncs
    target = torch.cat(targets).float()
    if fg_weight == "balanced":
        n_fg = float(target.sum())
        weight = (target.numel() - n_fg) / n_fg if n_fg > 0 else 1.0
    else:
        weight = float(fg_weight)
    if weight == 1.0:
        return F.binary_cross_entropy_with_logits(logit.float(), target)
    return F.binary_cross_entropy_with_logits(logit.float(), target, pos_weight=torch.tensor(weight, device=logit.device))


def label_row_usable(row: dict[str, Any], correct_answers_only: bool = False) -> bool:
    """A label row teaches the twig: its map is valid and, if asked, its answer agrees with the ground truth."""
    if not row.get("valid", True):
        return False
    gt = row.get("gt_answer")
    if not correct_answers_only or gt is None or not str(gt).strip():
        return True
    return exact_match(str(row.get("answer") or ""), [str(gt)]) == 1.0


def usable_batch(rows: list[dict[str, Any]], correct_answers_only: bool = False) -> list[dict[str, Any]]:
    """The batch's usable rows; none usable: its rows with every cell ignored (a zero loss that still keeps every
    rank stepping together), never rows whose labels were filtered out."""
    keep = [r for r in rows if label_row_usable(r, correct_answers_only)]
    return keep or [{**r, "labels": [-100] * len(r["labels"])} for r in rows]


def twig_logit_maps(loaded: Any, heads: QZoomHeads, enc: list[Encoded]) -> list[torch.Tensor]:
    """Per sample, the twig's (h, w) RoI logit map; gradients flow into the twig only."""
    a = loaded.adapter
    tok = loaded.processor.tokenizer
    batch = build_batch(a, enc, int(tok.pad_token_id), int(tok.convert_tokens_to_ids("<|image_pad|>")))
    h_k = hidden_at_k(a, batch, heads.spec.twig_K)
    kw = {"attention_mask": batch.causal_mask, "position_embeddings": batch.position_embeddings}
    twig_h = heads.twig_hidden(h_k, kw)
    scores, _ = a.roi_logits(heads.twig_score_layer, twig_h, batch.position_embeddings)
    return [scores[b, image_columns(batch, enc, b)].reshape(e.merged_grid) for b, e in enumerate(enc)]


def rpn_loss_fn(loaded: Any, heads: QZoomHeads, budget_tokens: int | list[int] | None, fg_weight: float | str = 1.0,
                seed: int = 0):
    proc = loaded.processor
    # One budget per batch, not per row: a batch padded to its longest view would waste the short ones' compute.
    rng = np.random.default_rng(seed)

    def loss(rows: list[dict[str, Any]]) -> torch.Tensor:
        budget = int(rng.choice(budget_tokens)) if isinstance(budget_tokens, list) else budget_tokens
        enc = [encode(proc, _image(r["image"], bool(r.get("pad_to_square"))), r["question"],
                      budget or int(r["budget_tokens"]), token_px=loaded.adapter.token_px) for r in rows]
        maps = twig_logit_maps(loaded, heads, enc)
        labels = [torch.from_numpy(label_map(r)).to(maps[0].device) for r in rows]
        return selective_bce(maps, labels, fg_weight)

    return loss


def rpn_worker(config: dict[str, Any]) -> None:
    cfg = RpnConfig.model_validate(config)
    rank, device = worker_setup(cfg)
    loaded = load_for_training(cfg, device)
    heads = prepare_heads(
        loaded, cfg.twig_K, cfg.twig_T, cfg.enable_high_res, cfg.reuse_src_pos, cfg.twig_init, cfg.new_heads
    )
    set_trainable(twig_trainable(heads), [loaded.adapter.model, heads])
    heads.train()
    module = LossModule(heads, rpn_loss_fn(loaded, heads, cfg.budget_tokens, cfg.fg_weight, cfg.seed + rank))
    shards = endless(shard_rows(cfg.batch_size, cfg.seed + rank))
    batches = (usable_batch(rows, cfg.correct_answers_only) for rows in shards)
    train_and_report(cfg, rank, module, batches, lambda out: save_checkpoint(loaded, heads.eval(), out))


def train_rpn(cfg: RpnConfig) -> dict[str, Any]:
    cols = ["valid", "answer", "gt_answer"] if cfg.correct_answers_only else ["valid"]
    rows = read_rows(cfg.data_path, cols)
    summary = {"rows": len(rows), "valid_maps": sum(bool(r["valid"]) for r in rows)}
    if cfg.correct_answers_only:
        summary["correct_answer_maps"] = sum(label_row_usable(r, True) for r in rows)
    return run_stage("rpn", rpn_worker, cfg, summary)
