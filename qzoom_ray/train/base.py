"""The training loop of the tiny Qwen2.5-VL (:mod:`qzoom_ray.train.base_config`) on a sample source.

It runs the same in a Ray Train worker and in one process; :mod:`qzoom_ray.train.base_launch` starts
it either way and writes the checkpoint folder (an ordinary Qwen2.5-VL one) with its ``recipe.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qzoom_ray.train.base_config import (
    VISION_SOURCE,
    TrainBaseConfig,
    TrainPhase,
    build_from_checkpoint,
    build_untrained,
    resolve_spec,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainRuntime:
    """Where the shared training body runs: a Ray Train worker or this process (``--no-ray``)."""

    rank: int
    device: Any
    prepare_model: Callable[[Any], Any]
    #: DDP (several workers) needs every parameter to keep requires_grad as wrapped.
    distributed: bool
    #: (model, processor, metrics, final) -> None, after each phase and at the end.
    save: Callable[[Any, Any, dict[str, Any], bool], None]


@dataclass
class Auxiliary:
    """A train-time auxiliary loss (qzoom_ray.train.grounding and .readouts): the object hooks the model while it is
    entered and leaves its loss in ``.loss``; ``bind(batch, targets)`` says whether this batch has its
    targets. ``losses`` collects the values for the logs."""

    name: str
    module: Any
    weight: float
    losses: list[float] = field(default_factory=list)


def chat_loss_fn(wrapped: Any, auxiliaries: list[Auxiliary]):
    """The chat phases' loss: next-token loss, plus weight x each auxiliary loss whose targets the batch
    carries (the grounding targets are always removed from the batch: the model takes no such input)."""
    from contextlib import ExitStack

    from qzoom_ray.train.grounding import split_targets

    def loss_fn(batch):
        targets = split_targets(batch)
        active = [a for a in auxiliaries if a.weight > 0 and a.module.bind(batch, targets)]
        if not active:
            return wrapped(**batch).loss
        with ExitStack() as stack:
            for aux in active:
                stack.enter_context(aux.module)
            loss = wrapped(**batch).loss
        for aux in active:
            if aux.module.loss is not None:
                aux.losses.append(float(aux.module.loss.detach()))
                loss = loss + aux.weight * aux.module.loss
        return loss

    return loss_fn


def run_training(cfg: TrainBaseConfig, rt: TrainRuntime) -> dict[str, Any]:
    """The curriculum: phases in order, each with its own data stream, clock and learning rate."""
    import torch

    from qzoom_ray.train.data import batch_stream
    from qzoom_ray.train.loop import LoopConfig, LoopStats, train_loop
    from qzoom_ray.train.parallel_stream import parallel_batches, to_device

    rank, device = rt.rank, rt.device
    on_gpu = getattr(device, "type", "cpu") == "cuda"
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(cfg.torch_threads)
    _, processor, model = build_from_checkpoint(cfg.init_from) if cfg.init_from else build_untrained(cfg)
    if on_gpu:
        from qzoom_ray.model.vision_attention import use_padded_vision_attention

        use_padded_vision_attention(model)  # one SDPA call per block instead of one per window
    model.to(device)
    model.train()
    prepared: dict[str, Any] = {}

    def chat_model():
        if "chat" not in prepared:
            prepared.pop("vision", None)  # drop the tower's own wrapper before wrapping the whole model
            prepared["chat"] = rt.prepare_model(model)
        return prepared["chat"]

    def vision_model():
        from qzoom_ray.train.vision_pretrain import VisionPretrainer

        if "vision" not in prepared:
            pre = VisionPretrainer(model.model.visual, model.config.text_config.hidden_size)
            prepared["vision"] = (rt.prepare_model(pre), pre)
        return prepared["vision"]

    def stream_for(phase: TrainPhase, seed: int):
        batch_size = phase.batch_size or cfg.batch_size
        if phase.kind == "vision":
            from qzoom_ray.train.vision_pretrain import dense_batch_stream

            view_fn = resolve_spec(phase.sample_source or VISION_SOURCE)(**phase.source_kwargs)

            def make(worker: int):
                sub = worker if cfg.data_workers else None
                return dense_batch_stream(view_fn, processor, batch_size, seed, rank, substream=sub)
        else:
            if phase.sample_source:
                sample_fn = resolve_spec(phase.sample_source)(**phase.source_kwargs)
            else:
                sample_fn = resolve_spec(cfg.sample_source)(**{**cfg.source_kwargs, **phase.source_kwargs})

            def make(worker: int):
                sub = worker if cfg.data_workers else None
                return batch_stream(sample_fn, processor, batch_size, seed, rank,
                                    max_tokens=cfg.max_tokens_per_batch, substream=sub)
        batches = parallel_batches(make, cfg.data_workers, pin_memory=on_gpu, half_floats=on_gpu)
        return (to_device(b, device) for b in batches)

    heldout = resolve_spec(cfg.heldout_source)(**cfg.heldout_kwargs) if cfg.heldout_source and rank == 0 else None
    heldout_log: list[dict[str, Any]] = []
    done: dict[str, Any] = {"steps": 0, "phase": "main", "kind": "chat"}

    def check_heldout(step: int) -> None:
        from qzoom_ray.train.heldout import teacher_forced_accuracy

        if heldout_log and heldout_log[-1]["step"] == step:
            return  # the periodic check already ran at the step this phase ended on
        acc = teacher_forced_accuracy(model, processor, heldout)
        heldout_log.append({"step": step, "phase": done["phase"], **acc})
        logger.warning("step %d held-out accuracy %s", step, " ".join(f"{k}={v:.2f}" for k, v in acc.items()))

    def log(step: int, loss: float, lr: float) -> None:
        if rank == 0:
            total = done["steps"] + step
            extra = ""
            if done["kind"] == "vision":
                acc = vision_model()[1].last_accuracy
                extra = " token accuracy " + " ".join(f"{k}={v:.2f}" for k, v in acc.items())
            else:
                for aux in done["auxiliaries"]:
                    if aux.losses:
                        recent = aux.losses[-cfg.log_every :]
                        extra += f" ({aux.name} {sum(recent) / len(recent):.4f}, in the loss x{aux.weight})"
            logger.warning("[%s] step %d (total %d) loss %.4f lr %.2e%s", done["phase"], step, total, loss, lr, extra)
            if heldout and done["kind"] == "chat" and total % cfg.heldout_every < cfg.log_every:
                check_heldout(total)

    def frozen(name: str, phase: TrainPhase) -> bool:
        return phase.freeze_vision and ".visual." in f".{name}" and ".merger." not in name

    phases = cfg.phases or [
        TrainPhase(name="main", minutes=cfg.max_minutes or 1e9, lr=cfg.lr, source_kwargs={})
    ]
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    hidden_size = model.config.text_config.hidden_size
    decoder_layers = model.model.language_model.layers
    aux_modules: dict[str, Any] = {}  # built once: each phase sets its own weights
    if any(p.grounding_weight > 0 for p in phases):
        from qzoom_ray.train.grounding import GroundingLoss

        aux_modules["grounding"] = GroundingLoss(decoder_layers, cfg.grounding_heads)
    from qzoom_ray.train.readouts import (
        CountReadout,
        LocationReadout,
        ObjectCentreReadout,
        TokenPositionReadout,
    )

    if any(p.location_weight > 0 for p in phases):
        aux_modules["location"] = LocationReadout(decoder_layers, cfg.location_readout_layer, hidden_size).to(device)
    if any(p.token_position_weight > 0 for p in phases):
        aux_modules["token_position"] = TokenPositionReadout(
            decoder_layers, cfg.token_position_layer, hidden_size, int(model.config.image_token_id)).to(device)
    if any(p.count_weight > 0 for p in phases):
        aux_modules["count"] = CountReadout(decoder_layers, cfg.count_readout_layer, hidden_size).to(device)
    if any(p.object_centre_weight > 0 for p in phases):
        aux_modules["object_centre"] = ObjectCentreReadout(
            decoder_layers, cfg.object_centre_layer, hidden_size, int(model.config.image_token_id)).to(device)
    done["auxiliaries"] = []
    t_start = time.time()
    stats = LoopStats()
    phase_log: list[dict[str, Any]] = []

    def metrics() -> dict[str, Any]:
        n = max(1, min(len(stats.losses), cfg.log_every))
        return {
            "steps": len(stats.losses),
            "final_loss": sum(stats.losses[-cfg.log_every :]) / n if stats.losses else None,
            "first_loss": sum(stats.losses[: cfg.log_every]) / n if stats.losses else None,
            "seconds": stats.seconds,
            "samples_per_worker": stats.samples,
            "losses": stats.losses,
            "heldout": heldout_log,
            "phases": phase_log,
        }

    for i, phase in enumerate(phases):
        left_s = None if budget_s is None else budget_s - (time.time() - t_start)
        if done["steps"] >= cfg.steps or (left_s is not None and left_s <= 0):
            break
        done["phase"], done["kind"] = phase.name, phase.kind
        weights = {"grounding": phase.grounding_weight, "location": phase.location_weight,
                   "token_position": phase.token_position_weight, "count": phase.count_weight,
                   "object_centre": phase.object_centre_weight}
        done["auxiliaries"] = [Auxiliary(name, aux_modules[name], weights[name])
                               for name in aux_modules if weights[name] > 0 and phase.kind == "chat"]
        seconds = phase.minutes * 60 if cfg.phases else None
        if left_s is not None:
            seconds = min(seconds, left_s) if seconds else left_s
        loop = LoopConfig(
            steps=cfg.steps - done["steps"],
            lr=phase.lr or cfg.lr,
            warmup_ratio=cfg.warmup_ratio,
            betas=(0.9, cfg.adam_beta2),
            log_every=cfg.log_every,
            max_seconds=seconds,
            decay=phase.decay,
        )
        # Each phase draws its own seeded stream, so a run is reproducible phase by phase.
        stream = stream_for(phase, cfg.seed + 1000 * i)
        if phase.kind == "vision":
            wrapped, _ = vision_model()
            params = list(wrapped.parameters())
            loss_fn = wrapped
        else:
            wrapped = chat_model()
            if not rt.distributed:
                # One process: a frozen tower needs no backward pass at all. Under DDP the set of
                # parameters that get gradients must not change after wrapping, so there the tower is
                # only left out of the optimiser.
                for n, p in wrapped.named_parameters():
                    p.requires_grad_(not frozen(n, phase))
            params = [p for n, p in wrapped.named_parameters() if not frozen(n, phase)]

            for aux in done["auxiliaries"]:
                if isinstance(aux.module, torch.nn.Module):
                    params += list(aux.module.parameters())  # train-only heads learn with the model
            loss_fn = chat_loss_fn(wrapped, done["auxiliaries"])

        part = train_loop(params, loss_fn, stream, loop, on_log=log)
        del stream  # stops this phase's data workers
        stats.losses += part.losses
        stats.samples += part.samples
        stats.seconds += part.seconds
        done["steps"] += len(part.losses)
        phase_log.append({"name": phase.name, "kind": phase.kind, "steps": len(part.losses),
                          "seconds": round(part.seconds, 1), "samples": part.samples,
                          "final_loss": sum(part.losses[-cfg.log_every :]) / max(1, min(len(part.losses), cfg.log_every))})
        for aux in done["auxiliaries"]:
            if aux.losses:
                recent = aux.losses[-cfg.log_every :]
                phase_log[-1][f"final_{aux.name}_loss"] = sum(recent) / len(recent)
        if heldout and cfg.phases and phase.kind == "chat":
            check_heldout(done["steps"])
        if i + 1 < len(phases):
            rt.save(model, processor, metrics(), False)
    if heldout and not cfg.phases:
        check_heldout(len(stats.losses))
    for p in model.parameters():
        p.requires_grad_(True)
    result = metrics()
    rt.save(model, processor, result, True)
    return result
