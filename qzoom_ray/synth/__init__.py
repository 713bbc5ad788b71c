"""Synthetic fine-detail VQA benchmark: documents and scenes whose small text needs resolution."""

from qzoom_ray.synth.common import SynthRecord
from qzoom_ray.synth.generator import encode_image, generate_records, record_row, render_record
from qzoom_ray.synth.sizing import LEGIBLE_PX, SPLITS, TOP_BUDGET, budget_scale, min_legible_tokens
from qzoom_ray.synth.vocab import TEMPLATES, vocabulary

__all__ = [
    "LEGIBLE_PX",
    "SPLITS",
    "TEMPLATES",
    "TOP_BUDGET",
    "SynthRecord",
    "budget_scale",
    "encode_image",
    "generate_records",
    "min_legible_tokens",
    "record_row",
    "render_record",
    "vocabulary",
]
