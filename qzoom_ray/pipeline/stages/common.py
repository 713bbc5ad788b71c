"""Helpers shared by the stages: Arrow batch updates, the CPU-only processor context, device tags."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pyarrow as pa

from qzoom_ray.config import EngineConfig
from qzoom_ray.pipeline import schema as S

logger = logging.getLogger(__name__)


def rows_of(table: pa.Table, columns: tuple[str, ...] | list[str]) -> list[dict[str, Any]]:
    """The named columns (those present) as one dict per row."""
    present = [c for c in columns if c in table.column_names]
    return table.select(present).to_pylist()


def apply_updates(table: pa.Table, updates: list[dict[str, Any] | None]) -> pa.Table:
    """Set per-row values; ``None`` leaves a row untouched, a missing key keeps the row's old value.

    Columns are typed from ``schema.COLUMN_TYPES`` so a block where a column is all null still has
    the declared type.
    """
    touched: list[str] = []
    for u in updates:
        for k in u or ():
            if k not in touched:
                touched.append(k)
    for name in touched:
        old = table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
        new = [u[name] if u is not None and name in u else o for u, o in zip(updates, old, strict=True)]
        arr = pa.array(new, type=S.COLUMN_TYPES[name])
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, arr)
        else:
            table = table.append_column(name, arr)
    return table


def finalize_table(table: pa.Table, schema: pa.Schema, model: str, fingerprint: str) -> pa.Table:
    """Rows in the output schema: internal columns dropped, declared columns typed, provenance set."""
    n = table.num_rows
    cols = []
    for field in schema:
        if field.name == "model":
            arr = pa.array([model] * n, field.type)
        elif field.name == "config_fingerprint":
            arr = pa.array([fingerprint] * n, field.type)
        elif field.name in table.column_names:
            arr = table.column(field.name).cast(field.type)
        else:
            arr = pa.nulls(n, field.type)
        cols.append(arr)
    return pa.Table.from_arrays(cols, schema=schema)


def pending(row: dict[str, Any]) -> bool:
    """A row that still needs model work (no error, no answer yet)."""
    return row.get(S.ERROR) is None and row.get("route") is None


def set_torch_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def device_tag(engine: Any = None) -> str:
    """Where this actor runs, e.g. ``cuda:0[gpu 3]@10.0.0.5`` (Ray's GPU ids) or ``cpu@127.0.0.1``."""
    import ray

    # Outside Ray (unit tests call stages directly) asking would start a local Ray instance.
    if ray.is_initialized():
        node, gpus = ray.util.get_node_ip_address(), ray.get_gpu_ids()
    else:
        node, gpus = "local", []
    dev = str(engine.device) if engine is not None else "cpu"
    gpu = f"[gpu {','.join(str(g) for g in gpus)}]" if gpus else ""
    return f"{dev}{gpu}@{node}"


class ProcessorContext:
    """What the engine's CPU steps (``preprocess.prepare_record`` / ``prepare_roi``) read from an engine.

    Loading the processor and the model config only, so CPU prep actors never load model weights
    (a 7B backbone per CPU actor would be absurd).
    """

    def __init__(self, config: EngineConfig):
        from transformers import AutoConfig

        from qzoom_ray.model import backbone, qwen2_5_vl  # noqa: F401 - registers the Qwen2.5-VL adapter
        from qzoom_ray.model.loader import resolve_checkpoint_dir
        from qzoom_ray.model.processor import load_processor

        self.config = config
        ckpt = resolve_checkpoint_dir(config.model.path, config.model.revision)
        model_cfg = AutoConfig.from_pretrained(ckpt)
        self.image_token_id = int(model_cfg.image_token_id)
        adapter_cls = backbone._ADAPTERS.get(model_cfg.model_type)
        # token_px is a class attribute of the adapter; the model itself is never built here.
        self.adapter = SimpleNamespace(token_px=int(getattr(adapter_cls, "token_px", 28)))
        self.processor = load_processor(str(config.model.processor_path or ckpt), revision=config.model.revision)
