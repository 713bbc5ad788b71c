"""Thin Ray Data wrappers: run a row-batch callable (a labeller, a ladder answerer, a miner) over a
Parquet dataset on an actor pool, each actor loading its model once."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np


def plain(row: dict[str, Any]) -> dict[str, Any]:
    """Arrow list columns arrive as numpy arrays; the library code expects Python lists."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in row.items()}


class RowMapper:
    """Ray Data actor: builds ``factory(cfg)`` once, then maps pandas batches through it."""

    def __init__(self, factory: str, cfg: dict[str, Any]):
        module, _, name = factory.partition(":")
        self.fn = getattr(importlib.import_module(module), name)(cfg)

    def __call__(self, df):
        import pandas as pd

        return pd.DataFrame(self.fn([plain(r) for r in df.to_dict("records")]))


def map_parquet(input_path: str, output_path: str, factory: str, cfg: dict[str, Any], *, concurrency: int = 1,
                batch_size: int = 16, num_gpus: float = 0.0, num_cpus: float = 1.0, limit: int | None = None,
                no_progress_timeout_s: float | None = None) -> int:
    """``input_path`` rows -> ``factory(cfg)`` on ``concurrency`` actors -> Parquet files under ``output_path``.

    ``no_progress_timeout_s``: how long the run may go without a block moving (None: no limit)."""
    import ray.data

    ray.data.DataContext.get_current().execution_no_progress_timeout_s = (
        -1 if no_progress_timeout_s is None else no_progress_timeout_s
    )

    ds = ray.data.read_parquet(input_path)
    if limit is not None:
        ds = ds.limit(limit)
    out = ds.map_batches(
        RowMapper,
        fn_constructor_kwargs={"factory": factory, "cfg": cfg},
        batch_size=batch_size,
        batch_format="pandas",
        concurrency=concurrency,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
    )
    out.write_parquet(output_path)
    return int(ray.data.read_parquet(output_path).count())
