"""A local stand-in for the one hub repo diffusers' QwenImage tests load: the tokenizer (and, for the edit tests, the
Qwen2-VL processor) of `hf-internal-testing/tiny-random-Qwen2VLForConditionalGeneration`.

Why: the suite runs offline (no hub here), and nothing under ~/.cache/huggingface holds that repo. The dummy text
encoder the tests build looks tokens up by Qwen2-VL's own ids (vocab 152064; <|image_pad|> = 151655 is the token the
vision tower's features replace), so a stand-in must put the special tokens exactly there. This one reuses the
project's trained byte-level BPE (models/tiny.py `build_tokenizer`: its system prefixes encode to the 34 / 64
tokens the pipelines drop, as Qwen's do), renumbered so that the specials sit at Qwen2-VL's ids 151643-151656
(unused filler entries take the ids in between; no merge ever produces them).

What it changes: ordinary words tokenize to other ids than Qwen's 151k-entry BPE would give, so any test comparing
with an output slice recorded on the real tokenizer cannot match (listed in expectations.py, in both modes).

The processor (only the edit tests load one): transformers' Qwen2VLProcessor.from_pretrained always builds a video
processor, which needs torchvision, not installed here (models/processor.py says why). Where that import fails, the
stand-in is `StandInQwen2VLProcessor`: the project's image-only Qwen2VLProcessor subclass (same image processor and
tokenizer; the edit pipelines never pass videos), defined here beside a module-level `ProcessorMixin` so that a
pipeline saved with it loads back through DiffusionPipeline.from_pretrained (diffusers looks the loading method's
base class up by name in the module model_index.json names; qwen_image_trt.models.processor lacks that name).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import ProcessorMixin  # noqa: F401 - diffusers' loader resolves StandInQwen2VLProcessor by it

from qwen_image_trt.models.processor import ImageOnlyQwen2VLProcessor

HUB_ID = "hf-internal-testing/tiny-random-Qwen2VLForConditionalGeneration"
# Qwen2-VL's added tokens, in id order from 151643 (its tokenizer_config.json).
QWEN2_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                     "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                     "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
FIRST_SPECIAL_ID = 151643
VERSION = "2"  # bump when the stand-in changes: cached folders are keyed by it


def build_tokenizer():
    """A Qwen2Tokenizer with Qwen2-VL's special-token ids over the project's tiny BPE."""
    from tokenizers import Tokenizer
    from transformers import Qwen2Tokenizer

    from qwen_image_trt.models import tiny

    base = tiny.build_tokenizer()
    spec = json.loads(base.backend_tokenizer.to_str())
    added = {a["content"] for a in spec["added_tokens"]}
    words = [w for w, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]) if w not in added]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), FIRST_SPECIAL_ID)})
    spec["model"]["vocab"] = vocab
    specials = [{"id": FIRST_SPECIAL_ID + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for i, t in enumerate(QWEN2_VL_SPECIALS)]
    # The tiny tokenizer's one non-special added token (it makes the edit system prefix 64 tokens) goes after them.
    extra = [dict(a, id=FIRST_SPECIAL_ID + len(specials) + j)
             for j, a in enumerate(a for a in spec["added_tokens"] if a["content"] not in tiny.SPECIAL_TOKENS)]
    spec["added_tokens"] = specials + extra
    tok = Qwen2Tokenizer(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, model_max_length=32768)
    for prefix, want in ((tiny.SYSTEM_PREFIX, 34), (tiny.EDIT_SYSTEM_PREFIX, 64)):
        if len(tok(prefix).input_ids) != want:  # the pipelines drop exactly this many template tokens
            raise RuntimeError(f"stand-in tokenizer: a system prefix is not {want} tokens")
    if tok.convert_tokens_to_ids("<|image_pad|>") != 151655:
        raise RuntimeError("stand-in tokenizer: <|image_pad|> is not Qwen2-VL's id 151655")
    return tok


def write_stand_in(folder: Path) -> Path:
    """Tokenizer + Qwen2-VL image processor files in `folder` (written once; reused while VERSION holds)."""
    from qwen_image_trt.models.processor import image_processor_class

    folder = Path(folder)
    marker = folder / "STAND_IN_VERSION"
    if marker.is_file() and marker.read_text() == VERSION:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save_pretrained(folder)
    # Qwen2-VL's defaults (patch 14, merge 2, temporal patch 2), as the hub repo's preprocessor_config.json.
    image_processor_class()(patch_size=14, temporal_patch_size=2, merge_size=2).save_pretrained(folder)
    marker.write_text(VERSION)
    return folder


class StandInQwen2VLProcessor(ImageOnlyQwen2VLProcessor):
    """Qwen2VLProcessor without a video processor, loadable where torchvision is not (see the module docstring)."""


def _processor_without_torchvision(folder):
    return StandInQwen2VLProcessor.from_pretrained(folder)


def install(folder: Path) -> None:
    """Redirect `from_pretrained(HUB_ID)` of the tokenizer and processor classes the tests use to `folder`, and let
    Qwen2VLProcessor load without torchvision; any other name goes to the stock loader untouched."""
    import transformers

    def redirect(cls, fallback=None):
        stock = cls.from_pretrained.__func__

        def from_pretrained(klass, name, *args, **kwargs):
            if str(name) == HUB_ID:
                name = folder
            try:
                return stock(klass, name, *args, **kwargs)
            except ImportError:  # torchvision, for the video processor
                if fallback is None or not Path(name).is_dir():
                    raise
                return fallback(name)

        cls.from_pretrained = classmethod(from_pretrained)

    redirect(transformers.Qwen2Tokenizer)
    redirect(transformers.AutoTokenizer)
    redirect(transformers.Qwen2VLProcessor, _processor_without_torchvision)
    redirect(transformers.AutoProcessor, _processor_without_torchvision)
