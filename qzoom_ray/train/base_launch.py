"""Launch the tiny base model's training (:mod:`qzoom_ray.train.base`): as a Ray Train job (CPU or GPU
workers) or, ``local``, the same loop in this process; then write ``recipe.json`` (seed, steps, data
sizes, timings) beside the checkpoint so the exact run can be repeated.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from qzoom_ray.config import with_absolute_init
from qzoom_ray.train.base import TrainRuntime, run_training
from qzoom_ray.train.base_config import TrainBaseConfig

logger = logging.getLogger(__name__)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop."""
    import ray.train
    import ray.train.torch

    cfg = TrainBaseConfig.model_validate(config)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()

    def save(model: Any, processor: Any, metrics: dict[str, Any], final: bool) -> None:
        if not final:
            return
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                processor.save_pretrained(tmp)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    rt = TrainRuntime(
        rank=rank,
        device=ray.train.torch.get_device(),
        prepare_model=ray.train.torch.prepare_model,
        distributed=ctx.get_world_size() > 1,
        save=save,
    )
    run_training(cfg, rt)


def _recipe(cfg: TrainBaseConfig, metrics: dict[str, Any], wall_seconds: float, launcher: str) -> dict[str, Any]:
    return {
        "config": cfg.model_dump(mode="json"),
        "launcher": launcher,
        "wall_seconds": wall_seconds,
        "train_seconds": metrics.get("seconds"),
        "steps_done": metrics.get("steps"),
        "samples_seen": (metrics.get("samples_per_worker") or 0) * cfg.num_workers,
        "first_loss": metrics.get("first_loss"),
        "final_loss": metrics.get("final_loss"),
        "heldout_final": (metrics.get("heldout") or [None])[-1],
        "phases": metrics.get("phases", []),
    }


def _write_run_files(out: Path, recipe: dict[str, Any], metrics: dict[str, Any]) -> None:
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2))
    (out / "losses.json").write_text(json.dumps(metrics.get("losses", [])))
    (out / "heldout.json").write_text(json.dumps(metrics.get("heldout", []), indent=1))


def train_base_local(cfg: TrainBaseConfig) -> dict[str, Any]:
    """The same training in this process, without Ray (one worker; a GPU when ``use_gpu``).

    For a single machine where Ray is not installed or not wanted. The checkpoint folder is
    rewritten after every phase, so a run cut short keeps its last finished phase.
    """
    import torch

    if cfg.num_workers != 1:
        raise ValueError("train_base_local runs one worker; use the Ray Train job for num_workers > 1")
    if cfg.use_gpu and not torch.cuda.is_available():
        raise RuntimeError("use_gpu is set but torch sees no CUDA device")
    t0 = time.time()
    out = Path(cfg.out_dir)
    rt_device = torch.device("cuda" if cfg.use_gpu else "cpu")

    def save(model: Any, processor: Any, metrics: dict[str, Any], final: bool) -> None:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))
        processor.save_pretrained(str(out))
        recipe = _recipe(cfg, metrics, time.time() - t0, "local")
        recipe["finished"] = final
        _write_run_files(out, recipe, metrics)
        logger.warning("saved %s checkpoint to %s", "final" if final else "phase", out)

    rt = TrainRuntime(
        rank=0,
        device=rt_device,
        prepare_model=lambda m: m.to(rt_device),
        distributed=False,
        save=save,
    )
    metrics = run_training(with_absolute_init(cfg), rt)
    return _recipe(cfg, metrics, time.time() - t0, "local")


def train_base(cfg: TrainBaseConfig, storage_path: str | None = None, local: bool = False) -> dict[str, Any]:
    """Run the Ray Train job (or, ``local``, the same loop in this process) and write the checkpoint +
    ``recipe.json`` to ``cfg.out_dir``."""
    if local:
        return train_base_local(cfg)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.time()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=with_absolute_init(cfg).model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=f"train-base-{int(t0)}",
            storage_path=storage_path or str(Path(tempfile.gettempdir()) / "qzoom-ray-train"),
        ),
    )
    result = trainer.fit()
    out = Path(cfg.out_dir)
    result.checkpoint.to_directory(str(out))
    metrics = dict(result.metrics)
    recipe = _recipe(cfg, metrics, time.time() - t0, "ray")
    _write_run_files(out, recipe, metrics)
    return recipe
