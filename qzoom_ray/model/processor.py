"""Loading the Qwen2.5-VL processor with or without torchvision, and building prompts.

transformers 5.x cannot build ``Qwen2_5_VLProcessor`` without torchvision (its video processor needs
it), and torchvision pulls a multi-GB CUDA torch on CPU machines. We only ever need images, so an
image-only subclass of the stock processor is the fallback; it loads the same saved folders.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import Qwen2_5_VLProcessor

logger = logging.getLogger(__name__)

# Qwen2.5-VL-Instruct's chat template, images only. The default system prompt is part of the
# template, exactly as the released tokenizer renders it.
QWEN25_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """The stock processor minus its video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )


def load_processor(path: str, revision: str | None = None) -> Qwen2_5_VLProcessor:
    """Load a Qwen2.5-VL processor from a local folder or hub id.

    Tries ``AutoProcessor`` first (full processor when torchvision is installed) and falls back to the
    image-only subclass, which picks the PIL image backend.
    """
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path, revision=revision)
    except (ImportError, AttributeError, ValueError) as exc:
        logger.info("AutoProcessor unavailable (%s); using the image-only Qwen2.5-VL processor", exc)
        processor = None
    if getattr(processor, "image_processor", None) is None:
        # AutoProcessor degrades to a bare tokenizer when the full processor cannot be built.
        processor = ImageOnlyQwen2_5_VLProcessor.from_pretrained(path, revision=revision)
    tokenizer = processor.tokenizer
    # Batches are left-padded: every row's last prompt token sits in the last column.
    tokenizer.padding_side = "left"
    if processor.chat_template is None:
        processor.chat_template = QWEN25_CHAT_TEMPLATE
    return processor


def build_prompt(processor: Any, question: str, suffix: str | None = None) -> str:
    """Chat-formatted prompt with one image before the question, ending in the assistant header."""
    text = question if not suffix else f"{question}\n{suffix}"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def image_size_kwargs(min_pixels: int, max_pixels: int) -> dict[str, Any]:
    """Per-call pixel budget for the image processor (never mutate a shared processor's settings)."""
    return {"size": {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}}
