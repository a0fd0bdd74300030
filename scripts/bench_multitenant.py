"""Multi-tenant serving cost: one backbone, a batch whose requests name different adapters.

For each configuration (tenants x prompt length) it measures time to first token (TTFT: from
the request batch to its first generated token, prefill and routing set-up included) and decode
tokens/s (every later token), greedy, against the bare backbone (the limit) and Hugging Face
PEFT's mixed-batch LoRA (`generate(..., adapter_names=...)`), on a random-init Llama.

Every model holds as many adapters of its method as the largest tenant count; a configuration
with N tenants sends the batch's rows to N of them in turn (row i of repeat k: tenant
(batch * k + i) mod N), so with 8 or more tenants every row of a batch of 8 names another
adapter. Runs are interleaved: each repeat visits every configuration, each method's group right
after a run of the bare backbone, and a configuration's "x bare" is the median of its ratios to
that paired run, so a change of machine load hits both sides alike. One thread by default: on a
shared 2-core machine, two threads waiting on each other make the timings swing far more.

`--smollm2` measures on SmolLM2-135M instead (its converted weights when models/smollm2_135m is
there, `make smollm2`; its shape randomly initialised when not), the shape of a model people serve.

The table goes into docs/benchmarks.md too (section `multitenant`, `multitenant-smollm2` with
`--smollm2`, and the machine's at the top; `--no-doc` leaves the page alone, `--doc PATH` writes
another copy).

    python scripts/bench_multitenant.py          # writes bench/multitenant.md and bench/multitenant.png
    python scripts/bench_multitenant.py --hidden 1024 --layers 16 --tenants 1 8 --prompts 128
    python scripts/bench_multitenant.py --smollm2 --tenants 1 8 --prompts 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import benchmarks_doc  # noqa: E402  (beside this script)
from bench_train import bar_chart, compose, machine, small_model, smollm2_description, smollm2_model  # noqa: E402

# The sections of docs/benchmarks.md this script writes (tests/test_benchmarks_doc.py checks the page has them).
DOC_SECTIONS = ("multitenant", "multitenant-smollm2")

# label -> method overrides (None: the bare backbone; "peft": Hugging Face PEFT's LoRA r=8)
METHODS = {
    "backbone": None,
    "peft lora r=8": "peft",
    "lora r=8": ("method=lora", "method.r=8"),
    "tied_lora tl6 r=8": ("method=tied_lora", "method.preset=tl6", "method.r=8"),
    "para bottleneck 12": ("method=para",),
    "iapt bottleneck 320": ("method=iapt",),
}


class Clock:
    """A generation streamer that notes when each step's tokens come out."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, _value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def build(label: str, args):
    """(model, router or None, tokenizer) with `args.max_tenants` adapters of the method."""
    from peftrun.multitenant import Router
    from peftrun.methods import build_method

    spec = METHODS[label]
    if args.smollm2:
        model, tokenizer, _ = smollm2_model()
    else:
        model, tokenizer, _ = small_model(SimpleNamespace(hidden=args.hidden, layers=args.layers,
                                                          seq=max(args.prompts) + args.new_tokens))
    names = [f"t{i}" for i in range(args.max_tenants)]
    torch.manual_seed(0)
    if spec is None:
        return model, None, tokenizer
    if spec == "peft":
        import peft

        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        model = peft.get_peft_model(model, config, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, config)
        return model.eval(), None, tokenizer
    method_cfg, adapters = compose(list(spec)).method, []
    for name in names:
        adapter = build_method(method_cfg).attach(model, adapter_name=name)
        with torch.no_grad():  # trained-like: off the init (IAPT's gates open)
            for pname, p in adapter.trainable_parameters():
                p.copy_(torch.ones_like(p)) if pname.endswith(".gate") else p.add_(torch.randn_like(p) * 0.02)
        adapters.append(adapter)
    return model.eval(), Router(adapters), tokenizer


def run_once(model, router, is_peft: bool, ids, mask, names, new_tokens: int) -> tuple[float, float]:
    """(TTFT seconds, decode tokens/s) of one greedy generation of `new_tokens` per row."""
    clock = Clock()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=0, streamer=clock)
    start = time.perf_counter()
    with torch.no_grad():
        if is_peft:
            model.generate(**kwargs, adapter_names=list(names))
        elif router is None:
            model.generate(**kwargs)
        else:
            with router.routing(names):
                router.set_prompt_mask(mask)
                model.generate(**kwargs)
                router.set_prompt_mask(None)
    steps = clock.times[1:]  # the first put is the prompt
    decode = ids.shape[0] * (len(steps) - 1) / (steps[-1] - steps[0]) if len(steps) > 1 else float("nan")
    return steps[0] - start, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tenants", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompts", type=int, nargs="+", default=[128, 512], help="prompt lengths in tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median)")
    parser.add_argument("--long-repeats", type=int, default=2, help="timed runs for prompts over 256 tokens")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="LABEL")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=str(ROOT / "bench"))
    parser.add_argument("--doc", default=str(benchmarks_doc.DOC), help="the page to write the table into "
                        "(default: %(default)s)")
    parser.add_argument("--no-doc", action="store_true", help="leave the page alone (quick experiments)")
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M, not the small Llama of --hidden "
                        "and --layers (its weights from models/smollm2_135m when there)")
    args = parser.parse_args()
    doc = None if args.no_doc else Path(args.doc)
    section = "multitenant-smollm2" if args.smollm2 else "multitenant"
    benchmarks_doc.preflight("bench_multitenant.py", [section], doc)
    args.max_tenants = max(args.tenants)
    args.methods = ["backbone"] + [m for m in args.methods if m != "backbone"]
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes from the libraries

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from peftrun.host_memory import keep_freed_memory

    keep_freed_memory()  # as peftrun's commands run (peftrun/host_memory.py)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    models = {label: build(label, args) for label in args.methods}
    vocab = len(next(iter(models.values()))[2])
    # (label, tenants, prompt length) -> [(TTFT s, decode tok/s, TTFT / paired bare, decode / paired bare)]
    results: dict[tuple[str, int, int], list[tuple[float, float, float, float]]] = {}
    for prompt_len in args.prompts:
        gen = torch.Generator().manual_seed(prompt_len)
        ids = torch.randint(4, vocab, (args.batch, prompt_len), generator=gen)
        mask = torch.ones_like(ids)
        repeats = args.repeats if prompt_len <= 256 else args.long_repeats
        first = 0 if prompt_len == args.prompts[0] else 1
        for rep in range(first, repeats + 1):  # round 0 warms every model up (short) and is dropped
            tokens = args.new_tokens if rep else 8
            for label in args.methods[1:]:
                model, _, _ = models["backbone"]
                bare = run_once(model, None, False, ids, mask, [None] * args.batch, tokens)
                if rep:
                    results.setdefault(("backbone", 1, prompt_len), []).append((*bare, 1.0, 1.0))
                for n in args.tenants:
                    model, router, _ = models[label]
                    names = [f"t{(args.batch * rep + i) % n}" for i in range(args.batch)]
                    ttft, decode = run_once(model, router, METHODS[label] == "peft", ids, mask, names, tokens)
                    if rep:
                        results.setdefault((label, n, prompt_len), []).append(
                            (ttft, decode, ttft / bare[0], decode / bare[1]))
    load_after = os.getloadavg()[0]

    rows = []
    for (label, n, prompt_len), timings in results.items():
        ttft, decode, ttft_x, decode_x = (statistics.median(t[i] for t in timings) for i in range(4))
        rows.append({"label": label, "tenants": n, "prompt": prompt_len, "ttft": ttft, "decode": decode,
                     "ttft_x": ttft_x, "x_bare": decode_x})
    # The run's setting: on stdout with the machine, on the page without (it names the machine once, at the top).
    built = smollm2_description() if args.smollm2 else f"random-init Llama hidden {args.hidden}, {args.layers} layers"
    head = f"Multi-tenant generation, {built}, batch {args.batch}, {args.new_tokens} new tokens (greedy), fp32, "
    tail = (f"{torch.get_num_threads()} torch thread(s); load average {load_before:.1f} before, {load_after:.1f} "
            f"after; {args.max_tenants} adapters attached per method; medians of {args.repeats} runs "
            f"({args.long_repeats} for prompts over 256 tokens) after a warm-up round, x bare: median of the ratios "
            f"to the paired backbone run; {time.perf_counter() - started:.0f} s.")
    lines = [
        f"{head}{machine().split(', torch')[0]}, {tail}",
        "",
        "| configuration | tenants | prompt | TTFT ms | x bare TTFT | decode tok/s | x bare decode |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["prompt"], args.methods.index(r["label"]), r["tenants"])):
        tenants = "-" if r["label"] == "backbone" else r["tenants"]
        lines.append(f"| {r['label']} | {tenants} | {r['prompt']} | {1000 * r['ttft']:.0f} | {r['ttft_x']:.2f} | "
                     f"{r['decode']:.0f} | {r['x_bare']:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{section}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    shown = [r for r in sorted(rows, key=lambda r: (r["prompt"], args.methods.index(r["label"]), r["tenants"]))
             if r["label"] != "backbone"]
    bar_chart(out / f"{section}.png", [f"{r['label']}, {r['tenants']} ten., {r['prompt']} tok" for r in shown],
              [r["x_bare"] for r in shown], "decode tokens/s / the bare backbone's (same prompt length)",
              ["#999" if r["label"].startswith("peft") else "#3b7" for r in shown])
    # The page names the machine once, at the top: here the setting and the table only.
    body = "\n".join([head + tail, *lines[1:]])
    benchmarks_doc.publish("bench_multitenant.py", {"multitenant": None if args.smollm2 else body,
                                                    "multitenant-smollm2": body if args.smollm2 else None},
                           doc, DOC_SECTIONS)


if __name__ == "__main__":
    main()
