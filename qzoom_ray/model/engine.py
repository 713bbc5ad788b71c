"""QZoomEngine: coarse pass -> gate -> RoI -> spliced zoom pass with KV reuse -> greedy decode.

The steps are separate methods so that a Ray pipeline can run them on different pools:

* :meth:`prepare` (CPU): decode, validate, resize to the budget, tokenise;
* :meth:`coarse` (GPU): ViT + layers 0..K-1, gate, twig map -> box; direct answers are finished
  here, gated records come back as :class:`ZoomRequest` s;
* :meth:`prepare_roi` (CPU): crop the original image and process it with the global budget;
* :meth:`zoom` (GPU): spliced sequence, layers 0..K-1 only for what is not cached, layers K..L-1,
  decode.

:meth:`generate` chains them in-process. Every record is routed on its own; nothing about a
request is stored on a module.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qzoom_ray import box_cap, geometry
from qzoom_ray.config import EngineConfig
from qzoom_ray.model import given_region, preprocess
from qzoom_ray.model.backbone import BackboneAdapter
from qzoom_ray.model.decode import greedy_decode, seen_token_mask
from qzoom_ray.model.kv import layer_kv, select_cache_rows
from qzoom_ray.model.loader import LoadedModel, load_model
from qzoom_ray.model.state import (
    ROUTE_BAD_CROP,
    ROUTE_BASELINE,
    ROUTE_DIRECT,
    ROUTE_EMPTY_MAP,
    ROUTE_ERROR,
    ROUTE_ZOOM,
    EngineRecord,
    EngineResult,
    PrefixState,
    PreparedRecord,
    PreparedRoi,
    ZoomRequest,
)

logger = logging.getLogger(__name__)


@dataclass
class _Batch:
    """A left-padded coarse batch on the device."""

    input_ids: torch.Tensor  # (B, S)
    attention_mask: torch.Tensor  # (B, S)
    embeds: torch.Tensor  # (B, S, hidden)
    positions: torch.Tensor  # (3, B, S)
    features: list[torch.Tensor]  # per row (N_b, hidden)
    pads: list[int]


class QZoomEngine:
    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None):
        self.config = config or EngineConfig()
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        self.loaded = loaded or load_model(self.config.model, self.config.generation.repetition_penalty)
        self.adapter: BackboneAdapter = self.loaded.adapter
        # Direct and fallback answers decode with this (ModelConfig.direct_route_path); zoomed ones with `adapter`.
        self.direct_adapter: BackboneAdapter = self.loaded.direct_adapter or self.adapter
        self.heads = self.loaded.heads
        self.processor = self.loaded.processor
        tok = self.processor.tokenizer
        self.pad_id = int(tok.pad_token_id)
        gen_eos = self.adapter.model.generation_config.eos_token_id
        eos = {int(tok.eos_token_id)}
        eos.update(int(e) for e in (gen_eos if isinstance(gen_eos, list) else [gen_eos]) if e is not None)
        self.eos_ids = eos
        cfg = self.adapter.model.config
        self.vision_start_id = int(cfg.vision_start_token_id)
        self.vision_end_id = int(cfg.vision_end_token_id)
        self.image_token_id = int(cfg.image_token_id)
        zoom = self.config.zoom
        self.qzoom = zoom.mode == "qzoom"
        if self.qzoom and self.heads is None:
            raise ValueError("zoom.mode='qzoom' needs a checkpoint with Q-Zoom heads; use mode 'baseline'")
        spec = self.loaded.spec
        self.reuse_src_pos = zoom.reuse_src_pos if zoom.reuse_src_pos is not None else bool(spec and spec.reuse_src_pos)
        self.K = spec.twig_K if spec else self.adapter.num_layers
        self.device = self.adapter.device

    # ------------------------------------------------------------------ CPU steps
    def prepare(self, record: EngineRecord) -> PreparedRecord | EngineResult:
        """Decode and tokenise one record; a bad record comes back as an error result."""
        return preprocess.prepare_record(self, record)

    def prepare_roi(self, request: ZoomRequest, image=None) -> PreparedRoi:
        """Crop + process the RoI of ``request``; pass ``image`` when the request lost its decoded image."""
        return preprocess.prepare_roi(self, request, image)

    def request_for_box(self, prep: PreparedRecord, box_norm: Sequence[float]) -> ZoomRequest:
        """A zoom request for a region given as a normalised (x0, y0, x1, y1) box (no gate, no twig)."""
        return given_region.request_for_box(self, prep, box_norm)

    def zoom_at(self, records: Sequence[EngineRecord], boxes_norm: Sequence[Sequence[float]]) -> list[EngineResult]:
        """Answer each record from its global view plus a crop of the given region (see ``given_region``)."""
        return given_region.zoom_at(self, records, boxes_norm)

    # ------------------------------------------------------------------ helpers
    def _to_batch(self, preps: Sequence[PreparedRecord]) -> _Batch:
        dev = self.device
        seq = max(len(p.input_ids) for p in preps)
        ids = torch.full((len(preps), seq), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(preps), seq), dtype=torch.long)
        pads = []
        for b, p in enumerate(preps):
            pad = seq - len(p.input_ids)
            ids[b, pad:] = torch.tensor(p.input_ids, dtype=torch.long)
            mask[b, pad:] = 1
            pads.append(pad)
        ids, mask = ids.to(dev), mask.to(dev)
        grid = torch.tensor([p.grid_thw for p in preps], dtype=torch.long, device=dev)
        pixels = torch.from_numpy(np.concatenate([p.pixel_values for p in preps])).to(dev)
        features = self.adapter.encode_images(pixels, grid)
        embeds = self.adapter.embed_tokens(ids)
        image_mask = (ids == self.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_mask, torch.cat(features).to(embeds.dtype))
        positions = self.adapter.rope_index(ids, mask, grid).to(torch.float32)
        return _Batch(ids, mask, embeds, positions, features, pads)

    def _finish(
        self, preps: Sequence[PreparedRecord], cache, mask, positions, first_logits, prompt_ids, adapter=None
    ) -> tuple[list[list[int]], list[list[float]]]:
        next_pos = positions.amax(dim=(0, 2)) + 1
        seen = seen_token_mask(prompt_ids, mask, first_logits.shape[-1])
        return greedy_decode(
            adapter or self.adapter,
            cache,
            mask,
            first_logits,
            next_pos,
            seen,
            max_new_tokens=[p.max_new_tokens for p in preps],
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            repetition_penalty=self.loaded.repetition_penalty,
        )

    def _answers(self, ids: list[list[int]]) -> list[str]:
        return self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def _result(self, p: PreparedRecord, route: str, tokens: list[int], answer: str, **kw) -> EngineResult:
        return EngineResult(
            id=p.record.id,
            answer=answer.strip(),
            route=route,
            zoomed=route == ROUTE_ZOOM,
            image_width=p.image_wh[0],
            image_height=p.image_wh[1],
            coarse_visual_tokens=p.num_image_tokens,
            output_tokens=len(tokens),
            token_ids=tokens,
            **kw,
        )

    # ------------------------------------------------------------------ GPU steps
    @torch.inference_mode()
    def coarse(
        self, preps: Sequence[PreparedRecord], keep_prefix: bool = True, return_logits: bool = False
    ) -> list[EngineResult | ZoomRequest]:
        """Coarse pass for a batch; finished results for direct/fallback records, requests for the rest."""
        t0 = time.perf_counter()
        a, da = self.adapter, self.direct_adapter  # layers below K are the same in both (direct_route checks)
        batch = self._to_batch(preps)
        cache = a.new_cache()
        pos_emb = a.position_embeddings(batch.embeds, batch.positions)
        mask0 = a.causal_mask(batch.embeds, batch.attention_mask, cache, 0)
        n = len(preps)
        k_split = self.K if self.qzoom else a.num_layers
        h_k = (a if self.qzoom else da).run_layers(
            batch.embeds, 0, k_split, position_embeddings=pos_emb, attention_mask=mask0, cache=cache
        )

        gate = [None] * n
        routes = [ROUTE_BASELINE if not self.qzoom else ROUTE_DIRECT] * n
        boxes: dict[int, tuple] = {}
        maps: dict[int, np.ndarray] = {}
        if self.qzoom:
            layer_kwargs = {"attention_mask": mask0, "position_embeddings": pos_emb}
            if self.heads.has_gate:
                gate = torch.sigmoid(self.heads.gate_logits(h_k, layer_kwargs).float()).tolist()
            gated = [b for b in range(n) if gate[b] is None or gate[b] >= preps[b].gate_thresh]
            if gated:
                self._propose_rois(preps, batch, h_k, pos_emb, gated, routes, boxes, maps)

        direct = [b for b in range(n) if routes[b] != ROUTE_ZOOM]
        results: list[EngineResult | ZoomRequest | None] = [None] * n
        t_gate = time.perf_counter()
        if direct:
            rows = torch.tensor(direct, device=self.device)
            sub_cache, sub_pos, sub_mask, h = cache, batch.positions, batch.attention_mask, h_k
            if k_split < a.num_layers:
                if len(direct) != n:
                    sub_cache = select_cache_rows(cache, a.new_cache(), rows, range(k_split))
                    sub_pos, sub_mask = batch.positions[:, rows], batch.attention_mask[rows]
                    h = h_k.index_select(0, rows)
                    emb = a.position_embeddings(h, sub_pos)
                else:
                    emb = pos_emb
                h = da.run_layers(
                    h,
                    k_split,
                    a.num_layers,
                    position_embeddings=emb,
                    attention_mask=a.causal_mask(h, sub_mask, sub_cache, k_split),
                    cache=sub_cache,
                )
            first = da.lm_head(da.final_norm(h[:, -1, :])).float()
            sub_preps = [preps[b] for b in direct]
            tokens, logprobs = self._finish(
                sub_preps, sub_cache, sub_mask, sub_pos, first, batch.input_ids[rows], adapter=da
            )
            t_dec = time.perf_counter()
            for i, (b, toks, ans) in enumerate(zip(direct, tokens, self._answers(tokens), strict=True)):
                results[b] = self._result(
                    preps[b],
                    routes[b],
                    toks,
                    ans,
                    token_logprobs=logprobs[i],
                    gate_score=gate[b],
                    roi_map=maps.get(b),
                    timings={
                        "prep_s": preps[b].prep_s,
                        "coarse_s": (t_gate - t0) / n,
                        "decode_s": (t_dec - t_gate) / len(direct),
                    },
                    first_logits=first[i].cpu() if return_logits else None,
                )
        for b in range(n):
            if routes[b] != ROUTE_ZOOM:
                continue
            prefix = None
            if keep_prefix:
                p = preps[b]
                start, plen = batch.pads[b], p.image_start + p.num_image_tokens + 1
                # Copies, so the batch-wide cache can be freed while the request waits for its crop.
                prefix = PrefixState(
                    kv=[
                        tuple(t[b, :, start : start + plen].clone() for t in layer_kv(cache, i))
                        for i in range(self.K)
                    ],
                    hidden_k=h_k[b, start : start + plen].clone(),
                    global_features=batch.features[b].clone(),
                )
            box_grid, box_px = boxes[b]
            results[b] = ZoomRequest(
                prepared=preps[b],
                gate_score=gate[b],
                box_grid=box_grid,
                box_px=box_px,
                roi_map=maps.get(b),
                prefix=prefix,
                coarse_s=(t_gate - t0) / n,
            )
        return results  # type: ignore[return-value]

    def _propose_rois(self, preps, batch: _Batch, h_k, pos_emb, gated, routes, boxes, maps) -> None:
        """Twig map -> box for the gated rows; sets each row's route (zoom or a fallback)."""
        a = self.adapter
        rows = torch.tensor(gated, device=self.device)
        h = h_k.index_select(0, rows)
        sub_emb = tuple(t.index_select(0, rows) for t in pos_emb)
        sub_mask = a.causal_mask(h, batch.attention_mask[rows], None, 0)
        twig_h = self.heads.twig_hidden(h, {"attention_mask": sub_mask, "position_embeddings": sub_emb})
        scores, sink_scores = a.roi_logits(self.heads.twig_score_layer, twig_h, sub_emb)
        logits = scores.float().cpu().numpy()
        sinks = None if sink_scores is None else sink_scores.float().cpu().numpy()
        zoom = self.config.zoom
        for i, b in enumerate(gated):
            p = preps[b]
            gh, gw = p.merged_grid
            col = batch.pads[b] + p.image_start
            cells = slice(col, col + gh * gw)
            logit_map = logits[i, cells].reshape(gh, gw)
            sink = a.sink_mask((gh, gw), None if sinks is None else sinks[i, cells]) if zoom.sink_mask else None
            prob = geometry.roi_prob_map(logit_map, sink)
            if zoom.return_roi_map:
                maps[b] = prob.astype(np.float32)
            box_grid = geometry.roi_box_from_map(prob, p.roi_thresh, relative=zoom.roi_thresh_mode == "peak_relative")
            if box_grid is None:
                routes[b] = ROUTE_EMPTY_MAP
                continue
            wh = p.image_wh
            if zoom.roi_margin > 0.0:
                x0, y0, x1, y1 = box_grid
                grown = geometry.grow_box_by_margin((x0 / gw, y0 / gh, x1 / gw, y1 / gh), zoom.roi_margin)
                box_grid = geometry.norm_box_to_grid(grown, (gh, gw))
                box_px_f = (grown[0] * wh[0], grown[1] * wh[1], grown[2] * wh[0], grown[3] * wh[1])
            else:
                box_px_f = geometry.grid_box_to_pixels(box_grid, (gh, gw), wh)
            lo, hi = preprocess.roi_budget(self, p)
            if zoom.roi_max_downscale is not None:
                capped = box_cap.cap_box_area(box_px_f, zoom.roi_max_downscale**2 * hi, prob, wh)
                if capped != box_px_f:
                    box_px_f = capped
                    box_grid = geometry.norm_box_to_grid(geometry.normalise_box(capped, wh), (gh, gw))
            box_px = geometry.grow_box_to_min_size(box_px_f, wh, zoom.min_roi_px)
            if not geometry.crop_is_encodable(
                box_px, a.token_px, lo, hi, max_aspect_ratio=self.config.max_aspect_ratio
            ):
                routes[b] = ROUTE_BAD_CROP
                continue
            routes[b] = ROUTE_ZOOM
            boxes[b] = (box_grid, box_px)

    @torch.inference_mode()
    def zoom(
        self,
        items: Sequence[tuple[ZoomRequest, PreparedRoi]],
        reuse_prefix: bool = True,
        return_logits: bool = False,
    ) -> list[EngineResult]:
        """Second pass on ``[prefix, <vs> RoI <ve>, question, assistant header]`` for a batch."""
        from qzoom_ray.model.splice import build_zoom_batch

        t0 = time.perf_counter()
        a = self.adapter
        zb = build_zoom_batch(self, items, reuse_prefix)
        cache = zb.cache
        new = slice(zb.cached_width, None)
        emb_new = a.position_embeddings(zb.embeds[:, new], zb.positions[:, :, new])
        h_new = a.run_layers(
            zb.embeds[:, new],
            0,
            self.K,
            position_embeddings=emb_new,
            attention_mask=a.causal_mask(zb.embeds[:, new], zb.attention_mask, cache, 0),
            cache=cache,
        )
        h = torch.cat([zb.cached_hidden, h_new], dim=1) if zb.cached_width else h_new
        h = a.run_layers(
            h,
            self.K,
            a.num_layers,
            position_embeddings=a.position_embeddings(h, zb.positions),
            attention_mask=a.causal_mask(h, zb.attention_mask, cache, self.K),
            cache=cache,
        )
        first = a.lm_head(a.final_norm(h[:, -1, :])).float()
        t_pre = time.perf_counter()
        preps = [req.prepared for req, _ in items]
        tokens, logprobs = self._finish(preps, cache, zb.attention_mask, zb.positions, first, zb.input_ids)
        t_dec = time.perf_counter()
        out = []
        for i, ((req, roi), toks, ans) in enumerate(zip(items, tokens, self._answers(tokens), strict=True)):
            p = req.prepared
            wh = p.image_wh
            out.append(
                self._result(
                    p,
                    ROUTE_ZOOM,
                    toks,
                    ans,
                    token_logprobs=logprobs[i],
                    gate_score=req.gate_score,
                    roi_box_px=tuple(int(v) for v in req.box_px),
                    roi_box_norm=geometry.normalise_box(req.box_px, wh),
                    roi_visual_tokens=roi.num_tokens,
                    roi_map=req.roi_map,
                    timings={
                        "prep_s": p.prep_s + roi.prep_s,
                        "coarse_s": req.coarse_s,
                        "zoom_s": (t_pre - t0) / len(items),
                        "decode_s": (t_dec - t_pre) / len(items),
                    },
                    first_logits=first[i].cpu() if return_logits else None,
                )
            )
        return out

    # ------------------------------------------------------------------ in-process driver
    def generate(self, records: Sequence[EngineRecord], return_logits: bool = False) -> list[EngineResult]:
        """Answer ``records`` (any number), in input order; bad records get ``error`` set."""
        from qzoom_ray.model.driver import run_records

        return run_records(self, records, return_logits=return_logits)


def error_result(record_id: str, message: str, **kw) -> EngineResult:
    return EngineResult(id=record_id, route=ROUTE_ERROR, error=message, **kw)
