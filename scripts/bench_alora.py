"""ALoRA scoring cost: one allocation round's AB-LoRA importance, naive (two forwards of the dev
batch per open rank) against the optimized scoring (shared block prefixes, many gate
configurations stacked per forward), on the same model and batch, with the largest score
difference.

The table goes into docs/benchmarks.md too (section `alora-scoring`, and the machine's at the
top; `--no-doc` leaves the page alone, `--doc PATH` writes another copy).

    python scripts/bench_alora.py                      # tiny Llama, dev batch 32, r_init 8
    python scripts/bench_alora.py --per-forward 64 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import benchmarks_doc  # noqa: E402  (beside this script)

# The sections of docs/benchmarks.md this script writes (tests/test_benchmarks_doc.py checks the page has them).
DOC_SECTIONS = ("alora-scoring",)


def setup(model_name: str, dev_batch: int):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import peftrun.cli  # noqa: F401
    from peftrun.data import collate_train, tokenize_examples
    from peftrun.methods import build_method
    from peftrun.models import build_model, load_tokenizer
    from peftrun.tasks import build_task

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "peftrun" / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={model_name}", "method=alora"])
    GlobalHydra.instance().clear()
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer)
    torch.manual_seed(0)
    adapter = build_method(cfg.method).attach(model)
    with torch.no_grad():  # trained-like adapter: every rank does something
        for _, p in adapter.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    features, _ = tokenize_examples(build_task(cfg.task).examples("dev")[:dev_batch], tokenizer, cfg.task.max_length)
    return adapter, collate_train(features, tokenizer.pad_token_id)


def timed(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dev-batch", type=int, default=32)
    parser.add_argument("--per-forward", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--doc", default=str(benchmarks_doc.DOC), help="the page to write the table into "
                        "(default: %(default)s)")
    parser.add_argument("--no-doc", action="store_true", help="leave the page alone (quick experiments)")
    args = parser.parse_args()
    doc = None if args.no_doc else Path(args.doc)
    benchmarks_doc.preflight("bench_alora.py", DOC_SECTIONS, doc)
    torch.set_num_threads(torch.get_num_threads())
    adapter, batch = setup(args.model, args.dev_batch)
    n = len(adapter.live_ranks())
    naive_s, naive = timed(lambda: adapter.importance_naive(batch), args.repeats)
    fast_s, fast = timed(lambda: adapter.importance(batch, ablations_per_forward=args.per_forward), args.repeats)
    diff = max(abs(naive[r] - fast[r]) for r in naive)
    table = "\n".join([
        f"| {args.model}, {n} open ranks, dev batch {args.dev_batch} | seconds per round |\n|---|---:|",
        f"| naive (2 forwards per rank, {2 * n} forwards) | {naive_s:.2f} |",
        f"| optimized (shared prefixes, {args.per_forward} ablations per forward) | {fast_s:.2f} |",
        f"| speed-up | {naive_s / fast_s:.1f}x |\n| largest score difference | {diff:.2e} |",
    ])
    print(table)
    benchmarks_doc.publish("bench_alora.py", {
        "alora-scoring": f"The fastest of {args.repeats} runs of each, torch threads default.\n\n{table}",
    }, doc, DOC_SECTIONS)


if __name__ == "__main__":
    main()
