"""Trainable parameters per method and setting on a real architecture, without allocating weights.

The backbone is instantiated on the meta device from its published shape (no download), the
method is attached exactly as in training, and the adapter counts its unique trainable tensors.

    python scripts/param_table.py                          # every row, LLaMA-2 7B shape
    python scripts/param_table.py --arch gpt2 --method lora
    python scripts/param_table.py --ranks 2,4,8,16,32,64,128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Published shapes of the backbones the papers use (config.json values), so no Hub access is needed.
ARCHS = {
    "llama2_7b": lambda: LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    ),
    "gpt2": lambda: GPT2Config(),
    "qwen2_5_0_5b": lambda: Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
    ),
}

# (method option, label, overrides) — `{r}` is filled from --ranks for rank-swept rows.
ROWS: list[tuple[str, str, tuple[str, ...]]] = [
    ("lora", "lora r={r} all-linear", ("method.r={r}",)),
    ("alora", "alora r_init={r} all-linear (open ranks; the slot pool is max_rank)", ("method.r_init={r}", "method.max_rank={r}")),
    ("para", "para bottleneck 12 q,v,up (self-attention pooling)", ("method.bottleneck=12",)),
    ("para", "para bottleneck 12 q,v,up (mean pooling)", ("method.bottleneck=12", "method.pooling=mean")),
    ("tied_lora", "tied_lora lora r={r} qkv", ("method.preset=lora", "method.r={r}")),
    ("tied_lora", "tied_lora tl5 r={r} qkv", ("method.preset=tl5", "method.r={r}")),
    ("tied_lora", "tied_lora tl6 r={r} qkv", ("method.preset=tl6", "method.r={r}")),
    ("tied_lora", "tied_lora vera r={r} qkv", ("method.preset=vera", "method.r={r}")),
    ("iapt", "iapt bottleneck 320, 4 soft tokens", ("method.bottleneck=320", "method.n_soft=4")),
]
DEFAULT_RANKS = (8,)


def meta_backbone(arch: str):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(ARCHS[arch](), attn_implementation="eager")
    model.requires_grad_(False)
    return model


def method_config(method: str, overrides: tuple[str, ...]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import peftrun.cli  # noqa: F401  (schemas)

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "peftrun" / "conf"), version_base="1.3"):
            return compose(config_name="config", overrides=[f"method={method}", *overrides]).method
    finally:
        GlobalHydra.instance().clear()


def count(arch: str, method: str, overrides: tuple[str, ...] = ()) -> dict[str, int]:
    """The adapter's trainable parameter counts (by kind, and "total") on `arch`."""
    from peftrun.methods import build_method

    adapter = build_method(method_config(method, overrides)).attach(meta_backbone(arch))
    return adapter.parameter_counts()


def table(arch: str, methods: list[str] | None, ranks: tuple[int, ...]) -> list[tuple[str, int]]:
    rows = []
    for method, label, overrides in ROWS:
        if methods and method not in methods:
            continue
        swept = any("{r}" in o for o in overrides)
        for r in ranks if swept else (None,):
            filled = tuple(o.format(r=r) for o in overrides)
            rows.append((label.format(r=r), count(arch, method, filled)["total"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llama2_7b")
    parser.add_argument("--method", action="append", help="only these methods (repeatable)")
    parser.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)), help="comma-separated ranks")
    args = parser.parse_args()
    ranks = tuple(int(r) for r in args.ranks.split(","))
    print(f"| {args.arch} | trainable parameters |\n|---|---:|")
    for label, total in table(args.arch, args.method, ranks):
        print(f"| {label} | {total:,} |")


if __name__ == "__main__":
    main()
