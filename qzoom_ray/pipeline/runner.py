"""Builds the one linear Ray Data pipeline and runs the job: the only place that calls ``map_batches``.

read -> normalise (+ resume filter) -> PrepareImages (CPU pool) -> CoarsePass (GPU pool)
     -> CropPrep (CPU pool, gated rows only) -> ZoomPass (GPU pool, gated rows only) -> write_parquet

Gated and direct rows travel together and the zoom stages skip rows they have nothing to do for, so
nothing upstream is planned twice (a filter + union would run read and the coarse pass twice). In
colocated mode CoarseZoomPass replaces the last three stages.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa

from qzoom_ray.pipeline import schema as S
from qzoom_ray.pipeline.config import BatchJobConfig, PoolConfig
from qzoom_ray.pipeline.io import OutputDir, read_input, write_output
from qzoom_ray.pipeline.resume import prepare_output
from qzoom_ray.pipeline.stages import (
    CoarsePass,
    CoarseZoomPass,
    CropPrep,
    PrepareImages,
    ZoomPass,
    normalise_input,
)
from qzoom_ray.pipeline.summary import JobSummary, read_output, summarise, write_summary

logger = logging.getLogger(__name__)


def _pool_args(pool: PoolConfig) -> dict[str, Any]:
    import ray.data

    if pool.max_size is not None:
        compute = ray.data.ActorPoolStrategy(min_size=pool.size, max_size=pool.max_size)
    else:
        compute = ray.data.ActorPoolStrategy(size=pool.size)
    return {
        "compute": compute,
        "batch_size": pool.batch_size,
        "num_cpus": pool.num_cpus,
        "num_gpus": pool.num_gpus,
        "batch_format": "pyarrow",
        # One row out per row in: lets Ray push a limit through the stage.
        "udf_modifying_row_count": False,
    }


def output_schema(cfg: BatchJobConfig, input_schema: pa.Schema | None) -> pa.Schema:
    drop = set()
    if input_schema is not None and cfg.input.image_column in input_schema.names:
        t = input_schema.field(cfg.input.image_column).type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            drop.add(cfg.input.image_column)
    return S.output_schema(input_schema, cfg.input.id_column, cfg.input.question_column, drop)


def _arrow_schema(schema: Any) -> pa.Schema | None:
    """Ray's Schema wrapper -> pyarrow (reading Parquet metadata only; JSON reads its first block)."""
    if schema is None:
        return None
    base = getattr(schema, "base_schema", None)
    if isinstance(base, pa.Schema):
        return base
    return pa.schema([pa.field(n, t if isinstance(t, pa.DataType) else pa.string())
                      for n, t in zip(schema.names, schema.types, strict=True)])


def build_pipeline(cfg: BatchJobConfig, done_ids: Any = None):
    """The dataset to write and its output schema. ``done_ids``: ids to skip (resume), or an ObjectRef."""
    ds = read_input(cfg.input, cfg.storage)
    schema = output_schema(cfg, _arrow_schema(ds.schema()))
    if cfg.limit:
        ds = ds.limit(cfg.limit)
    ds = ds.map_batches(
        normalise_input,
        fn_kwargs={"input_cfg": cfg.input.model_dump(), "done": done_ids},
        batch_format="pyarrow",
        batch_size=None,
    )
    # A Parquet row group or JSON file arrives as one block, and a block is the unit of parallelism and of
    # streaming: cut it into prepare-sized blocks (a streaming repartition, no shuffle or barrier).
    ds = ds.repartition(target_num_rows_per_block=cfg.pools.prepare.batch_size)
    engine = cfg.engine.model_dump()
    pools = cfg.pools
    finalize = {"schema": schema, "model": cfg.engine.model.path, "fingerprint": cfg.result_fingerprint()}
    ds = ds.map_batches(
        PrepareImages,
        fn_constructor_kwargs={
            "engine_config": engine,
            "s3fs_kwargs": cfg.storage.s3fs_kwargs(),
            "torch_threads": pools.prepare.torch_threads,
        },
        **_pool_args(pools.prepare),
    )
    if cfg.colocated:
        return ds.map_batches(
            CoarseZoomPass,
            fn_constructor_kwargs={
                "engine_config": engine,
                "torch_threads": pools.coarse.torch_threads,
                "finalize": finalize,
            },
            **_pool_args(pools.coarse),
        ), schema
    kv = cfg.zoom_transfer == "kv"
    ds = ds.map_batches(
        CoarsePass,
        fn_constructor_kwargs={"engine_config": engine, "transfer_kv": kv, "torch_threads": pools.coarse.torch_threads},
        **_pool_args(pools.coarse),
    )
    ds = ds.map_batches(
        CropPrep,
        fn_constructor_kwargs={"engine_config": engine, "torch_threads": pools.crop.torch_threads},
        **_pool_args(pools.crop),
    )
    ds = ds.map_batches(
        ZoomPass,
        fn_constructor_kwargs={
            "engine_config": engine,
            "transfer_kv": kv,
            "torch_threads": pools.zoom.torch_threads,
            "finalize": finalize,
        },
        **_pool_args(pools.zoom),
    )
    return ds, schema


def init_ray(cfg: BatchJobConfig) -> None:
    """Join the configured cluster or RAY_ADDRESS (set by ``ray job submit``); otherwise start a local Ray.

    "local" matters: a bare ``ray.init()`` joins whatever ``ray start`` cluster this machine last ran
    (``/tmp/ray/ray_current_cluster``), even another user's or a dead one.
    """
    import os

    import ray

    if not ray.is_initialized():
        ray.init(address=cfg.ray_address or os.environ.get("RAY_ADDRESS") or "local")


def run_batch(cfg: BatchJobConfig) -> JobSummary:
    """Run the whole job: resume check, pipeline, write, summary (printed and saved next to the output)."""
    import ray

    if not cfg.output.path:
        raise ValueError("no output path: set output.path in the config or pass --output")
    state = prepare_output(cfg)
    init_ray(cfg)
    done_ref = ray.put(state.done_ids) if state.rows_done else None
    t0 = time.perf_counter()
    ds, schema = build_pipeline(cfg, done_ref)
    write_output(ds, cfg.output, cfg.storage, schema)
    wall = time.perf_counter() - t0
    out = OutputDir(cfg.output.path, cfg.storage)
    table = read_output(out)
    summary = summarise(table, table.num_rows - state.rows_done, wall)
    write_summary(out, summary)
    return summary
