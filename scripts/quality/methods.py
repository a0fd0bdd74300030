"""The methods the quality benchmarks compare and the matching of a trainable-parameter budget.

Each method's size knob (LoRA/ALoRA rank, Tied-LoRA rank, PARA/IAPT bottleneck) is set so its
trainable parameters come as close as possible to a common budget (LoRA at some rank on every
linear), counted on a meta-device copy of the backbone: no weights load.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts/: bench_train's compose

from bench_train import compose  # noqa: E402  (the shared Hydra compose helper)

# label -> (method option, size knob, candidate knob values, fixed overrides (`{k}`: the knob))
# Tied-LoRA's ranks go up to SmolLM2's hidden width (576): its tied A and B are d x r, so a rank
# past the width buys nothing.
METHODS: dict[str, tuple[str, str, range, tuple[str, ...]]] = {
    "lora": ("lora", "method.r", range(1, 65), ("method.alpha={2k}",)),
    "tied_lora tl6": ("tied_lora", "method.r", range(1, 577), ("method.preset=tl6",)),
    "tied_lora tl5": ("tied_lora", "method.r", range(1, 577), ("method.preset=tl5",)),
    "tied_lora vera": ("tied_lora", "method.r", range(1, 577), ("method.preset=vera",)),
    # Not budget-matched: the Tied-LoRA paper's claim is parity with LoRA at a fraction of its
    # parameters, so tl6 at its default rank is a row of its own.
    "tied_lora tl6 r=8": ("tied_lora", "method.r", range(8, 9), ("method.preset=tl6",)),
    # ALoRA's budget is its open ranks (the paper's count); it allocates 2 x r_init slots.
    "alora": ("alora", "method.r_init", range(1, 65), ("method.max_rank={2k}", "method.alpha={2k}")),
    "para": ("para", "method.bottleneck", range(1, 513), ()),
    "iapt": ("iapt", "method.bottleneck", range(1, 513), ()),
}
DEFAULT_METHODS = ("lora", "tied_lora tl6", "tied_lora tl5", "tied_lora tl6 r=8", "alora", "para", "iapt")
MARKERS = {"lora": "o", "tied_lora tl6": "^", "tied_lora tl5": "v", "tied_lora vera": "<", "tied_lora tl6 r=8": "x",
           "alora": "s", "para": "D", "iapt": "P"}


def fill(overrides, k: int) -> list[str]:
    return [o.replace("{2k}", str(2 * k)).replace("{k}", str(k)) for o in overrides]


def method_overrides(label: str, k: int) -> list[str]:
    """The overrides that make `label` at knob value k."""
    option, knob, _, fixed = METHODS[label]
    return [f"method={option}", f"{knob}={k}", *fill(fixed, k)]


def knob_text(label: str, k: int) -> str:
    return f"{METHODS[label][1].split('.')[-1]}={k}"


def folder_name(label: str) -> str:
    return label.replace(" ", "_").replace("=", "")


# ------------------------------------------------------------------------------ budget matching
def with_knob(cfg, label: str, k: int):
    """A copy of a composed config with `label`'s knob (and the overrides tied to it) at k."""
    from omegaconf import OmegaConf

    cfg = cfg.copy()
    for item in method_overrides(label, k)[1:]:
        key, value = item.split("=", 1)
        OmegaConf.update(cfg, key, int(value) if value.isdigit() else value)
    return cfg


_COMPOSED: dict = {}


def count(label: str, k: int, model_overrides: list[str]) -> int:
    """Trainable parameters of `label` at knob value k, on a meta-device backbone (ALoRA: open ranks)."""
    from peftrun.methods import build_method
    from peftrun.models import load_tokenizer, meta_model

    option = METHODS[label][0]
    key = (label, tuple(model_overrides))
    if key not in _COMPOSED:  # composing is the slow part: once per method
        base = compose(list(model_overrides) + [f"method={option}"])
        _COMPOSED[key] = (base, load_tokenizer(base.model))
    base, tokenizer = _COMPOSED[key]
    cfg = with_knob(base, label, k)
    adapter = build_method(cfg.method).attach(meta_model(cfg.model, tokenizer))
    total = adapter.parameter_counts()["total"]
    if option == "alora":  # every slot has the same shape: open ranks are r_init of max_rank
        total = total * cfg.method.r_init // cfg.method.max_rank
    return total


def match_budget(label: str, budget: int, model_overrides: list[str]) -> tuple[int, int]:
    """The knob value whose count is nearest the budget (in ratio) and that count. Counts grow
    with the knob, so a bisection finds the crossing."""
    values = list(METHODS[label][2])
    lo, hi = 0, len(values) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if count(label, values[mid], model_overrides) < budget:
            lo = mid + 1
        else:
            hi = mid
    best = None
    for i in {max(0, lo - 1), lo}:
        n = count(label, values[i], model_overrides)
        if best is None or abs(math.log(n / budget)) < abs(math.log(best[1] / budget)):
            best = (values[i], n)
    return best


def alora_schedule(steps: int, max_rounds: int = 3, dev_batch: int = 16) -> list[str]:
    """Algorithm 1 scaled to a short run: warm-up K1 = 40% of the steps, then up to `max_rounds`
    rounds every 10%, scored on `dev_batch` dev examples (the paper: 32; each round costs
    forwards of the dev batch per open rank, which dominates a short run)."""
    warmup = max(1, int(0.4 * steps))
    interval = max(1, int(0.1 * steps))
    rounds = max(1, min(max_rounds, (steps - warmup) // interval - 1))
    return [f"method.warmup_steps={warmup}", f"method.interval_steps={interval}", f"method.rounds={rounds}",
            f"method.dev_batch_size={dev_batch}"]
