"""Training cost per method and the packing gain on a GPU, in bf16: what `make bench` measures on
CPUs (scripts/bench_train.py, scripts/bench_packing.py), on randomly initialised models of
SmolLM2-135M's shape and of LLaMA-2 7B's, with tokens/s and model FLOPs utilisation. Not part of
`make bench` (it needs CUDA): one run, about 5 minutes on one H100.

Every step: the frozen backbone's weights in bf16, the adapters' in fp32, under bf16 autocast (as
`model.dtype=bfloat16 trainer.precision=bf16`), sdpa attention, AdamW, the loss on the last
quarter of each row with the LM head there only (peftrun's training loss; PEFT's model gets the
same call). Each configuration builds its own model in this process, seeded, and frees it after.

- Steps: batch --batch-smollm2 / --batch-7b x --seq tokens of random ids, median of --steps
  optimizer steps after --warmup, against the frozen backbone's forward + backward and Hugging
  Face PEFT's LoRA r=8 on every linear. Tokens/s counts every token. MFU: the backbone's own
  forward + backward FLOPs (its matmuls 2 x 2 x weights x tokens, as frozen weights get no weight
  gradient; the LM head at the labelled positions; causal attention, its backward twice its
  forward) per second over the GPU's dense bf16 peak; the adapters' FLOPs are not counted, so a
  method's MFU falls by exactly its overhead.
- Packing: the instruction-like lengths of bench_packing.py (median 118 tokens, p90 250, at most
  --seq), micro-batch 16, the same steps padded (the default) and with trainer.packing; tokens/s
  counts the tokens that are not padding.

The table goes into docs/benchmarks.md (section `gpu`) under a line naming the GPU machine; the
page's machine line (the CPU machine of the other tables) stays as it is. On a lent machine,
whose files come back from $OUT:

    cp docs/benchmarks.md $OUT/ && python scripts/bench_gpu.py --doc $OUT/benchmarks.md --out $OUT
    python scripts/bench_gpu.py --smoke      # on CPUs: a tiny shape, fp32, one step each, nothing written
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import benchmarks_doc  # noqa: E402  (beside this script)
from bench_packing import METHODS as PACKING_METHODS, PAD, instruction_set  # noqa: E402
from bench_train import CONFIGS, attach  # noqa: E402

from peftrun.train.optimizer import adamw  # noqa: E402

# The sections of docs/benchmarks.md this script writes (tests/test_benchmarks_doc.py checks the page has them).
DOC_SECTIONS = ("gpu",)

SHAPES = {  # LlamaConfig fields; "tiny" is the --smoke shape
    "SmolLM2-135M": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "LLaMA-2 7B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
}
# Dense bf16 peaks in FLOP/s (the vendors' figures without sparsity), by a part of the device name.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("A10G", 70e12))
PACKING_MICRO_BATCH = 16


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in PEAK_BF16 if part in name), None)


def build_backbone(shape: str, device: torch.device, dtype: torch.dtype, max_length: int):
    """The shape, randomly initialised (seed 0) on the device, frozen."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(4096, max_length), pad_token_id=PAD,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.requires_grad_(False)


def backbone_flops(model, batch: int, seq: int, labelled: int) -> float:
    """Forward + backward FLOPs of the frozen backbone on batch x seq tokens (see the module's
    docstring): no weight gradients, the LM head on `labelled` positions a row."""
    cfg = model.config
    block_weights = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    forward = 2 * block_weights * batch * seq + 2 * cfg.vocab_size * cfg.hidden_size * batch * labelled
    attention = cfg.num_hidden_layers * 2 * batch * seq * seq * cfg.hidden_size  # QK^T and AV, causal half
    return 2 * forward + 3 * attention


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def train_step(model, adapter, optimizer, batch: dict, args) -> None:
    """One optimizer step on one micro-batch, as the training loop takes it."""
    from peftrun.loss import keeps_logits, label_tokens, labelled_loss_sum

    with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.bf16):
        if adapter is not None:
            if "segment_ids" in batch:
                adapter.set_prompt_mask(batch["prompt_mask"], batch["segment_ids"])
            else:
                adapter.set_prompt_mask(batch["prompt_mask"])
        loss = labelled_loss_sum(model, batch, keeps_logits(model)) / max(1, label_tokens(batch))
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if adapter is not None:
        adapter.set_prompt_mask(None)


def measure_step(shape: str, name: str, args) -> dict:
    """Seconds per optimizer step (median), peak memory and trainable count of one configuration."""
    device, batch_size = args.device, args.batch[shape]
    model = build_backbone(shape, device, args.dtype, args.seq)
    flops = backbone_flops(model, batch_size, args.seq, args.seq // 4)
    model, adapter, params = attach(model, CONFIGS[name])
    optimizer = adamw(params, lr=1e-4) if params else None
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (batch_size, args.seq), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -args.seq // 4:] = ids[:, -args.seq // 4:]
    batch = {k: v.to(device) for k, v in
             {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
              "prompt_mask": (labels == -100).long()}.items()}
    times = []
    for i in range(args.warmup + args.steps):
        synchronize(device)
        start = time.perf_counter()
        train_step(model, adapter, optimizer, batch, args)
        synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    result = {"seconds": statistics.median(times), "tokens": batch_size * args.seq, "flops": flops,
              "peak_gib": peak_gib(device), "trainable": sum(p.numel() for p in params)}
    del model, adapter, optimizer, params, batch
    free(device)
    return result


def measure_packing(shape: str, method: str, packed: bool, features: list[dict], args) -> dict:
    """Tokens that are not padding, and seconds, over the timed steps of one (method, mode)."""
    from peftrun.data import collate, real_tokens
    from peftrun.train.schedule import DataOrder

    device = args.device
    model = build_backbone(shape, device, args.dtype, args.seq)
    torch.manual_seed(0)
    model, adapter, params = attach(model, PACKING_METHODS[method])
    optimizer = adamw(params, lr=1e-4)
    model.train()
    order = DataOrder(len(features), PACKING_MICRO_BATCH, seed=0)
    tokens, seconds = 0, 0.0
    for step in range(args.warmup + args.packing_steps):
        synchronize(device)
        start = time.perf_counter()
        batch = collate([features[i] for i in order.step_indices(step)], PAD, args.seq if packed else None)
        n = real_tokens(batch)
        train_step(model, adapter, optimizer, {k: v.to(device) for k, v in batch.items()}, args)
        synchronize(device)
        if step >= args.warmup:
            seconds += time.perf_counter() - start
            tokens += n
    del model, adapter, optimizer, params
    free(device)
    return {"tokens": tokens, "seconds": seconds}


def safely(measure, args, *a) -> dict:
    """`measure(*a, args)`, or why it failed (out of memory, say): one cell, not the whole run."""
    try:
        return measure(*a, args)
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
    free(args.device)  # the failed measurement's tensors went with its frame
    return {"error": error}


def step_table(shape: str, rows: dict[str, dict], args) -> list[str]:
    floor, peft_row = rows["backbone (frozen, fwd+bwd)"], rows["peft lora r=8"]
    peak = peak_flops(args.device)
    lines = [f"**{shape} shape**, random init, batch {args.batch[shape]} x {args.seq} tokens:", "",
             "| configuration | trainable | s / step | tokens/s | x backbone fwd+bwd | x PEFT LoRA | MFU | peak GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | - | failed | - | - | - | - | - |")
            notes.append(f"{shape}, {name}: {r['error']}")
            continue
        ratio = (lambda ref: "-" if "error" in ref else f"{r['seconds'] / ref['seconds']:.2f}")
        mfu = f"{r['flops'] / r['seconds'] / peak:.0%}" if peak else "-"
        gib = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {name} | {r['trainable']:,} | {r['seconds']:.4f} | {r['tokens'] / r['seconds']:,.0f} | "
                     f"{ratio(floor)} | {ratio(peft_row)} | {mfu} | {gib} |")
    return lines + [""] + [f"Failed: {n}." for n in notes]


def packing_table(shape: str, rows: dict[str, dict[str, dict]]) -> list[str]:
    lines = [f"**{shape} shape**, packing: micro-batch {PACKING_MICRO_BATCH} of varied lengths, tokens that are not "
             "padding per second:", "", "| method | padded tokens/s | packing tokens/s | gain |", "|---|---:|---:|---:|"]
    for method, row in rows.items():
        rates = [None if "error" in row[m] else row[m]["tokens"] / row[m]["seconds"] for m in ("padded", "packing")]
        cells = ["failed: " + row[m]["error"] if r is None else f"{r:,.0f}" for m, r in zip(("padded", "packing"), rates)]
        gain = f"{rates[1] / rates[0]:.2f}x" if None not in rates else "-"
        lines.append(f"| {method} | {cells[0]} | {cells[1]} | {gain} |")
    return lines + [""]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="SmolLM2-135M,LLaMA-2 7B", help="comma-separated, from: " + ", ".join(SHAPES))
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch-smollm2", type=int, default=16)
    p.add_argument("--batch-7b", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--packing-steps", type=int, default=4)
    p.add_argument("--examples", type=int, default=2000, help="the packing set's size")
    p.add_argument("--out", default=str(ROOT / "bench"))
    p.add_argument("--doc", default=str(benchmarks_doc.DOC), help="the page to write the table into (default: %(default)s)")
    p.add_argument("--no-doc", action="store_true", help="leave the page alone (quick experiments)")
    p.add_argument("--smoke", action="store_true", help="on CPUs: the tiny shape, fp32, 64 tokens, one step each; "
                   "nothing written to the page")
    args = p.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",")]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; choose from {', '.join(SHAPES)}")
    if args.smoke:
        args.shapes, args.seq, args.steps, args.warmup, args.packing_steps = ["tiny"], 64, 1, 0, 1
        args.examples, args.no_doc = 64, True
    elif not torch.cuda.is_available():
        p.error("no CUDA device here: this benchmark is for a GPU machine (--smoke runs it on CPUs)")
    args.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    args.bf16 = args.device.type == "cuda"
    args.dtype = torch.bfloat16 if args.bf16 else torch.float32
    args.batch = {s: args.batch_7b if "7B" in s else args.batch_smollm2 for s in args.shapes}
    if args.smoke:
        args.batch = {"tiny": 2}
    return args


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    argv = None if argv is None else [__file__, *argv]
    doc = None if args.no_doc else Path(args.doc)
    benchmarks_doc.preflight("bench_gpu.py", DOC_SECTIONS, doc, own_machine=True)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    features = None
    lines = []
    for shape in args.shapes:
        rows = {}
        for name in CONFIGS:
            rows[name] = safely(measure_step, args, shape, name)
            print(f"{shape}: {name}: {rows[name]}", file=sys.stderr, flush=True)
        lines += step_table(shape, rows, args)
        vocab = SHAPES[shape]["vocab_size"]
        features = instruction_set(args.examples, args.seq, vocab)
        packing = {}
        for method in PACKING_METHODS:
            packing[method] = {mode: safely(measure_packing, args, shape, method, mode == "packing", features)
                               for mode in ("padded", "packing")}
            print(f"{shape}: {method} packing: {packing[method]}", file=sys.stderr, flush=True)
        lines += packing_table(shape, packing)
    precision = "bf16 weights, fp32 adapters under bf16 autocast" if args.bf16 else "fp32"
    head = (f"{precision}, sdpa attention; median of {args.steps} steps after {args.warmup} warm-up steps (packing: "
            f"{args.packing_steps} steps), every configuration built in one process in turn; labels on the last "
            f"quarter of each row. Whole run: {(time.perf_counter() - started) / 60:.1f} min.")
    text = "\n".join([head, "", *lines]).rstrip() + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.md").write_text(text)
    print(text, end="")
    benchmarks_doc.publish("bench_gpu.py", {"gpu": text}, doc, DOC_SECTIONS, argv, own_machine=True)
    return lines


if __name__ == "__main__":
    main()
