"""The edit pipelines' `processor`: Qwen2-VL's image patcher and tokenizer, loadable where torchvision is not.

transformers' Qwen2VLProcessor always builds a video processor, and its video processor needs torchvision, which
this project does not install (it breaks importing the Qwen2.5-VL text encoder with a CPU torch here). The edit
pipelines only ever pass images, so where the stock class cannot load, an image-only subclass with the same
image processor and tokenizer takes its place: same tokens, same pixel values.
"""

from __future__ import annotations

from pathlib import Path

from transformers import ProcessorMixin  # noqa: F401 - diffusers' loader finds a saved processor's base class by name here
from transformers import Qwen2VLProcessor, Qwen3VLProcessor


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without `video_processor`; `videos=` is refused, everything else is the stock code."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def __call__(self, *args, videos=None, **kwargs):
        if videos is not None:
            raise ValueError("videos: this processor was loaded without a video processor (torchvision is missing)")
        return super().__call__(*args, **kwargs)


def image_processor_class():
    """Qwen2-VL's image processor that needs no torchvision (the PIL backend)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil


def load_processor(folder: str | Path):
    """The stock Qwen2VLProcessor from `folder`, or the image-only one where its video processor cannot load."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    try:
        return Qwen2VLProcessor.from_pretrained(folder)
    except ImportError:  # torchvision missing: the video processor, which no edit pipeline uses
        return ImageOnlyQwen2VLProcessor(image_processor=image_processor_class().from_pretrained(folder),
                                         tokenizer=AutoTokenizer.from_pretrained(folder))


def save_processor(processor, folder: str | Path) -> None:
    """Write the files a stock Qwen2VLProcessor reads back: the image processor's and the tokenizer's."""
    processor.image_processor.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor (Qwen-Image-2.1's) without `video_processor`; `videos=` is refused, the rest is stock."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def __call__(self, *args, videos=None, **kwargs):
        if videos is not None:
            raise ValueError("videos: this processor was loaded without a video processor (torchvision is missing)")
        return super().__call__(*args, **kwargs)


def load_qwen3vl_processor(folder: str | Path):
    """The stock Qwen3VLProcessor from `folder`, or the image-only one where its video processor cannot load
    (no torchvision): same image processor, tokenizer and chat template."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    try:
        return Qwen3VLProcessor.from_pretrained(folder)
    except (ImportError, OSError):  # torchvision missing, or a folder an image-only processor saved (no
        # video_preprocessor_config.json): the video processor, which Qwen-Image-2.1 never uses
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return ImageOnlyQwen3VLProcessor(image_processor=image_processor_class().from_pretrained(folder),
                                         tokenizer=tokenizer, chat_template=tokenizer.chat_template)


__all__ = ["ImageOnlyQwen2VLProcessor", "ImageOnlyQwen3VLProcessor", "load_processor", "load_qwen3vl_processor",
           "save_processor", "image_processor_class"]
