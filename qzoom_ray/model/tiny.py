"""A small random-init Qwen2.5-VL with Q-Zoom heads, tokenizer and processor, built fully offline.

Used by the tests and as ``embedded:tiny-random`` (every code path on random weights). The output folder
is in the authors' released layout (see ``checkpoint.save_released_layout``), so the same loader
path that reads ``YuhengSSS/Q-Zoom-Qwen2.5VL-7B`` reads it.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from qzoom_ray.model.checkpoint import SAFE_INDEX, save_released_layout
from qzoom_ray.model.heads import QZoomHeads, QZoomHeadsSpec
from qzoom_ray.model.processor import QWEN25_CHAT_TEMPLATE, ImageOnlyQwen2_5_VLProcessor

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Real Qwen2.5-VL checkpoints allow up to 16384 visual tokens; the processor class default is far lower.
QWEN25_MAX_PIXELS = 12_845_056
QWEN25_MIN_PIXELS = 3136

_CORPUS = [
    "system user assistant You are a helpful assistant.",
    "What is the value of Total? Which code is on the red triangle? How many shapes are there?",
    "What colour is the largest circle? Answer the question using a single word or phrase.",
    "invoice table form date amount name number code price total subtotal tax yes no left right top bottom",
    "red green blue yellow black white orange purple square circle triangle star",
    string.ascii_letters + " " + string.digits + " " + string.punctuation,
]


def build_tiny_tokenizer(vocab_size: int = 384, extra_corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen's special tokens, trained on a small fixed corpus (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((_CORPUS + list(extra_corpus or [])) * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=QWEN25_CHAT_TEMPLATE,
        padding_side="left",
    )


def build_tiny_processor(tokenizer: PreTrainedTokenizerFast) -> ImageOnlyQwen2_5_VLProcessor:
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": QWEN25_MIN_PIXELS, "longest_edge": QWEN25_MAX_PIXELS}
    )
    return ImageOnlyQwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN25_CHAT_TEMPLATE
    )


def build_tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    num_layers: int = 6,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_depth: int = 2,
    vision_hidden: int = 64,
    rope_theta: float = 1e6,
    text_init_std: float = 0.02,
    vision_init_std: float = 0.02,
) -> Qwen2_5_VLConfig:
    """A small Qwen2.5-VL config; M-RoPE sections scale with head_dim as in the real models (1:1.5:1.5).

    ``rope_theta``: M-RoPE gives the width axis the *lowest* frequencies; with a small head_dim and
    the released 1e6, positions 0..40 along the width turn the phase by well under a radian, so a
    model trained from scratch cannot tell left from right. Models trained here use ~100.

    ``text_init_std`` / ``vision_init_std``: the released 0.02 suits widths in the thousands; at a
    width of 100-200 it leaves the image features so faint that a model trained from scratch does not
    start to read glyphs for hundreds of steps (measured: docs/benchmark.md). Models trained here use
    about 1.4/sqrt(width).
    """
    head_dim = hidden_size // num_heads
    t_sec = head_dim // 8
    hw_sec = (head_dim // 2 - t_sec) // 2
    mrope = [head_dim // 2 - 2 * hw_sec, hw_sec, hw_sec]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = ((len(tokenizer) + 63) // 64) * 64
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            initializer_range=text_init_std,
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_heads=4,
            out_hidden_size=hidden_size,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=112,
            fullatt_block_indexes=[vision_depth - 1],
            initializer_range=vision_init_std,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        initializer_range=text_init_std,
    )


def build_tiny_qzoom(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    num_layers: int = 6,
    twig_K: int = 3,
    twig_T: int = 3,
    enable_high_res: bool = True,
    reuse_src_pos: bool = True,
    init_heads_from_backbone: bool = True,
) -> Path:
    """Build and save a tiny random Q-Zoom Qwen2.5-VL (about 1 M parameters) in the released layout."""
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    processor = build_tiny_processor(tokenizer)
    config = build_tiny_config(tokenizer, num_layers=num_layers)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    spec = QZoomHeadsSpec(
        enable_twig=True,
        twig_K=twig_K,
        twig_T=twig_T,
        enable_high_res=enable_high_res,
        high_res_K=twig_K,
        high_res_T=twig_T,
        reuse_src_pos=reuse_src_pos,
    )
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer

    heads = QZoomHeads(spec, config.text_config, Qwen2_5_VLDecoderLayer)
    if init_heads_from_backbone:
        heads.init_from_backbone(model.model.language_model.layers)
    out = Path(out_dir)
    save_released_layout(model, heads, out)
    processor.save_pretrained(out)
    return out


def embedded_model_dir() -> Path:
    """Where the embedded default is cached (built on first use, about a second)."""
    root = os.environ.get("QZOOM_HOME") or os.path.join(Path.home(), ".cache", "qzoom-ray")
    return Path(root) / "tiny-qzoom-qwen2.5vl-v1"


def ensure_embedded_model() -> Path:
    """Build the embedded tiny model once; later calls reuse the cached folder."""
    out = embedded_model_dir()
    if (out / "config.json").exists() and (out / SAFE_INDEX).exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    build_tiny_qzoom(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:
        # Another process finished first: keep theirs.
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out
