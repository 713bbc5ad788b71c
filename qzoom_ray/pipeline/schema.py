"""Column names and the output schema, declared once.

Output columns are documented in docs/batch-job.md. Internal columns (prefix ``_q_``) carry work
between stages and are dropped before the write. Every stage fills result columns with explicit
types, so an all-direct block never gets an Arrow ``null``-typed column that cannot be unified with
other files.
"""

from __future__ import annotations

import pyarrow as pa

ID = "id"
QUESTION = "question"
ERROR = "error"

#: The output schema, minus the input's pass-through columns (appended after these, types kept).
OUTPUT_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string()),
        pa.field(QUESTION, pa.string()),
        pa.field("answer", pa.string()),
        pa.field("route", pa.string()),
        pa.field("zoomed", pa.bool_()),
        pa.field("gate_score", pa.float64()),
        pa.field("roi_box_px", pa.list_(pa.int32(), 4)),
        pa.field("roi_box_norm", pa.list_(pa.float64(), 4)),
        pa.field("image_width", pa.int32()),
        pa.field("image_height", pa.int32()),
        pa.field("coarse_visual_tokens", pa.int32()),
        pa.field("roi_visual_tokens", pa.int32()),
        pa.field("full_res_visual_tokens", pa.int32()),
        pa.field("output_tokens", pa.int32()),
        pa.field("answer_logprob", pa.float64()),
        pa.field("escalated", pa.bool_()),
        pa.field("escalated_visual_tokens", pa.int32()),
        pa.field("prep_s", pa.float64()),
        pa.field("coarse_s", pa.float64()),
        pa.field("crop_s", pa.float64()),
        pa.field("zoom_s", pa.float64()),
        pa.field("decode_s", pa.float64()),
        pa.field("coarse_device", pa.string()),
        pa.field("zoom_device", pa.string()),
        pa.field("model", pa.string()),
        pa.field("config_fingerprint", pa.string()),
        pa.field(ERROR, pa.string()),
    ]
)
OUTPUT_COLUMNS = tuple(OUTPUT_SCHEMA.names)
RESULT_COLUMNS = tuple(n for n in OUTPUT_COLUMNS if n not in (ID, QUESTION))

# ---- internal columns between stages (never written)
PREFIX = "_q_"
IMAGE_BYTES = "_q_image"  # compressed bytes, kept for the crop of gated records
IMAGE_URI = "_q_image_uri"  # resolved path/URI when the input names images by path
INPUT_IDS = "_q_input_ids"  # int64 token ids, raw bytes
PIXELS = "_q_pixels"  # float32 patches of the global view, raw bytes
GRID = "_q_grid"  # (t, h, w)
IMAGE_START = "_q_image_start"
MIN_PIXELS = "_q_min_pixels"
MAX_PIXELS = "_q_max_pixels"
GATE_THRESH = "_q_gate_thresh"
ROI_THRESH = "_q_roi_thresh"
MAX_NEW_TOKENS = "_q_max_new_tokens"
NEEDS_ZOOM = "_q_needs_zoom"
BOX_GRID = "_q_box_grid"
PREFIX_STATE = "_q_prefix"  # torch.save'd PrefixState (zoom_transfer=kv only)
ROI_PIXELS = "_q_roi_pixels"
ROI_GRID = "_q_roi_grid"

INTERNAL_TYPES: dict[str, pa.DataType] = {
    IMAGE_BYTES: pa.large_binary(),
    IMAGE_URI: pa.string(),
    INPUT_IDS: pa.large_binary(),
    PIXELS: pa.large_binary(),
    GRID: pa.list_(pa.int32()),
    IMAGE_START: pa.int32(),
    MIN_PIXELS: pa.int64(),
    MAX_PIXELS: pa.int64(),
    GATE_THRESH: pa.float64(),
    ROI_THRESH: pa.float64(),
    MAX_NEW_TOKENS: pa.int32(),
    NEEDS_ZOOM: pa.bool_(),
    BOX_GRID: pa.list_(pa.int32()),
    PREFIX_STATE: pa.large_binary(),
    ROI_PIXELS: pa.large_binary(),
    ROI_GRID: pa.list_(pa.int32()),
}
#: Type of every column a stage may set.
COLUMN_TYPES: dict[str, pa.DataType] = {**{f.name: f.type for f in OUTPUT_SCHEMA}, **INTERNAL_TYPES}

#: Optional per-record overrides read from the input when present (same names as EngineRecord).
OVERRIDE_COLUMNS = ("min_pixels", "max_pixels", "gate_thresh", "roi_thresh", "max_new_tokens")


def passthrough_name(name: str) -> str:
    """Input columns that collide with an output column (a ground-truth ``answer``, say) get ``input_``."""
    return f"input_{name}" if name in OUTPUT_COLUMNS and name not in (ID, QUESTION) else name


def output_schema(input_schema: pa.Schema | None, id_col: str, question_col: str, drop: set[str]) -> pa.Schema:
    """Declared columns plus the input's pass-through columns (types kept), image bytes excluded."""
    fields = list(OUTPUT_SCHEMA)
    if input_schema is not None:
        for f in input_schema:
            if f.name in (id_col, question_col, ID, QUESTION) or f.name in drop or f.name.startswith(PREFIX):
                continue
            # An all-null first block infers Arrow null; strings are the usual truth for such columns.
            ftype = pa.string() if pa.types.is_null(f.type) else f.type
            fields.append(pa.field(passthrough_name(f.name), ftype))
    return pa.schema(fields)
