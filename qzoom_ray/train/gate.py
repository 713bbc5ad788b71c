"""Stage 3: answers at a ladder of budgets (data) and BCE training of the gate (spec §2.3-2.4).

The gate branch starts from copies of base layers K..K+T-1 of the checkpoint it is trained on (the
released stage-3 script leaves it random, spec §8.8); only ``high_res_layers`` + ``high_res_head``
train, and nothing past layer K-1 of the backbone runs.
"""

from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field

from qzoom_ray.config import EngineConfig, ModelConfig, StrictModel
from qzoom_ray.eval.metrics import score
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
    worker_setup,
)
from qzoom_ray.train.consistency import HARD, classify_ladder, draw_label, filter_summary, mix_hard_easy
from qzoom_ray.train.forward import build_batch, encode, hidden_at_k
from qzoom_ray.train.judges import answers_of
from qzoom_ray.train.rpn import copy_base_layers


# ---------------------------------------------------------------------------------------------- data
class LadderConfig(StrictModel):
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(require_heads=False),
                               description="The model that answers (spec: the base model; docs: the stage-2 LLM).")
    budgets: list[int] = Field([64, 128, 256, 576], min_length=2, description="Ascending token budgets.")
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(8, ge=1)
    torch_threads: int | None = None
    zoom_check: bool = Field(
        False,
        description="Beyond the paper: also answer each hard record through the Q-Zoom path (gate forced on) at its "
        "last two wrong budgets, into `zoom_correct`; the gate is then not taught to zoom where the zoom failed "
        "(consistency.draw_label). Needs a model with a twig: the checkpoint the gate will serve with.",
    )
    roi_thresh: float = Field(0.1, ge=0.0, description="tau_roi of the checked zoom path (zoom_check).")
    roi_thresh_mode: Literal["absolute", "peak_relative"] = Field(
        "absolute", description="How roi_thresh is read (ZoomConfig.roi_thresh_mode) in the checked zoom path."
    )


class LadderAnswerer:
    """Rows in (id, image, question, answer/answers[, metric, choices]); rows out with ``ms_answers``."""

    def __init__(self, cfg: LadderConfig, loaded: Any = None):
        from qzoom_ray.model.engine import QZoomEngine
        from qzoom_ray.model.loader import load_model

        if sorted(cfg.budgets) != list(cfg.budgets):
            raise ValueError(f"budgets must be ascending: {cfg.budgets}")
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        loaded = loaded or load_model(cfg.model)
        ecfg = EngineConfig(model=cfg.model, zoom={"mode": "baseline"}, max_batch_size=cfg.batch_size)
        self.engine = QZoomEngine(ecfg, loaded=loaded)
        self.zoom_engine = None
        if cfg.zoom_check:
            if loaded.heads is None:
                raise ValueError("zoom_check needs a checkpoint with a twig (Q-Zoom heads)")
            zcfg = EngineConfig(model=cfg.model, max_batch_size=cfg.batch_size,
                                zoom={"mode": "qzoom", "gate_thresh": 0.0, "roi_thresh": cfg.roi_thresh,
                                      "roi_thresh_mode": cfg.roi_thresh_mode})
            self.zoom_engine = QZoomEngine(zcfg, loaded=loaded)
        self.px = loaded.adapter.token_px**2

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from qzoom_ray.model.state import EngineRecord

        recs = [
            EngineRecord(f"{i}:{j}", _bytes(r["image"]), str(r["question"]), min_pixels=b * self.px,
                         max_pixels=b * self.px, max_new_tokens=self.cfg.max_new_tokens)
            for i, r in enumerate(rows) for j, b in enumerate(self.cfg.budgets)
        ]
        results = {res.id: res for res in self.engine.generate(recs)}
        answers = [[results[f"{i}:{j}"].answer or "" for j in range(len(self.cfg.budgets))] for i in range(len(rows))]
        verdicts = [classify_ladder(ms, answers_of(r)) for ms, r in zip(answers, rows, strict=True)]
        zoomed = self._zoom_answers(rows, verdicts)
        out = []
        for i, (r, ms, verdict) in enumerate(zip(rows, answers, verdicts, strict=True)):
            gts = answers_of(r)
            metric = str(r.get("metric") or "exact_match")
            out.append({
                "id": str(r.get("id", i)), "image": _bytes(r["image"]), "question": str(r["question"]),
                "answers": gts, "budgets": list(self.cfg.budgets), "ms_answers": ms,
                "ms_correct": [score(a, gts, metric, r.get("choices")) for a in ms],
                "kind": verdict.kind, "wrong": list(verdict.wrong),
                "zoom_correct": [score(zoomed[(i, j)], gts, metric, r.get("choices")) if (i, j) in zoomed else math.nan
                                 for j in range(len(self.cfg.budgets))],
            })
        return out

    def _zoom_answers(self, rows: list[dict[str, Any]], verdicts: list[Any]) -> dict[tuple[int, int], str]:
        """The Q-Zoom path's answers at each hard record's last two wrong budgets (zoom_check), keyed (row, budget)."""
        from qzoom_ray.model.state import EngineRecord

        if self.zoom_engine is None:
            return {}
        keys = [(i, j) for i, v in enumerate(verdicts) if v.kind == HARD for j in v.wrong[-2:]]
        recs = [EngineRecord(f"{i}:{j}", _bytes(rows[i]["image"]), str(rows[i]["question"]),
                             min_pixels=self.cfg.budgets[j] * self.px, max_pixels=self.cfg.budgets[j] * self.px,
                             max_new_tokens=self.cfg.max_new_tokens) for i, j in keys]
        return {key: res.answer or "" for key, res in zip(keys, self.zoom_engine.generate(recs), strict=True)}


def _bytes(value: Any) -> bytes:
    return bytes(value["bytes"] if isinstance(value, dict) else value)


def mixed_training_rows(rows: list[dict[str, Any]], seed: int, max_samples: int | None) -> tuple[list[dict], dict]:
    """The consistency filter + 1:1 hard/easy mix (seeded), recomputed from the stored answers."""
    verdicts = [classify_ladder(r["ms_answers"], list(r["answers"])) for r in rows]
    hard = [i for i, v in enumerate(verdicts) if v.kind == "hard"]
    easy = [i for i, v in enumerate(verdicts) if v.kind == "easy"]
    picked = mix_hard_easy(hard, easy, seed, max_samples)
    out = []
    for i in picked:
        r = dict(rows[i])
        r["kind"], r["wrong"] = verdicts[i].kind, list(verdicts[i].wrong)
        out.append(r)
    summary = {**filter_summary(verdicts), "rows": len(rows), "mixed": len(out)}
    return out, summary


# ---------------------------------------------------------------------------------------------- training
class GateConfig(StageConfig):
    gate_init: Literal["backbone", "keep"] = Field(
        "backbone", description="backbone: copy base layers K..K+T-1 into the gate first (fixes spec §8.8)."
    )
    p_positive: float = Field(0.9, ge=0, le=1, description="Share of hard-record draws labelled 1 (authors: 0.9).")
    max_samples: int | None = Field(20000, description="Cap after mixing (authors' roi_samples).")
    lr: float = 1e-4


def gate_heads(loaded: Any, init: str) -> QZoomHeads:
    """The checkpoint's heads with a gate branch (built when missing), initialised per ``init``."""
    a = loaded.adapter
    old = loaded.heads
    if old is None:
        raise ValueError("stage 3 starts from a checkpoint with a trained twig (stage 1/2)")
    spec = old.spec
    if not spec.enable_high_res:
        spec = QZoomHeadsSpec(True, spec.twig_K, spec.twig_T, True, spec.twig_K, spec.twig_T, spec.reuse_src_pos)
    heads = QZoomHeads(spec, a.text_config, a.decoder_layer_cls).to(device=a.device, dtype=a.dtype)
    heads.twig_layers.load_state_dict(old.twig_layers.state_dict())
    if old.has_gate:
        heads.high_res_layers.load_state_dict(old.high_res_layers.state_dict())
        heads.high_res_head.load_state_dict(old.high_res_head.state_dict())
    if init == "backbone" or not old.has_gate:
        copy_base_layers(heads.high_res_layers, a.layers, spec.high_res_K)
    return heads


def gate_logits(loaded: Any, heads: QZoomHeads, images: list[Image.Image], questions: list[str],
                budgets: list[int]) -> torch.Tensor:
    a = loaded.adapter
    tok = loaded.processor.tokenizer
    enc = [encode(loaded.processor, im, q, b, token_px=a.token_px) for im, q, b in zip(images, questions, budgets, strict=True)]
    batch = build_batch(a, enc, int(tok.pad_token_id), int(tok.convert_tokens_to_ids("<|image_pad|>")))
    h_k = hidden_at_k(a, batch, heads.spec.high_res_K)
    return heads.gate_logits(h_k, {"attention_mask": batch.causal_mask, "position_embeddings": batch.position_embeddings})


def gate_loss_fn(loaded: Any, heads: QZoomHeads, rng: np.random.Generator, p_positive: float):
    from qzoom_ray.train.consistency import LadderVerdict

    def loss(rows: list[dict[str, Any]]) -> torch.Tensor:
        picks = []
        for r in rows:
            # Labels are re-drawn on every fetch (as the authors do), from this worker's seeded stream.
            verdict = LadderVerdict(r["kind"], None, tuple(int(i) for i in r["wrong"]))
            draw = draw_label(verdict, len(r["budgets"]), rng, p_positive, r.get("zoom_correct"))
            if draw is not None:
                picks.append((r, int(r["budgets"][draw[0]]), draw[1]))
        if not picks:
            # Touch every trainable tensor so DDP ranks still agree on the gradients.
            return sum(p.sum() for p in heads.parameters() if p.requires_grad) * 0.0
        images = [Image.open(io.BytesIO(_bytes(r["image"]))).convert("RGB") for r, _, _ in picks]
        logits = gate_logits(loaded, heads, images, [str(r["question"]) for r, _, _ in picks], [b for _, b, _ in picks])
        target = torch.tensor([lab for _, _, lab in picks], dtype=torch.float32, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), target)

    return loss


def gate_worker(config: dict[str, Any]) -> None:
    cfg = GateConfig.model_validate(config)
    rank, device = worker_setup(cfg)
    loaded = load_for_training(cfg, device)
    heads = gate_heads(loaded, cfg.gate_init)
    set_trainable([heads.high_res_layers, heads.high_res_head], [loaded.adapter.model, heads])
    heads.train()
    rng = np.random.default_rng([cfg.seed, rank])
    module = LossModule(heads, gate_loss_fn(loaded, heads, rng, cfg.p_positive))
    batches = endless(shard_rows(cfg.batch_size, cfg.seed + rank))
    train_and_report(cfg, rank, module, batches, lambda out: save_checkpoint(loaded, heads.eval(), out))


def train_gate(cfg: GateConfig) -> dict[str, Any]:
    """Filter + mix the ladder rows (driver side, once, seeded), then train on them with Ray Train."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_rows(cfg.data_path)
    mixed, summary = mixed_training_rows(rows, cfg.seed, cfg.max_samples)
    if not mixed:
        raise ValueError(f"no hard/easy records survive the consistency filter: {summary}")
    tmp = Path(tempfile.mkdtemp(prefix="qzoom-gate-"))
    path = tmp / "gate-train.parquet"
    pq.write_table(pa.Table.from_pylist(mixed), path)
    return run_stage("gate", gate_worker, cfg.model_copy(update={"data_path": str(path)}),
                     {"source": cfg.data_path, **summary})


def ladder_factory(cfg: dict[str, Any]) -> LadderAnswerer:
    return LadderAnswerer(LadderConfig.model_validate(cfg))
