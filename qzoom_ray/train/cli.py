"""The shared command line of the training jobs: --config plus the overrides people reach for."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
from typing import Any

#: (flag, config field, type) overrides every Ray Train stage accepts when its config has the field.
OVERRIDES: tuple[tuple[str, str, type], ...] = (
    ("--init-from", "init_from", str),
    ("--data", "data_path", str),
    ("--out", "out_dir", str),
    ("--steps", "steps", int),
    ("--minutes", "max_minutes", float),
    ("--workers", "num_workers", int),
)


def apply_overrides(cfg: Any, args: argparse.Namespace, fields: tuple[str, ...]) -> None:
    """Copy each CLI value that was given (not None) onto the config (validated on assignment)."""
    for field in fields:
        value = getattr(args, field, None)
        if value is not None:
            setattr(cfg, field, value)


def init_ray(address: str | None = None) -> None:
    """$RAY_ADDRESS under `ray job submit`, else a new local Ray: a bare ray.init() would join
    whatever cluster this machine last started."""
    import ray

    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local")


def _resolve(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def run_training_job(doc: str, config_cls: str, train: str) -> None:
    """Parse the CLI, apply overrides, connect to (or start) Ray, train, print the run's summary.

    ``config_cls`` and ``train`` are "module:name" strings, imported after parsing so that ``--help``
    does not pay for torch.
    """
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the stage's YAML config")
    for flag, field, kind in OVERRIDES:
        p.add_argument(flag, dest=field, type=kind, help=f"override {field}")
    p.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker")
    p.add_argument(
        "--no-ray", action="store_true", help="run the same loop in this process, without Ray (jobs that support it)"
    )
    p.add_argument(
        "--address", default=None, help="Ray address; default $RAY_ADDRESS (set by `ray job submit`), else a new local Ray"
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    cfg = _resolve(config_cls).from_yaml(args.config)
    given = tuple(field for _, field, _ in OVERRIDES if getattr(args, field) is not None)
    unknown = [f for f in given if f not in type(cfg).model_fields]
    if unknown:
        p.error(f"{type(cfg).__name__} has no field(s) {unknown}")
    apply_overrides(cfg, args, given)
    if args.gpu:
        cfg.use_gpu = True
    train_fn = _resolve(train)
    if args.no_ray:
        if "local" not in inspect.signature(train_fn).parameters:
            p.error("this job runs only on Ray (no --no-ray)")
        summary = train_fn(cfg, local=True)
    else:
        init_ray(args.address)
        summary = train_fn(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, default=str))
