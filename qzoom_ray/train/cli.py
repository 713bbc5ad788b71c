"""The shared command line of the training jobs: --config plus the overrides people reach for."""

from __future__ import annotations

import argparse
import importlib
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
        "--address", default=None, help="Ray address; default $RAY_ADDRESS (set by `ray job submit`), else a new local Ray"
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    import ray

    cfg = _resolve(config_cls).from_yaml(args.config)
    for _, field, _ in OVERRIDES:
        value = getattr(args, field)
        if value is not None:
            if field not in type(cfg).model_fields:
                p.error(f"{type(cfg).__name__} has no field {field!r}")
            setattr(cfg, field, value)
    if args.gpu:
        cfg.use_gpu = True
    # "local": a bare ray.init() would join whatever cluster this machine last started.
    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "local")
    summary = _resolve(train)(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, default=str))
