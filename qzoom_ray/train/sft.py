"""Stage 2: mine regressions of the RoI path and fine-tune the decoder on them (spec §4).

Mining: the same stage-1 checkpoint answers every question twice, plain (baseline mode = the base
VLM, whose layers stage 1 did not touch) and with the RoI path always on (gate threshold 0); a
pluggable judge marks each answer right or wrong. Regressions (base right, RoI wrong) become the
training set, optionally mixed with improvements.

Training: pass 1 (coarse, twig map, box, crop) runs through the engine under inference mode, with
the query at the last PROMPT token (the authors' Qwen2.5 code used the last token of the whole
training sequence, spec §8.10); pass 2 re-runs all L layers on the spliced sequence with the RoI positions
(aligned, or a fresh grid) and teacher-forced answer tokens; CE on the answer only. Trainable: every base
decoder layer + lm_head (not embeddings, final norm, ViT or heads).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import Field

from qzoom_ray import geometry
from qzoom_ray.config import EngineConfig, ModelConfig, StrictModel
from qzoom_ray.model.state import EngineRecord, ZoomRequest
from qzoom_ray.train.common import (
    LossModule,
    StageConfig,
    endless,
    load_for_training,
    run_stage,
    save_checkpoint,
    set_trainable,
    shard_rows,
    train_and_report,
    worker_setup,
)
from qzoom_ray.train.data import IGNORE_INDEX
from qzoom_ray.train.forward import left_pad
from qzoom_ray.train.judges import Judge, LlmJudge, MetricJudge, answers_of


# ---------------------------------------------------------------------------------------------- mining
class MineConfig(StrictModel):
    model: ModelConfig = Field(..., description="The stage-1 checkpoint (baseline mode on it = the base VLM).")
    budget_tokens: int = Field(576, ge=4, description="Both paths see the image at exactly this budget (authors: 576).")
    roi_thresh: float = Field(0.1, ge=0, description="tau_roi of the always-on RoI path.")
    roi_thresh_mode: Literal["absolute", "peak_relative"] = Field(
        "absolute", description="How roi_thresh is read (ZoomConfig.roi_thresh_mode): mine with the serving rule."
    )
    roi_max_downscale: float | None = Field(
        None, ge=1.0, description="The serving cap on the box (ZoomConfig.roi_max_downscale); None: no cap."
    )
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(8, ge=1)
    judge: Literal["metric", "llm"] = "metric"
    judge_model: ModelConfig | None = Field(None, description="Judge checkpoint for judge='llm'.")
    pass_score: float = Field(0.5, description="Metric judge: correct iff score >= this.")
    target: Literal["base", "ground_truth"] = Field(
        "base", description="SFT target: the base model's (correct) answer, or the ground truth (--use-gt)."
    )
    torch_threads: int | None = None


def engine_config(model: ModelConfig, mode: str, budget_tokens: int, roi_thresh: float = 0.1,
                  batch_size: int = 8, max_new_tokens: int = 32, roi_thresh_mode: str = "absolute",
                  roi_max_downscale: float | None = None) -> EngineConfig:
    """The engine of mining and of training's pass 1: exactly ``budget_tokens``, every record gated, and the RoI
    positions the checkpoint records (a model is mined as it is served)."""
    px = budget_tokens * 28**2
    return EngineConfig.model_validate({
        "model": model.model_dump(),
        "zoom": {"mode": mode, "gate_thresh": 0.0, "roi_thresh": roi_thresh, "roi_thresh_mode": roi_thresh_mode,
                 "roi_max_downscale": roi_max_downscale, "min_pixels": px, "max_pixels": px},
        "generation": {"max_new_tokens": max_new_tokens},
        "max_batch_size": batch_size,
    })


def mine_engine(cfg: MineConfig, mode: str, loaded: Any = None) -> Any:
    """An engine on ``cfg.model`` at exactly ``cfg.budget_tokens``: baseline mode = model A, qzoom = model B."""
    from qzoom_ray.model.engine import QZoomEngine

    return QZoomEngine(engine_config(cfg.model, mode, cfg.budget_tokens, cfg.roi_thresh, cfg.batch_size,
                                     cfg.max_new_tokens, cfg.roi_thresh_mode, cfg.roi_max_downscale), loaded=loaded)


class RegressionMiner:
    """Rows in (id, image, question, answer/answers, metric, choices); every row out with A/B verdicts."""

    def __init__(self, cfg: MineConfig, loaded: Any = None, judge: Judge | None = None):
        from qzoom_ray.model.engine import QZoomEngine
        from qzoom_ray.model.loader import load_model

        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        loaded = loaded or load_model(cfg.model)
        self.base = mine_engine(cfg, "baseline", loaded)
        self.roi = mine_engine(cfg, "qzoom", loaded)
        if judge is None and cfg.judge == "llm":
            if cfg.judge_model is None:
                raise ValueError("judge='llm' needs judge_model")
            judge = LlmJudge(QZoomEngine(engine_config(cfg.judge_model, "baseline", 4, batch_size=cfg.batch_size)))
        self.judge = judge or MetricJudge(cfg.pass_score)

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        recs = [EngineRecord(str(i), _image_bytes(r["image"]), str(r["question"])) for i, r in enumerate(rows)]
        base = self.base.generate(recs)
        roi = self.roi.generate(recs)
        preds_a = [r.answer or "" for r in base]
        preds_b = [r.answer or "" for r in roi]
        verdicts = self.judge(rows, preds_a, preds_b)
        out = []
        for r, a, b, ra, (ok_a, ok_b) in zip(rows, preds_a, preds_b, roi, verdicts, strict=True):
            zoomed = ra.route == "zoom"  # a fallback answered directly: not a verdict on the RoI path
            kind = "regression" if ok_a and not ok_b and zoomed else "improvement" if ok_b and not ok_a and zoomed else "same"
            out.append({
                "id": str(r.get("id", "")), "image": _image_bytes(r["image"]), "question": str(r["question"]),
                "answers": answers_of(r), "base_prediction": a, "roi_prediction": b, "base_ok": ok_a, "roi_ok": ok_b,
                "roi_route": ra.route, "kind": kind,
                "target": a if self.cfg.target == "base" and ok_a else (answers_of(r) or [a])[0],
            })
        return out


class DirectAnswerer:
    """The miner's model A alone: the starting checkpoint's plain answer at the training budget. Kept as the
    target of a direct row (no crop), it anchors the global-view path, which stage 2 would otherwise drift."""

    def __init__(self, cfg: MineConfig):
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.engine = mine_engine(cfg, "baseline")

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        recs = [EngineRecord(str(i), _image_bytes(r["image"]), str(r["question"])) for i, r in enumerate(rows)]
        return [{"id": str(r.get("id", "")), "image": _image_bytes(r["image"]), "question": str(r["question"]),
                 "target": (res.answer or "") if res.error is None else "", "kind": "direct"}
                for r, res in zip(rows, self.engine.generate(recs), strict=True)]


def direct_answerer_factory(cfg: dict[str, Any]) -> DirectAnswerer:
    return DirectAnswerer(MineConfig.model_validate(cfg))


def _image_bytes(value: Any) -> bytes:
    return bytes(value["bytes"] if isinstance(value, dict) else value)


def select_training_rows(rows: list[dict[str, Any]], mixing_ratio: float, seed: int) -> list[dict[str, Any]]:
    """Regressions + ``mixing_ratio`` x as many improvements (seeded sample); the authors used 0."""
    reg = [r for r in rows if r["kind"] == "regression"]
    imp = [r for r in rows if r["kind"] == "improvement"]
    n = min(len(imp), int(round(mixing_ratio * len(reg))))
    rng = np.random.default_rng(seed)
    return reg + [imp[int(i)] for i in rng.choice(len(imp), size=n, replace=False)] if n else reg


def select_zoomed_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every mined row the RoI path actually zoomed, right or wrong, each taught its ``target`` (beyond the paper).

    For a checkpoint served with a direct route (``ModelConfig.direct_route_path``), whose own decoder answers
    zoomed records only: it is tuned on the crops its twig serves, and records the gate does not zoom cannot
    drift, since another decoder answers them. Rows right on both paths keep what the zoom pass already reads.
    """
    return [r for r in rows if r.get("roi_route") == "zoom" and str(r.get("target") or "").strip()]


# ---------------------------------------------------------------------------------------------- training
# One stage-2 training row, whatever its source: a row with ``roi_box_norm`` is cropped at that box, a ``direct``
# row is answered from the global view alone, any other row is cropped where the twig points (as served).
SFT_ROW_SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.binary()), ("question", pa.string()), ("target", pa.string()),
    ("kind", pa.string()), ("roi_box_norm", pa.list_(pa.float64())),
])


def sft_training_table(rows: list[dict[str, Any]]) -> pa.Table:
    """The training rows under :data:`SFT_ROW_SCHEMA`. Inferring the schema from the rows would read it off the
    first row only, so a direct row first would silently drop every other row's box."""
    return pa.Table.from_pylist(rows, schema=SFT_ROW_SCHEMA)


class SftConfig(StageConfig):
    budget_tokens: int = Field(576, ge=4, description="Image budget of pass 1 (and of the crop).")
    roi_thresh: float = Field(0.1, ge=0, description="tau_roi of pass 1.")
    roi_thresh_mode: Literal["absolute", "peak_relative"] = Field(
        "absolute", description="How roi_thresh is read in pass 1 (ZoomConfig.roi_thresh_mode)."
    )
    roi_max_downscale: float | None = Field(
        None, ge=1.0, description="The cap on pass 1's box (ZoomConfig.roi_max_downscale): train on the boxes served."
    )
    lr: float = 1e-6
    zoom_budgets: list[int] | None = Field(
        None,
        description="Budgets a zoomed row is trained at (global view and crop alike), one drawn per row and step; "
        "the zoom pass reads best at the budgets it was tuned on. None: budget_tokens. Direct rows always use "
        "budget_tokens, where their targets were answered.",
    )
    reuse_src_pos: bool = Field(
        True,
        description="RoI position ids in pass 2: aligned to the global grid (True, the paper's stage 2) or a fresh "
        "grid after the global image (False, what the authors' stage-3 script writes into the released config). "
        "Written into the checkpoint, so the engine serves the positions the model was tuned on.",
    )


def mined_direct_rows(rows: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` seeded direct rows (global view, no crop) from mined rows whose direct answer the judge passed, each
    taught that answer: the miner already ran model A on every question, so replay needs no second job."""
    ok = [r for r in rows if r.get("base_ok") and str(r.get("base_prediction") or "").strip()]
    n = min(n, len(ok))
    if n <= 0:
        return []
    pick = sorted(int(i) for i in np.random.default_rng(seed).choice(len(ok), size=n, replace=False))
    return [{"id": str(ok[i]["id"]), "image": _image_bytes(ok[i]["image"]), "question": str(ok[i]["question"]),
             "target": str(ok[i]["base_prediction"]), "kind": "direct"} for i in pick]


def pseudo_roi_rows(label_rows: list[dict[str, Any]], pad_cells: int) -> list[dict[str, Any]]:
    """Stage-2 rows from stage-1 label rows: the pseudo-RoI box (padded by ``pad_cells`` label-grid cells) as the
    region, the base model's own high-resolution answer as the target. Self-supervised: no ground truth is read.
    """
    out = []
    for r in label_rows:
        if not r.get("valid") or r.get("fg_box") is None or not str(r.get("answer") or "").strip():
            continue
        gh, gw = int(r["grid_h"]), int(r["grid_w"])
        x0, y0, x1, y1 = (int(v) for v in r["fg_box"])
        box = (max(0, x0 - pad_cells) / gw, max(0, y0 - pad_cells) / gh,
               min(gw, x1 + pad_cells) / gw, min(gh, y1 + pad_cells) / gh)
        out.append({"id": str(r["id"]), "image": _image_bytes(r["image"]), "question": str(r["question"]),
                    "target": str(r["answer"]), "roi_box_norm": list(box), "kind": "pseudo_roi"})
    return out


def spliced_example(engine: Any, row: dict[str, Any], budget_tokens: int, aligned: bool = True) -> dict[str, Any] | None:
    """Pass 1 under inference mode -> spliced ids, RoI positions (aligned or a fresh grid), labels and ViT
    features; None: no RoI."""
    px = budget_tokens * engine.adapter.token_px**2
    prep = engine.prepare(EngineRecord(str(row.get("id", "")), _image_bytes(row["image"]), str(row["question"]),
                                       min_pixels=px, max_pixels=px, gate_thresh=0.0))
    if not hasattr(prep, "input_ids"):
        return None
    from qzoom_ray.model.splice import coarse_positions

    if row.get("kind") == "direct":  # the global view alone, as an ungated record is answered
        ids, pos = np.asarray(prep.input_ids, dtype=np.int64), coarse_positions(engine, prep)
        return _with_answer(engine, ids, pos, str(row["target"]), [(prep.pixel_values, prep.grid_thw)])
    if row.get("roi_box_norm") is not None:  # a given region (the stage-1 pseudo-RoI): no twig pass needed
        out = engine.request_for_box(prep, row["roi_box_norm"])
    else:
        out = engine.coarse([prep], keep_prefix=False)[0]
    if not isinstance(out, ZoomRequest):  # empty map or unencodable crop: no zoomed view to learn from
        return None
    roi = engine.prepare_roi(out)
    layout = geometry.splice_layout(len(prep.input_ids), prep.image_start, prep.num_image_tokens, roi.num_tokens)
    ids = geometry.splice_token_ids(prep.input_ids, layout, engine.vision_start_id, engine.vision_end_id,
                                    engine.image_token_id)
    pos = geometry.roi_position_ids(coarse_positions(engine, prep), layout, prep.image_start, prep.merged_grid,
                                    roi.merged_grid, out.box_grid, aligned=aligned)
    return _with_answer(engine, ids, pos, str(row["target"]),
                        [(prep.pixel_values, prep.grid_thw), (roi.pixel_values, roi.grid_thw)])


def _with_answer(engine: Any, ids: np.ndarray, pos: np.ndarray, target: str,
                 views: list[tuple[np.ndarray, Any]]) -> dict[str, Any]:
    """Prompt ids/positions + the teacher-forced answer, labels on the answer only, and the views' ViT features."""
    tok = engine.processor.tokenizer
    ans = np.asarray(tok(target + "<|im_end|>", add_special_tokens=False)["input_ids"], dtype=np.int64)
    start = geometry.decode_start_position(pos)
    ans_pos = np.repeat((start + np.arange(len(ans)))[None], 3, axis=0)
    with torch.no_grad():  # the ViT is frozen; every view in one call
        pixels = torch.from_numpy(np.concatenate([v[0] for v in views])).to(engine.device)
        feats = engine.adapter.encode_images(pixels, torch.tensor([v[1] for v in views], device=engine.device))
    return {
        "ids": np.concatenate([ids, ans]),
        "labels": np.concatenate([np.full(len(ids), IGNORE_INDEX, dtype=np.int64), ans]),
        "positions": np.concatenate([pos, ans_pos], axis=1),
        "features": torch.cat(feats),
    }


def sft_loss_fn(engine: Any, budget_tokens: int, aligned: bool = True, zoom_budgets: list[int] | None = None,
                seed: int = 0):
    a = engine.adapter
    rng = np.random.default_rng(seed)

    def row_budget(row: dict[str, Any]) -> int:
        return budget_tokens if row.get("kind") == "direct" or not zoom_budgets else int(rng.choice(zoom_budgets))

    def loss(rows: list[dict[str, Any]]) -> torch.Tensor:
        ex = [e for e in (spliced_example(engine, r, row_budget(r), aligned) for r in rows) if e is not None]
        if not ex:  # touch every trainable tensor so DDP ranks still agree on the gradients
            return sum(p.sum() for p in a.model.parameters() if p.requires_grad) * 0.0
        ids, mask, pads = left_pad([e["ids"] for e in ex], engine.pad_id)
        labels, _, _ = left_pad([e["labels"] for e in ex], IGNORE_INDEX)
        pos = torch.zeros((3, len(ex), ids.shape[1]), dtype=torch.float32)
        for b, (e, p) in enumerate(zip(ex, pads, strict=True)):
            pos[:, b, p:] = torch.from_numpy(e["positions"].astype(np.float32))
        dev = engine.device
        ids, mask, labels, pos = ids.to(dev), mask.to(dev), labels.to(dev), pos.to(dev)
        with torch.no_grad():  # embeddings and ViT are frozen
            embeds = a.embed_tokens(ids)
            embeds = embeds.masked_scatter((ids == engine.image_token_id).unsqueeze(-1),
                                           torch.cat([e["features"] for e in ex]).to(embeds.dtype))
        h = a.run_layers(embeds, 0, a.num_layers, position_embeddings=a.position_embeddings(embeds, pos),
                         attention_mask=a.causal_mask(embeds, mask, None, 0), cache=None)
        logits = a.lm_head(a.final_norm(h[:, :-1])).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)

    return loss


def sft_trainable(loaded: Any) -> list[torch.nn.Module]:
    model = loaded.adapter.model
    if getattr(model.config, "tie_word_embeddings", False) or getattr(model.config.get_text_config(),
                                                                      "tie_word_embeddings", False):
        # Unfreezing a tied lm_head would silently train the input embeddings too (spec §8.18b).
        return [loaded.adapter.layers]
    return [loaded.adapter.layers, model.lm_head]


def sft_worker(config: dict[str, Any]) -> None:
    from qzoom_ray.model.engine import QZoomEngine

    cfg = SftConfig.model_validate(config)
    rank, device = worker_setup(cfg)
    loaded = load_for_training(cfg, device)
    if loaded.heads is None:
        raise ValueError("stage 2 starts from a stage-1 checkpoint (it needs the twig)")
    mcfg = ModelConfig(path=cfg.init_from, device=device.type, dtype=cfg.dtype)
    engine = QZoomEngine(engine_config(mcfg, "qzoom", cfg.budget_tokens, cfg.roi_thresh,
                                       roi_thresh_mode=cfg.roi_thresh_mode, roi_max_downscale=cfg.roi_max_downscale),
                         loaded=loaded)
    set_trainable(sft_trainable(loaded), [loaded.adapter.model, loaded.heads])
    loaded.adapter.model.train()
    if loaded.heads.spec.reuse_src_pos != cfg.reuse_src_pos:
        loaded.heads.spec = dataclasses.replace(loaded.heads.spec, reuse_src_pos=cfg.reuse_src_pos)
    loss = sft_loss_fn(engine, cfg.budget_tokens, cfg.reuse_src_pos, cfg.zoom_budgets, cfg.seed + rank)
    module = LossModule(loaded.adapter.model, loss)
    batches = endless(shard_rows(cfg.batch_size, cfg.seed + rank))

    def save(out):
        loaded.adapter.model.eval()
        save_checkpoint(loaded, loaded.heads, out)

    train_and_report(cfg, rank, module, batches, save)


def train_sft(cfg: SftConfig, data_summary: dict[str, Any] | None = None) -> dict[str, Any]:
    return run_stage("sft", sft_worker, cfg, data_summary or {})


def miner_factory(cfg: dict[str, Any]) -> RegressionMiner:
    return RegressionMiner(MineConfig.model_validate(cfg))
