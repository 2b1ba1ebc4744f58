"""The calibration prompt set shipped with the package (calibration/data/prompts.jsonl).

588 prompts written for this project, English and Chinese, in five categories (people, text rendering,
scenes, objects, styles) and three lengths. The file is interleaved by (language, category), and
`select_prompts` picks a stratified, seed-determined subset, so even 8 prompts cover both languages
and every category.
"""

from __future__ import annotations

import hashlib
import json
import random
from functools import lru_cache
from importlib import resources

from qwen_image_trt.core.errors import InputError

CATEGORIES = ("people", "text", "scene", "object", "style")
LANGUAGES = ("en", "zh")
PROMPT_FILE = "prompts.jsonl"


@lru_cache(maxsize=1)
def load_prompts() -> tuple[dict, ...]:
    """All prompts as dicts with id, lang, category, length, text (file order)."""
    text = resources.files("qwen_image_trt.calibration").joinpath("data", PROMPT_FILE).read_text(encoding="utf-8")
    return tuple(json.loads(line) for line in text.splitlines() if line.strip())


def prompt_set_sha256() -> str:
    data = resources.files("qwen_image_trt.calibration").joinpath("data", PROMPT_FILE).read_bytes()
    return hashlib.sha256(data).hexdigest()


def select_prompts(n: int, seed: int = 0) -> list[dict]:
    """`n` prompts, stratified over (language, category) strata in round-robin, shuffled within each
    stratum by `seed`. The same (n, seed) gives the same prompts in the same order."""
    prompts = load_prompts()
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(prompts):
        raise InputError("num_prompts", n, f"an integer in [1, {len(prompts)}] (size of the shipped prompt set)")
    rng = random.Random(f"qitrt-calibration-{seed}")
    strata: dict[tuple[str, str], list[dict]] = {}
    for p in prompts:
        strata.setdefault((p["lang"], p["category"]), []).append(p)
    keys = sorted(strata)
    rng.shuffle(keys)
    for key in keys:
        rng.shuffle(strata[key])
    out: list[dict] = []
    while len(out) < n:
        for key in keys:
            if strata[key] and len(out) < n:
                out.append(strata[key].pop())
    return out


def prompt_seed(seed: int, index: int) -> int:
    """Per-prompt noise seed derived from the run seed: stable, distinct, within 31 bits."""
    h = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF
