"""Sampling recipes: the scheduler settings and step count an engine is built for.

A few-step LoRA (Qwen-Image-Lightning) is distilled for one scheduler configuration and one step count; run
with the checkpoint's own scheduler or another step count it gives blurred images. So a build records the recipe
it was made for in its manifest, and everything downstream uses it: calibration records trajectories with it,
`load_pipeline` puts its scheduler on engine pipelines, `qitrt generate` and `qitrt parity` default to its steps
and parity's eager reference runs it too. A recipe is a built-in name or a JSON file:

    {"scheduler": {<FlowMatchEulerDiscreteScheduler config fields>}, "num_inference_steps": 8,
     "true_cfg_scale": 1.0}

(a file holding only scheduler fields is read as {"scheduler": <file>}, with the steps from --steps).
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from qwen_image_trt.core.errors import InputError

# Qwen-Image-Lightning's scheduler (ModelTC/Qwen-Image-Lightning, generate_with_diffusers.py): distilled with
# shift 3, exponential time shift, no terminal stretch.
LIGHTNING_SCHEDULER = {
    "base_image_seq_len": 256, "base_shift": math.log(3), "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": math.log(3), "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": None,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}
BUILT_IN = {"lightning-4step": (4, 1.0, LIGHTNING_SCHEDULER), "lightning-8step": (8, 1.0, LIGHTNING_SCHEDULER)}


@dataclass(frozen=True)
class SamplingRecipe:
    name: str  # a built-in name, or the file it was read from
    steps: int
    true_cfg_scale: float = 1.0
    scheduler: dict = field(default_factory=dict)  # FlowMatchEulerDiscreteScheduler config fields to set
    sigmas: list[float] | None = None  # a fixed sigma grid (2.1-Turbo's `sample_sigmas`): steps == len(sigmas)

    def record(self) -> dict:
        out = {"name": self.name, "steps": self.steps, "true_cfg_scale": self.true_cfg_scale,
               "scheduler": dict(self.scheduler)}
        if self.sigmas is not None:
            out["sigmas"] = list(self.sigmas)
        return out

    @classmethod
    def from_record(cls, record: dict | None) -> "SamplingRecipe | None":
        return None if not record else cls(record["name"], int(record["steps"]), float(record["true_cfg_scale"]),
                                           dict(record["scheduler"]), sigmas=record.get("sigmas"))

    def scheduler_for(self, scheduler):
        """A scheduler of `scheduler`'s class with this recipe's fields over its config."""
        return type(scheduler).from_config({**dict(scheduler.config), **self.scheduler})

    def apply(self, pipe) -> None:
        pipe.scheduler = self.scheduler_for(pipe.scheduler)


def load_recipe(name_or_file, steps: int | None = None) -> SamplingRecipe:
    """A built-in recipe by name, or one read from a JSON file; `steps` must agree with the recipe's own."""
    text = str(name_or_file)
    if text in BUILT_IN:
        own, cfg_scale, scheduler = BUILT_IN[text]
        recipe = SamplingRecipe(text, own, cfg_scale, dict(scheduler))
    else:
        path = Path(text)
        if not path.is_file():
            raise InputError("scheduler_config", text, f"a built-in recipe ({', '.join(BUILT_IN)}) or a JSON file")
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError("scheduler_config", text, f"a JSON file ({e})") from None
        if not isinstance(data, dict):
            raise InputError("scheduler_config", text, "a JSON object")
        if "scheduler" not in data:
            data = {"scheduler": data}
        own = data.get("num_inference_steps", steps)
        if own is None:
            raise InputError("steps", None, f"the step count {text} was made for (--steps N, or "
                             "\"num_inference_steps\" in the file)")
        recipe = SamplingRecipe(str(path.resolve()), int(own), float(data.get("true_cfg_scale", 1.0)),
                                {k: v for k, v in data["scheduler"].items() if not k.startswith("_")})
    if steps is not None and steps != recipe.steps:
        raise InputError("steps", steps, f"{recipe.steps}: the step count {recipe.name} is made for")
    if not 1 <= recipe.steps <= 1000:
        raise InputError("num_inference_steps", recipe.steps, "an integer in [1, 1000]")
    check_scheduler_fields(recipe.scheduler, recipe.name)
    return recipe


def check_scheduler_fields(fields: dict, where: str) -> None:
    """Every field is one FlowMatchEulerDiscreteScheduler takes (diffusers would ignore a misspelt one)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    accepted = set(inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters) - {"self"}
    unknown = sorted(set(fields) - accepted)
    if unknown:
        raise InputError("scheduler_config", where, f"FlowMatchEulerDiscreteScheduler fields only; unknown: {unknown}")


__all__ = ["SamplingRecipe", "load_recipe", "BUILT_IN", "LIGHTNING_SCHEDULER"]
