"""Stage-1 pseudo-label generation and grounding-head picking (library; Ray Data wraps it in jobs/).

Per record: the base model answers (greedy, through the engine in baseline mode) or the ground
truth is used; then one teacher-forced forward over prompt + answer runs layers 0..max(listed
layer) only, with :class:`AttentionCapture` reading the answer-token rows of the listed heads.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator

from qzoom_ray.config import EngineConfig, ModelConfig, StrictModel
from qzoom_ray.eval.metrics import exact_match
from qzoom_ray.train.attention import AttentionCapture, aggregate, head_maps, merge_head_sets, parse_heads
from qzoom_ray.train.forward import Encoded, build_batch, encode, expand_to_square, image_columns
from qzoom_ray.train.labels import (
    LabelParams,
    PixelBox,
    box_in_view,
    evidence_cells,
    label_tiles,
    make_pseudo_label,
    padding_cells,
    spread_tile_map,
)


class TileFallback(StrictModel):
    """Beyond the paper: labels for images too large for the base model to read at the label budget.

    Where the base model's answer on the whole image is wrong and the image is large, it answers on overlapping
    tiles instead; the attention of the tile whose answer matches the ground truth (the most peaked one if several
    do) becomes the image's map, moved onto the whole image's grid. Everything outside that tile is then
    background: the base model, reading each tile legibly, did not find the answer there.
    """

    min_image_pixels: int = Field(4_000_000, ge=1, description="Only images with more source pixels are tiled.")
    max_tile_pixels: int = Field(
        1_500_000, ge=1,
        description="Source pixels per tile (overlap included); pick it so text the model reads at the label budget "
        "on ordinary images is as large on a tile.",
    )
    overlap: float = Field(0.15, ge=0.0, lt=1.0, description="Each tile grows by this share of its side.")


class PseudoLabelConfig(StrictModel):
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(require_heads=False),
                               description="The base model whose attention is read.")
    budget_tokens: int = Field(576, ge=4, description="Image resized to exactly this many visual tokens (authors: 576).")
    pad_to_square: bool = Field(
        False,
        description="Gray-pad to a square first, as the authors did. False keeps the aspect ratio, as at "
        "inference (spec §8.13); the label grid is then the image's own token grid.",
    )
    grounding_heads: dict[int, list[int] | None] = Field(
        ..., description="{layer: [heads]} whose answer->image attention is averaged (None: all heads)."
    )
    sink_heads: dict[int, list[int] | None] = Field(default_factory=dict, description="Heads that mark sinks.")
    answer_source: Literal["model", "ground_truth"] = Field(
        "model", description="model: the base model's greedy answer (the authors'); ground_truth: the label."
    )
    query_rows: Literal["answer", "with_last_prompt"] = Field(
        "answer",
        description="answer: the answer tokens' rows (the authors': decode steps >= 1). with_last_prompt: also "
        "the last prompt token, the row that produced the first answer token; for one-token answers the "
        "answer's own row only predicts the end of the turn and need not look at the evidence.",
    )
    max_new_tokens: int = Field(32, ge=1)
    sink_thresh: float = 1e-2
    fg_coeff: float = 0.25
    bg_coeff: float = 0.05
    max_area_ratio: float = 0.5
    min_peak: float = 5e-3
    batch_size: int = Field(4, ge=1)
    torch_threads: int | None = None
    tile_fallback: TileFallback | None = Field(None, description="Label wrongly answered large images tile by tile.")

    @model_validator(mode="after")
    def _tiles_need_model_answers(self) -> PseudoLabelConfig:
        if self.tile_fallback is not None and (self.answer_source != "model" or self.pad_to_square):
            raise ValueError("tile_fallback needs answer_source: model (a wrong answer triggers it) and "
                             "pad_to_square: false (tile maps are placed on the image's own grid)")
        return self

    def label_params(self) -> LabelParams:
        return LabelParams(self.sink_thresh, self.fg_coeff, self.bg_coeff, self.max_area_ratio, self.min_peak)


def _image(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        value = value.get("bytes")
    return Image.open(io.BytesIO(bytes(value))).convert("RGB")


def _gt(row: dict[str, Any]) -> str:
    answers = row.get("answers")
    if answers is not None and len(answers):
        return str(answers[0])
    return str(row.get("answer", ""))


class AttentionReader:
    """Loads a model once; reads per-head answer->image attention maps for batches of rows."""

    def __init__(self, model: ModelConfig, budget_tokens: int, pad_to_square: bool, loaded: Any = None,
                 torch_threads: int | None = None, query_rows: str = "answer"):
        from qzoom_ray.model.loader import load_model

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.loaded = loaded or load_model(model)
        self.adapter = self.loaded.adapter
        self.processor = self.loaded.processor
        tok = self.processor.tokenizer
        self.pad_id = int(tok.pad_token_id)
        self.image_token_id = int(tok.convert_tokens_to_ids("<|image_pad|>"))
        self.budget = budget_tokens
        self.pad_to_square = pad_to_square
        self.first_row_offset = -1 if query_rows == "with_last_prompt" else 0
        self._engine = None

    def view(self, image: Image.Image) -> tuple[Image.Image, np.ndarray | None]:
        """The image the model sees, and (after the grid is known) which cells are padding."""
        if not self.pad_to_square:
            return image, None
        return expand_to_square(image)[0], None

    def answer(self, images: list[Image.Image], questions: list[str], max_new_tokens: int) -> list[str]:
        from qzoom_ray.model.engine import QZoomEngine
        from qzoom_ray.model.state import EngineRecord

        if self._engine is None:
            cfg = EngineConfig(model=self.loaded_model_config(), zoom={"mode": "baseline"})
            self._engine = QZoomEngine(cfg, loaded=self.loaded)
        px = self.budget * self.adapter.token_px**2
        recs = [EngineRecord(str(i), img, q, min_pixels=px, max_pixels=px, max_new_tokens=max_new_tokens)
                for i, (img, q) in enumerate(zip(images, questions, strict=True))]
        return [r.answer or "" for r in self._engine.generate(recs)]

    def loaded_model_config(self) -> ModelConfig:
        return ModelConfig(path=self.loaded.source, require_heads=False)

    def read(self, images: list[Image.Image], questions: list[str], answers: list[str], heads: dict
             ) -> tuple[list[Encoded], list[dict[tuple[int, int], torch.Tensor]]]:
        """Per row: the encoding and ``{(layer, head): (h, w) map}`` averaged over the answer tokens."""
        enc = [encode(self.processor, im, q, self.budget, answer=a, close_answer=False, token_px=self.adapter.token_px)
               for im, q, a in zip(images, questions, answers, strict=True)]
        batch = build_batch(self.adapter, enc, self.pad_id, self.image_token_id)
        cap = AttentionCapture(self.adapter.layers, heads)
        first = self.first_row_offset
        rows = [torch.arange(batch.pads[b] + e.prompt_len + first, batch.pads[b] + len(e.input_ids),
                             device=self.adapter.device)
                for b, e in enumerate(enc)]
        keys = [torch.arange(image_columns(batch, enc, b).start, image_columns(batch, enc, b).stop,
                             device=self.adapter.device) for b in range(len(enc))]
        with cap, torch.no_grad():
            cap.set_targets(rows, keys, batch.attention_mask)
            # Only the layers up to the deepest listed one are run: later layers cannot change these rows.
            self.adapter.run_layers(batch.embeds, 0, cap.deepest_layer + 1, position_embeddings=batch.position_embeddings,
                                    attention_mask=batch.causal_mask, cache=None)
        return enc, [head_maps(cap, b, e.merged_grid) for b, e in enumerate(enc)]


class PseudoLabeler:
    """Rows in (id, image, question, answer/answers, ...), rows out with raw maps and tri-state labels."""

    def __init__(self, cfg: PseudoLabelConfig, loaded: Any = None):
        self.cfg = cfg
        self.grounding = parse_heads(cfg.grounding_heads)
        self.sink = parse_heads(cfg.sink_heads)
        self.reader = AttentionReader(cfg.model, cfg.budget_tokens, cfg.pad_to_square, loaded, cfg.torch_threads,
                                      cfg.query_rows)

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for i in range(0, len(rows), self.cfg.batch_size):
            out += self._label(rows[i : i + self.cfg.batch_size])
        return out

    def _label(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        originals = [_image(r["image"]) for r in rows]
        views = [self.reader.view(im)[0] for im in originals]
        questions = [str(r["question"]) for r in rows]
        if self.cfg.answer_source == "model":
            answers = self.reader.answer(views, questions, self.cfg.max_new_tokens)
        else:
            answers = [_gt(r) for r in rows]
        # An empty answer has no rows to average; the ground truth keeps the record usable.
        answers = [a if a.strip() else _gt(r) for a, r in zip(answers, rows, strict=True)]
        enc, maps = self.reader.read(views, questions, answers, merge_head_sets(self.grounding, self.sink))
        tiled = self._tile_fallback(rows, originals, questions, answers) if self.cfg.tile_fallback else {}
        params = self.cfg.label_params()
        out = []
        for i, (r, q, im, e, m) in enumerate(zip(rows, questions, originals, enc, maps, strict=True)):
            gh, gw = e.merged_grid
            attn = aggregate(m, self.grounding)
            sink = aggregate(m, self.sink)
            ans, read_box = answers[i], (0, 0, im.width, im.height)
            if i in tiled:
                read_box, ans, tile_attn, tile_sink = tiled[i]
                attn = torch.from_numpy(spread_tile_map(tile_attn.numpy(), read_box, im.size, (gh, gw)))
                if tile_sink is not None:
                    sink = torch.from_numpy(spread_tile_map(tile_sink.numpy(), read_box, im.size, (gh, gw)))
            pad = padding_cells((gh, gw), im.size, max(im.size)) if self.cfg.pad_to_square else None
            lab = make_pseudo_label(attn.numpy(), None if sink is None else sink.numpy(), pad, params)
            out.append({
                "id": str(r.get("id", "")),
                "image": r["image"] if isinstance(r["image"], bytes | bytearray) else _to_png(im),
                "question": q,
                "answer": ans,
                "gt_answer": _gt(r),
                "budget_tokens": self.cfg.budget_tokens,
                "pad_to_square": self.cfg.pad_to_square,
                "grid_h": gh,
                "grid_w": gw,
                "attn_map": attn.numpy().ravel().astype(np.float32).tolist(),
                "sink_map": None if sink is None else sink.numpy().ravel().astype(np.float32).tolist(),
                "labels": lab.labels.ravel().astype(np.int16).tolist(),
                "valid": lab.valid,
                "reason": lab.reason,
                "fg_box": list(lab.fg_box) if lab.fg_box else None,
                "evidence_box": list(r["evidence_box"]) if r.get("evidence_box") is not None else None,
                # The source-pixel region whose attention the map holds: the whole image unless a tile was read.
                "read_box": [int(v) for v in read_box],
            })
        return out

    def _tile_fallback(self, rows: list[dict[str, Any]], images: list[Image.Image], questions: list[str],
                       answers: list[str]) -> dict[int, tuple[PixelBox, str, torch.Tensor, torch.Tensor | None]]:
        """Per row that needs it and has a tile answered right: (tile box, answer, grounding map, sink map)."""
        tf = self.cfg.tile_fallback
        assert tf is not None
        jobs: list[tuple[int, PixelBox]] = []
        for i, (r, im, a) in enumerate(zip(rows, images, answers, strict=True)):
            if im.width * im.height > tf.min_image_pixels and not exact_match(a, [_gt(r)]):
                jobs += [(i, box) for box in label_tiles(im.size, tf.max_tile_pixels, tf.overlap)]
        if not jobs:
            return {}
        crops = [images[i].crop(box) for i, box in jobs]
        tile_answers = self.reader.answer(crops, [questions[i] for i, _ in jobs], self.cfg.max_new_tokens)
        right = [k for k, (i, _) in enumerate(jobs) if exact_match(tile_answers[k], [_gt(rows[i])])]
        best: dict[int, tuple[float, tuple[PixelBox, str, torch.Tensor, torch.Tensor | None]]] = {}
        heads = merge_head_sets(self.grounding, self.sink)
        for start in range(0, len(right), self.cfg.batch_size):
            chunk = right[start : start + self.cfg.batch_size]
            _, maps = self.reader.read([crops[k] for k in chunk], [questions[jobs[k][0]] for k in chunk],
                                       [tile_answers[k] for k in chunk], heads)
            for k, m in zip(chunk, maps, strict=True):
                i, box = jobs[k]
                attn = aggregate(m, self.grounding)
                peak = float(attn.max())
                if i not in best or peak > best[i][0]:
                    best[i] = (peak, (box, tile_answers[k], attn, aggregate(m, self.sink)))
        return {i: v for i, (_, v) in best.items()}


def _to_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def rank_heads(reader: AttentionReader, rows: list[dict[str, Any]], batch_size: int = 4,
               answer_source: str = "ground_truth") -> list[dict[str, Any]]:
    """Rank every (layer, head) by how much of its answer->image attention lands on the evidence box.

    Per head: ``mass`` = mean share of image attention inside the evidence cells, ``area`` = mean share
    of cells the box covers (what a uniform head would score), ``lift`` = mass / area, ``peak_hit`` =
    how often the head's hottest cell is inside the box. Sorted by peak_hit, then mass.
    """
    heads = {layer: None for layer in range(len(reader.adapter.layers))}
    acc: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
    usable = [r for r in rows if r.get("evidence_box") is not None]
    for i in range(0, len(usable), batch_size):
        chunk = usable[i : i + batch_size]
        originals = [_image(r["image"]) for r in chunk]
        views = [reader.view(im)[0] for im in originals]
        questions = [str(r["question"]) for r in chunk]
        answers = ([_gt(r) for r in chunk] if answer_source == "ground_truth"
                   else reader.answer(views, questions, 32))
        enc, maps = reader.read(views, questions, [a or _gt(r) for a, r in zip(answers, chunk, strict=True)], heads)
        for r, im, e, m in zip(chunk, originals, enc, maps, strict=True):
            box, wh = box_in_view(r["evidence_box"], im.size, reader.pad_to_square)
            cells = torch.from_numpy(evidence_cells(box, wh, e.merged_grid))
            area = float(cells.float().mean())
            for key, amap in m.items():
                total = float(amap.sum()) or 1.0
                mass = float(amap[cells].sum()) / total
                hit = float(cells.flatten()[int(amap.argmax())])
                acc.setdefault(key, []).append((mass, area, hit))
    ranked = []
    for (layer, head), vals in acc.items():
        mass, area, hit = (float(np.mean(v)) for v in zip(*vals, strict=True))
        ranked.append({"layer": layer, "head": head, "mass": mass, "area": area,
                       "lift": mass / area if area else 0.0, "peak_hit": hit, "n": len(vals)})
    ranked.sort(key=lambda d: (-d["peak_hit"], -d["mass"]))
    return ranked


def top_heads(ranked: list[dict[str, Any]], n: int) -> dict[int, list[int]]:
    """The ``n`` best heads as a ``{layer: [heads]}`` set, ready for ``grounding_heads``."""
    out: dict[int, list[int]] = {}
    for d in ranked[:n]:
        out.setdefault(int(d["layer"]), []).append(int(d["head"]))
    return {k: sorted(v) for k, v in sorted(out.items())}


def labeler_factory(cfg: dict[str, Any]) -> PseudoLabeler:
    return PseudoLabeler(PseudoLabelConfig.model_validate(cfg))
