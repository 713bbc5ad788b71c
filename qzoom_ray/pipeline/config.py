"""Configuration of the batch job: the engine's config plus input, output, storage and per-pool resources.

Loaded from YAML with unknown keys rejected (``StrictModel``). Each stage receives only its slice:
the engine config for the model stages, ``InputConfig`` for the readers, a ``PoolConfig`` for its
resources.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator

from qzoom_ray.config import EngineConfig, StrictModel, fingerprint_of


class StorageConfig(StrictModel):
    """Object-store access (s3:// paths); unset fields fall back to the standard AWS_* environment."""

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, moto, Ceph...). None: AWS_ENDPOINT_URL or AWS itself."
    )
    key: str | None = Field(None, description="Access key id. None: AWS_ACCESS_KEY_ID / the default chain.")
    secret: str | None = Field(None, description="Secret access key. None: AWS_SECRET_ACCESS_KEY / default chain.")
    region: str | None = Field(None, description="Region name. None: AWS_REGION / AWS_DEFAULT_REGION.")
    anon: bool = Field(False, description="Anonymous access to public buckets.")

    def s3fs_kwargs(self) -> dict:
        """Resolved s3fs arguments; the environment is read here, in the driver, so workers need none."""
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        key = self.key or os.environ.get("AWS_ACCESS_KEY_ID")
        secret = self.secret or os.environ.get("AWS_SECRET_ACCESS_KEY")
        region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        kwargs: dict = {"anon": self.anon}
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        if key and secret:
            kwargs["key"], kwargs["secret"] = key, secret
            token = os.environ.get("AWS_SESSION_TOKEN")
            if token and not self.key:
                kwargs["token"] = token
        if region:
            kwargs["client_kwargs"] = {"region_name": region}
        return kwargs


class InputConfig(StrictModel):
    path: str | None = Field(None, description="Parquet file/folder or JSONL manifest, local or s3://.")
    format: Literal["auto", "parquet", "jsonl"] = Field(
        "auto", description="auto: by extension (.jsonl/.json -> jsonl, otherwise parquet)."
    )
    id_column: str = Field("id", description="Unique record id (cast to string in the output).")
    question_column: str = Field("question", description="Question text.")
    image_column: str = Field(
        "image", description="Encoded image bytes (binary) or, when it holds strings, a path/URI."
    )
    image_path_column: str = Field("image_path", description="Image path or URI column (local or s3://).")
    image_root: str | None = Field(
        None, description="Base for relative image paths. None: the folder of the input file."
    )


class OutputConfig(StrictModel):
    path: str | None = Field(None, description="Output folder, local or s3://; a rerun into it resumes.")
    min_rows_per_file: int = Field(
        5000, ge=1, description="Rows per Parquet file at least (avoids many tiny files in a data lake)."
    )
    max_rows_per_file: int | None = Field(None, ge=1, description="Cap rows per file; None: no cap.")
    partition_cols: list[str] = Field(
        default_factory=list, description="Hive partitioning columns, e.g. [zoomed]; empty: flat folder."
    )
    resume: bool = Field(
        True,
        description="Skip ids already in the output (same config fingerprint only). False: refuse a "
        "non-empty output folder.",
    )


class PoolConfig(StrictModel):
    """One stage's actor pool."""

    size: int = Field(1, ge=1, description="Actors in the pool (fixed size unless max_size is set).")
    max_size: int | None = Field(None, ge=1, description="Autoscale from `size` up to this many actors.")
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs each actor reserves.")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs each actor reserves (fractions pack actors).")
    batch_size: int = Field(8, ge=1, description="Rows per map_batches call.")
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads in the actor; None: Ray's.")

    @model_validator(mode="after")
    def _sizes_ordered(self) -> PoolConfig:
        if self.max_size is not None and self.max_size < self.size:
            raise ValueError(f"max_size ({self.max_size}) < size ({self.size})")
        return self


class PoolsConfig(StrictModel):
    prepare: PoolConfig = Field(
        default_factory=lambda: PoolConfig(num_cpus=0.4, batch_size=16),
        description="CPU: decode, guard, resize, tokenise.",
    )
    coarse: PoolConfig = Field(
        default_factory=lambda: PoolConfig(num_cpus=0.2), description="GPU: coarse pass, gate, RoI, direct answers."
    )
    crop: PoolConfig = Field(
        default_factory=lambda: PoolConfig(num_cpus=0.2, batch_size=16),
        description="CPU: crop + process the RoI of gated records (others pass through).",
    )
    zoom: PoolConfig = Field(
        default_factory=lambda: PoolConfig(num_cpus=0.2), description="GPU: zoom pass of gated records."
    )


class BatchJobConfig(StrictModel):
    engine: EngineConfig = Field(default_factory=EngineConfig, description="The Q-Zoom engine's own config.")
    input: InputConfig = Field(default_factory=InputConfig, description="Where records come from.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where results go.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="s3:// access.")
    pools: PoolsConfig = Field(default_factory=PoolsConfig, description="Per-stage actor pools.")
    zoom_transfer: Literal["recompute", "kv"] = Field(
        "kv",
        description="How the zoom pool gets the prefix: receive the coarse pool's KV/hidden states/ViT "
        "features as a serialised column (kv; measured faster, see docs/batch-job.md) or recompute layers "
        "0..K-1 and the global ViT (recompute; no large column through the object store).",
    )
    colocated: bool = Field(
        False,
        description="One GPU pool (pools.coarse) runs coarse + crop + zoom with the prefix kept in memory; "
        "no separate crop/zoom pools.",
    )
    limit: int | None = Field(None, ge=1, description="Only the first N input rows (in read order).")
    ray_address: str | None = Field(
        None, description="Ray cluster to join. None: RAY_ADDRESS if set (ray job submit), else a new local Ray."
    )

    def result_fingerprint(self) -> str:
        """Hash of what decides the answers (engine config and input): guards a resume into old output.

        Pools, transfer mode, colocation and limit only change speed or how far the job gets (KV reuse is
        exact), so they may differ between a killed run and its resume.
        """
        return _ResultKey(engine=self.engine, input=self.input).fingerprint()


class _ResultKey(StrictModel):
    engine: EngineConfig
    input: InputConfig

    def fingerprint(self) -> str:
        # generate_window only bounds engine.generate's memory (the job's stages answer their own batches), so
        # an output written before it existed, or with another window, may still be resumed.
        data = self.model_dump(mode="json")
        data["engine"].pop("generate_window", None)
        return fingerprint_of(data)
