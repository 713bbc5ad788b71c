"""Greedy decoding over a prefilled cache: a plain loop in the style of litgpt's ``generate``."""

from __future__ import annotations

from typing import Any

import torch

from qzoom_ray.model.backbone import BackboneAdapter


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' ``RepetitionPenaltyLogitsProcessor`` over a ``(batch, vocab)`` seen-token mask."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def seen_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """``(batch, vocab)`` bool: tokens present in each row's unpadded prompt."""
    seen = torch.zeros(input_ids.shape[0], vocab, dtype=torch.bool, device=input_ids.device)
    ids = input_ids.clamp(0, vocab - 1)
    return seen.scatter_(1, ids, attention_mask.bool()) if attention_mask is not None else seen.scatter_(1, ids, True)


@torch.inference_mode()
def greedy_decode(
    adapter: BackboneAdapter,
    cache: Any,
    attention_mask: torch.Tensor,
    first_logits: torch.Tensor,
    next_position: torch.Tensor,
    seen: torch.Tensor,
    *,
    max_new_tokens: list[int],
    eos_ids: set[int],
    pad_id: int,
    repetition_penalty: float,
) -> tuple[list[list[int]], list[list[float]]]:
    """Decode every row until EOS or its own token limit.

    Returns the generated ids (EOS included) and, per id, its log-probability under the distribution
    it was picked from (after the repetition penalty).

    ``next_position`` (batch,) is the M-RoPE position of the first generated token, equal on all
    three axes; each step advances it by one, so no module ever caches a rope delta.
    """
    bsz = first_logits.shape[0]
    device = first_logits.device
    limits = torch.tensor(max_new_tokens, device=device)
    eos = torch.tensor(sorted(eos_ids), device=device)
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    out = torch.full((bsz, max(max_new_tokens)), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(out.shape, dtype=torch.float32, device=device)
    logits = first_logits
    mask = attention_mask
    for step in range(out.shape[1]):
        logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
        tokens = torch.where(finished, torch.full_like(finished, pad_id, dtype=torch.long), logits.argmax(-1))
        out[:, step] = tokens
        logprobs[:, step] = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
        seen.scatter_(1, tokens[:, None], (~finished)[:, None])
        finished |= torch.isin(tokens, eos) | (step + 1 >= limits)
        if bool(finished.all()):
            break
        embeds = adapter.embed_tokens(tokens[:, None])
        positions = (next_position + step).to(torch.float32).view(1, bsz, 1).expand(3, bsz, 1)
        mask = torch.cat([mask, mask.new_ones(bsz, 1)], dim=1)
        hidden = adapter.run_layers(
            embeds,
            0,
            adapter.num_layers,
            position_embeddings=adapter.position_embeddings(embeds, positions),
            attention_mask=adapter.causal_mask(embeds, mask, cache, 0),
            cache=cache,
        )
        logits = adapter.lm_head(adapter.final_norm(hidden[:, -1, :]))
    result, scores = [], []
    for row, row_logprobs, limit in zip(out.tolist(), logprobs.tolist(), max_new_tokens, strict=True):
        ids = []
        for t in row[:limit]:
            ids.append(t)
            if t in eos_ids:
                break
        result.append(ids)
        scores.append(row_logprobs[: len(ids)])
    return result, scores
