"""Training tokens per second with padded micro-batches (the default), trainer.group_by_length and
trainer.packing, for every method, on instruction-like data of varied lengths.

The data is built here, offline: random token ids with lengths drawn from a log-normal (median
about 118 tokens, 90th percentile about 250, at most --max-length 512), a prompt of 30-70% of
each example and the rest the labelled response. The backbone is a randomly initialised Llama at
SmolLM2-135M's width (hidden 576, 9 query / 3 key-value heads, intermediate 1536, tied
embeddings) with --layers of its 30 layers and a --vocab of 4,096 tokens, not its 49,152: the LM
head runs at labelled positions only, the same cost in every mode, and cut down with the depth it
weighs in a step about what it does in the whole model (2/30 of the layers, 1/12 of the
vocabulary), so the ratios are those of the full shape. fp32 on --threads torch threads.
Each (method, mode) trains --warmup then --steps optimizer steps (micro-batch 16, one
micro-batch a step, AdamW) on the steps the training loop would take, collated as the loop
collates them; tokens/s counts the tokens that are not padding (prompt and labelled ones) per
second of the process's CPU time: on one thread that is the wall time of an idle core, and on a
shared machine it leaves out the turns other programs take.
Padded and packed steps see the same examples; group_by_length's steps see its own batches.

The table goes into docs/benchmarks.md too (section `packing`, and the machine's at the top;
`--no-doc` leaves the page alone, `--doc PATH` writes another copy).

    python scripts/bench_packing.py                    # 2 layers, 3 timed steps each: about 5 minutes
    python scripts/bench_packing.py --layers 4 --vocab 8192 --steps 2 --methods lora,para --no-doc
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import benchmarks_doc  # noqa: E402  (beside this script)

# The sections of docs/benchmarks.md this script writes (tests/test_benchmarks_doc.py checks the page has them).
DOC_SECTIONS = ("packing",)

# name -> method overrides (as bench_train.py's)
METHODS = {
    "lora": ("method=lora", "method.r=8"),
    "tied_lora": ("method=tied_lora", "method.preset=tl6", "method.r=8"),
    "alora": ("method=alora", "method.r_init=8", "method.max_rank=16"),
    "para": ("method=para", "method.bottleneck=12"),
    "iapt": ("method=iapt", "method.bottleneck=64"),
}
MODES = ("padded", "group_by_length", "packing")
PAD = 0


def instruction_lengths(n: int, max_length: int, seed: int) -> list[int]:
    """Log-normal lengths, median 118 and 90th percentile 250 (sigma = ln(250/118) / z_0.9),
    clipped to [16, max_length]."""
    g = torch.Generator().manual_seed(seed)
    sigma = math.log(250 / 118) / 1.2816
    draws = torch.randn(n, generator=g) * sigma + math.log(118)
    return draws.exp().round().clamp(16, max_length).long().tolist()


def instruction_set(n: int, max_length: int, vocab: int, seed: int = 0) -> list[dict]:
    """Features (input_ids, labels, prompt_mask) as tokenize_examples makes them: a prompt of
    30-70% of each example, unlabelled, then the labelled response."""
    from peftrun.data import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed + 1)
    features = []
    for length in instruction_lengths(n, max_length, seed):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = max(1, min(length - 1, round(length * (0.3 + 0.4 * float(torch.rand((), generator=g))))))
        features.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:],
                         "prompt_mask": [1] * prompt + [0] * (length - prompt)})
    return features


def compose(overrides):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from peftrun.cli import CONFIG_DIR  # importing the CLI registers the config schemas

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def backbone(layers: int, vocab: int, max_length: int):
    """SmolLM2-135M's width with `layers` layers and `vocab` tokens, randomly initialised
    (seeded), frozen."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=576, num_hidden_layers=layers, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=max(2048, max_length),
                         tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.requires_grad_(False)


def measure(method: str, mode: str, features: list[dict], args) -> dict:
    """One (method, mode): tokens (not padding), padding share and seconds of the timed steps."""
    from peftrun.data import collate, real_tokens
    from peftrun.loss import label_tokens, labelled_loss_sum
    from peftrun.methods import build_method
    from peftrun.train.optimizer import adamw
    from peftrun.train.schedule import DataOrder

    model = backbone(args.layers, args.vocab, args.max_length)
    torch.manual_seed(0)
    adapter = build_method(compose(METHODS[method]).method).attach(model)
    optimizer = adamw([p for _, p in adapter.trainable_parameters()], lr=1e-4)
    model.train()
    lengths = [len(f["input_ids"]) for f in features] if mode == "group_by_length" else None
    order = DataOrder(len(features), args.micro_batch, seed=0, lengths=lengths)
    packing_length = args.max_length if mode == "packing" else None
    tokens = cells = 0
    seconds = 0.0
    for step in range(args.warmup + args.steps):
        start = time.process_time()
        batch = collate([features[i] for i in order.step_indices(step)], PAD, packing_length)
        if "segment_ids" in batch:
            adapter.set_prompt_mask(batch["prompt_mask"], batch["segment_ids"])
        else:
            adapter.set_prompt_mask(batch["prompt_mask"])
        loss = labelled_loss_sum(model, batch) / max(1, label_tokens(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        adapter.set_prompt_mask(None)
        if step >= args.warmup:
            seconds += time.process_time() - start
            tokens += real_tokens(batch)
            cells += batch["input_ids"].numel()
    return {"tokens": tokens, "seconds": seconds, "padding": 1 - tokens / max(cells, 1)}


def measure_safely(method: str, mode: str, features: list[dict], args) -> dict:
    """`measure`, or the reason a method cannot train in this mode (the table says so)."""
    try:
        return measure(method, mode, features, args)
    except Exception as e:  # noqa: BLE001  (one cell of the table, not the whole benchmark)
        return {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"}


def table(results: dict[str, dict[str, dict]]) -> list[str]:
    lines = ["| method | padded tokens/s | group_by_length tokens/s | packing tokens/s | padding: padded / grouped / packed |",
             "|---|---:|---:|---:|---:|"]
    notes = []
    for method, row in results.items():
        base = row["padded"]
        cells = []
        for mode in MODES:
            r = row[mode]
            if "error" in r:
                cells.append("not supported")
                notes.append(f"{method} {mode}: {r['error']}")
                continue
            rate = r["tokens"] / r["seconds"]
            ratio = "" if mode == "padded" or "error" in base else f" ({rate / (base['tokens'] / base['seconds']):.2f}x)"
            cells.append(f"{rate:,.0f}{ratio}")
        padding = " / ".join("-" if "error" in row[m] else f"{row[m]['padding']:.0%}" for m in MODES)
        lines.append(f"| {method} | {' | '.join(cells)} | {padding} |")
    return lines + ([""] + [f"Not measured: {n}." for n in notes] if notes else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--doc", default=str(benchmarks_doc.DOC), help="the page to write the table into "
                        "(default: %(default)s)")
    parser.add_argument("--no-doc", action="store_true", help="leave the page alone (quick experiments)")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose among {', '.join(METHODS)}")
    doc = None if args.no_doc else Path(args.doc)
    benchmarks_doc.preflight("bench_packing.py", DOC_SECTIONS, doc)
    torch.set_num_threads(args.threads)
    from peftrun.host_memory import keep_freed_memory

    keep_freed_memory()  # as peftrun's commands run (peftrun/host_memory.py)
    features = instruction_set(args.examples, args.max_length, args.vocab)
    lengths = sorted(len(f["input_ids"]) for f in features)
    median, p90 = lengths[len(lengths) // 2], lengths[int(0.9 * len(lengths))]
    # Modes one after another for each method: each ratio is measured within minutes.
    results = {m: {mode: measure_safely(m, mode, features, args) for mode in MODES} for m in methods}
    setting = (f"Llama at SmolLM2-135M's width (hidden 576, 9/3 heads, intermediate 1536), {args.layers} layers, "
               f"vocabulary {args.vocab:,}, random weights, fp32, {args.threads} torch thread(s); micro-batch "
               f"{args.micro_batch}, rows of up to {args.max_length} tokens; {args.examples:,} synthetic instruction "
               f"examples, length median {median}, 90th percentile {p90}, max {lengths[-1]}; tokens/s of prompt and "
               f"response tokens (not padding) per CPU second over {args.steps} optimizer steps after {args.warmup} "
               f"warm-up, ratio to padded in parentheses.")
    lines = table(results)
    print(setting + "\n\n" + "\n".join(lines))
    benchmarks_doc.publish("bench_packing.py", {"packing": "\n".join([setting, "", *lines])}, doc, DOC_SECTIONS)


if __name__ == "__main__":
    main()
