"""What every Q-Zoom training stage shares: config fields, model loading, trainable sets, the Ray Train
driver, and saving the result in the released layout with its history and model card.

A stage is a ``worker(cfg_dict)`` function that runs inside Ray Train and reports one checkpoint;
:func:`run_stage` runs it and copies the checkpoint to ``out_dir``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from qzoom_ray.config import ModelConfig, StrictModel, with_absolute_init
from qzoom_ray.model.heads import QZoomHeads

logger = logging.getLogger(__name__)

HISTORY_FILE = "qzoom_training.json"


#: One Parquet file or folder, or several read as one table.
DataPaths = str | Annotated[list[str], Field(min_length=1)]


def read_rows(paths: DataPaths, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of one or several Parquet files or folders, read on the driver (what Ray Data reads for the workers)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p, columns=columns) for p in ([paths] if isinstance(paths, str) else paths)]
    # Runs may differ in a column's inferred type (all-null in one run): promote instead of failing.
    return pa.concat_tables(tables, promote_options="default").to_pylist()


class StageConfig(StrictModel):
    init_from: str = Field(..., description="Checkpoint folder this stage starts from.")
    data_path: DataPaths = Field(
        ..., description="Parquet file or folder of this stage's training rows, or a list of them (several label runs)."
    )
    out_dir: str = Field(..., description="Where the trained checkpoint (released layout) is written.")
    seed: int = Field(0, description="Seeds the data order, label draws and anything random.")
    steps: int = Field(200, ge=1, description="Optimiser steps.")
    batch_size: int = Field(8, ge=1, description="Samples per step per worker.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW, warm-up + cosine).")
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    max_grad_norm: float = Field(1.0, ge=0)
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int = Field(2, ge=1, description="torch threads per CPU worker.")
    dtype: str = Field("float32", description="Weights dtype while training ('bfloat16' on GPUs saves memory).")
    log_every: int = Field(10, ge=1)
    max_minutes: float | None = Field(None, gt=0, description="Stop (with a fully decayed schedule) after this long.")
    storage_path: str | None = Field(None, description="Ray Train storage; None: a temp folder.")


def load_for_training(cfg: StageConfig, device: torch.device):
    from qzoom_ray.model.loader import load_model

    return load_model(ModelConfig(path=cfg.init_from, require_heads=False, device=device.type, dtype=cfg.dtype))


def set_trainable(modules: Iterable[nn.Module], everything: Iterable[nn.Module]) -> list[nn.Parameter]:
    """Freeze every parameter of ``everything``, then unfreeze ``modules``; returns the trainable ones."""
    for m in everything:
        for p in m.parameters():
            p.requires_grad_(False)
    params = []
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def twig_trainable(heads: QZoomHeads) -> list[nn.Module]:
    """The twig modules that receive gradient: full layers 0..T-2, and of layer T-1 only what scores."""
    last = heads.twig_layers[-1]
    return [*heads.twig_layers[:-1], last.input_layernorm, last.self_attn.q_proj, last.self_attn.k_proj]


class LossModule(nn.Module):
    """Holds the trainable modules (so DDP syncs exactly those) and computes a loss from a batch."""

    def __init__(self, trainable: nn.Module, fn: Callable[[Any], torch.Tensor]):
        super().__init__()
        self.trainable = trainable
        self._fn = fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self._fn(batch)


def endless(make_iter: Callable[[int], Iterator[Any]]) -> Iterator[Any]:
    """Epoch after epoch of ``make_iter(epoch)`` (each epoch reshuffled by its index)."""
    epoch = 0
    while True:
        empty = True
        for item in make_iter(epoch):
            empty = False
            yield item
        if empty:
            raise ValueError("the training data is empty")
        epoch += 1


def shard_rows(batch_size: int, seed: int) -> Callable[[int], Iterator[list[dict[str, Any]]]]:
    """Batches of row dicts from this worker's Ray Data shard, locally shuffled per epoch."""
    import ray.train

    from qzoom_ray.train.rayio import plain

    shard = ray.train.get_dataset_shard("train")

    def epoch_iter(epoch: int) -> Iterator[list[dict[str, Any]]]:
        for df in shard.iter_batches(batch_size=batch_size, batch_format="pandas", drop_last=False,
                                     local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=seed + epoch):
            yield [plain(r) for r in df.to_dict("records")]

    return epoch_iter


def worker_setup(cfg: StageConfig) -> tuple[int, torch.device]:
    import ray.train
    import ray.train.torch

    if not cfg.use_gpu:
        torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    return ray.train.get_context().get_world_rank(), ray.train.torch.get_device()


def train_and_report(
    cfg: StageConfig, rank: int, module: LossModule, batches: Iterator[Any], save: Callable[[Path], None]
) -> None:
    """Run the shared loop on ``module`` and report metrics (+ the checkpoint from rank 0)."""
    import ray.train
    import ray.train.torch

    from qzoom_ray.train.loop import LoopConfig, train_loop

    wrapped = ray.train.torch.prepare_model(module, move_to_device=False)

    def log(step: int, loss: float, lr: float) -> None:
        if rank == 0:
            logger.warning("step %d/%d loss %.4f lr %.2e", step, cfg.steps, loss, lr)

    loop = LoopConfig(steps=cfg.steps, lr=cfg.lr, warmup_ratio=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm,
                      log_every=cfg.log_every, max_seconds=cfg.max_minutes * 60 if cfg.max_minutes else None)
    stats = train_loop(wrapped.parameters(), wrapped, batches, loop, on_log=log)
    n = max(1, min(len(stats.losses), cfg.log_every))
    metrics = {"steps": len(stats.losses), "first_loss": sum(stats.losses[:n]) / n,
               "final_loss": sum(stats.losses[-n:]) / n, "seconds": stats.seconds, "losses": stats.losses}
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save(Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def save_checkpoint(loaded: Any, heads: QZoomHeads, out: Path) -> None:
    """Released layout (the engine's loader reads it) + the processor."""
    from qzoom_ray.model.checkpoint import save_released_layout

    save_released_layout(loaded.adapter.model, heads, out)
    loaded.processor.save_pretrained(out)


def checkpoint_folder(init_from: str) -> Path:
    """The folder a stage started from, where its history lies (``embedded:NAME``: the packaged folder; a hub
    id: the snapshot the loader fetched)."""
    from qzoom_ray.model.loader import resolve_checkpoint_dir

    try:
        return resolve_checkpoint_dir(init_from)
    except FileNotFoundError:  # nothing to carry over; the stage itself already loaded the model
        return Path(init_from)


def run_stage(stage: str, worker: Callable[[dict[str, Any]], None], cfg: StageConfig,
              data_summary: dict[str, Any]) -> dict[str, Any]:
    """Fit ``worker`` with Ray Train on the rows at ``cfg.data_path``; write checkpoint, history and card."""
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from qzoom_ray.train.card import append_history, write_model_card

    t0 = time.time()
    trainer = TorchTrainer(
        worker,
        train_loop_config=with_absolute_init(cfg).model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=f"qzoom-{stage}-{int(t0)}",
                             storage_path=cfg.storage_path or str(Path(tempfile.gettempdir()) / "qzoom-ray-train")),
        datasets={"train": ray.data.read_parquet(cfg.data_path)},
    )
    result = trainer.fit()
    out = Path(cfg.out_dir)
    result.checkpoint.to_directory(str(out))
    m = dict(result.metrics)
    entry = {
        "stage": stage,
        "init_from": cfg.init_from,
        "data": {"path": cfg.data_path, **data_summary},
        "steps": m.get("steps"),
        "samples_seen": (m.get("steps") or 0) * cfg.batch_size * cfg.num_workers,
        "first_loss": m.get("first_loss"),
        "final_loss": m.get("final_loss"),
        "train_seconds": m.get("seconds"),
        "wall_seconds": time.time() - t0,
        "config": cfg.model_dump(mode="json"),
    }
    append_history(out, checkpoint_folder(cfg.init_from), entry, m.get("losses") or [])
    write_model_card(out)
    (out / f"recipe-{stage}.json").write_text(json.dumps(entry, indent=2))
    return entry
