"""ALoRA's allocation rounds: what one round's AB-LoRA scoring costs, counted in LoRA training
steps of the same model on a batch of the same size, exactly (the default) and by the first-order
estimate (`method.score_estimator=taylor`), with the estimate's agreement with the exact scores;
on the toy shape (`model=tiny`) and on SmolLM2-135M's (its converted folder when present, else
the same shape randomly initialised). On the toy shape the optimized exact scoring is also timed
against the definition as written (two full forwards per open rank), with the largest difference.

The adapter is made trained-like first: every slot perturbed (every rank does something), then
`--train-steps` AdamW steps on training batches, so that the scores are taken, as in a run, near
where training brought the adapter. A model with more blocks than `--sample-blocks` has its exact
round timed and compared on the ranks of that many evenly spread blocks (a rank's cost depends on
its block: the blocks before it are shared) and its time scaled to all blocks; a full exact
round on SmolLM2 (1,680 open ranks) takes hours on two cores.

The tables go into docs/benchmarks.md too (section `alora-scoring`, and the machine's at the
top; `--no-doc` leaves the page alone, `--doc PATH` writes another copy).

    python scripts/bench_alora.py                      # tiny and SmolLM2 shapes, dev batch 32
    python scripts/bench_alora.py --models tiny --per-forward 64 --repeats 3 --no-doc
"""

from __future__ import annotations

import argparse
import statistics
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


def setup(model_name: str, dev_batch: int, train_steps: int = 0):
    """(ALoRA adapter, LoRA adapter on a second copy of the backbone, dev batch, what was built)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import peftrun.cli  # noqa: F401
    from peftrun.data import collate_train, tokenize_examples
    from peftrun.methods import build_method
    from peftrun.models import build_model, load_tokenizer
    from peftrun.tasks import build_task

    from bench_train import smollm2_model

    def config(method: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "peftrun" / "conf"), version_base="1.3"):
            return compose(config_name="config", overrides=[f"model={model_name}", f"method={method}"])

    cfg = config("alora")
    GlobalHydra.instance().clear()
    if model_name == "smollm2_135m":
        model, tokenizer, built = smollm2_model()
        twin, _, _ = smollm2_model()
    else:
        tokenizer = load_tokenizer(cfg.model)
        model, twin = build_model(cfg.model, tokenizer), build_model(cfg.model, tokenizer)
        built = f"`model={model_name}`"
    torch.manual_seed(0)
    adapter = build_method(cfg.method).attach(model)
    lora = build_method(config("lora").method).attach(twin)
    GlobalHydra.instance().clear()
    with torch.no_grad():  # trained-like adapter: every rank does something
        for _, p in adapter.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    task = build_task(cfg.task)
    features, _ = tokenize_examples(task.examples("dev")[:dev_batch], tokenizer, cfg.task.max_length)
    batch = collate_train(features, tokenizer.pad_token_id)
    train, _ = tokenize_examples(task.examples("train")[: dev_batch * max(train_steps, 1)], tokenizer,
                                 cfg.task.max_length)
    train_batches = [collate_train(train[i : i + dev_batch], tokenizer.pad_token_id)
                     for i in range(0, dev_batch * train_steps, dev_batch)]
    fit(adapter, train_batches)
    return adapter, lora, batch, built


def fit(adapter, batches, lr: float = 1e-3) -> None:
    from peftrun.loss import labelled_loss_sum
    from peftrun.train.optimizer import adamw

    optimizer = adamw([p for _, p in adapter.trainable_parameters()], lr=lr)
    adapter.model.train()
    for batch in batches:
        (labelled_loss_sum(adapter.model, batch) / int((batch["labels"][:, 1:] != -100).sum())).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def lora_step_seconds(lora, batch, steps: int = 3) -> float:
    """Median seconds of a LoRA training step (forward, backward, AdamW) on `batch`, after one warm-up."""
    from peftrun.loss import labelled_loss_sum
    from peftrun.train.optimizer import adamw

    optimizer = adamw([p for _, p in lora.trainable_parameters()], lr=1e-5)
    lora.model.train()
    n = int((batch["labels"][:, 1:] != -100).sum())
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        (labelled_loss_sum(lora.model, batch) / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def timed(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (ties take their mean rank)."""

    def ranks(v: list[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        r = torch.empty_like(t)
        r[t.argsort()] = torch.arange(len(v), dtype=torch.float64)
        for value in t.unique():
            tied = t == value
            r[tied] = r[tied].mean()
        return r - r.mean()

    ra, rb = ranks(a), ranks(b)
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def sampled_ranks(adapter, blocks: int) -> tuple[list, float]:
    """The open ranks of `blocks` evenly spread blocks (all when the model has no more), and the
    factor from their exact scoring time to a whole round's."""
    from peftrun.methods.alora.scoring import block_of, decoder_layers

    prefix, layers = decoder_layers(adapter.model)
    live = adapter.live_ranks()
    if len(layers) <= blocks:
        return live, 1.0
    chosen = {round(i * (len(layers) - 1) / (blocks - 1)) for i in range(blocks)} if blocks > 1 else {0}
    picked = [r for r in live if block_of(r[0], prefix) in chosen]
    return picked, len(layers) / len(chosen)


def exact_scores(adapter, batch, ranks, per_forward: int) -> dict:
    """The exact AB-LoRA score of `ranks` (adapter.importance on a subset of the open ranks)."""
    from peftrun.methods.alora.scoring import ablation_losses

    configs = [("without", r) for r in ranks] + [("only", r) for r in ranks]
    losses = ablation_losses(adapter, batch, configs, per_forward)
    return {r: losses[i] - losses[len(ranks) + i] for i, r in enumerate(ranks)}


def measure(model_name: str, args) -> dict:
    """One shape's figures: seconds per LoRA step, exact and taylor round, their agreement."""
    from peftrun.methods.alora.scoring import taylor_scores

    adapter, lora, batch, built = setup(model_name, args.dev_batch, args.train_steps)
    live = adapter.live_ranks()
    ranks, scale = sampled_ranks(adapter, args.sample_blocks)
    step_s = lora_step_seconds(lora, batch)
    exact_s, exact = timed(lambda: exact_scores(adapter, batch, ranks, args.per_forward), args.repeats)
    taylor_s, taylor = timed(lambda: taylor_scores(adapter, batch, live), args.repeats)
    n_a = adapter.n_per_round
    lowest = [set(sorted(ranks, key=lambda r: (s[r], r))[:n_a]) for s in (exact, taylor)]
    row = {
        "model": model_name, "built": built, "open": len(live), "scored": len(ranks), "n_a": n_a,
        "batch": tuple(batch["input_ids"].shape), "step_s": step_s, "exact_s": exact_s * scale,
        "taylor_s": taylor_s, "spearman": spearman([exact[r] for r in ranks], [taylor[r] for r in ranks]),
        "overlap": len(lowest[0] & lowest[1]),
    }
    if scale == 1.0:  # the whole round is scored: the definition as written too
        row["naive_s"], naive = timed(lambda: adapter.importance_naive(batch), args.repeats)
        row["diff"] = max(abs(naive[r] - exact[r]) for r in naive)
    return row


def tables(rows: list[dict], args) -> str:
    lines = [f"| shape, dev batch {args.dev_batch} | open ranks | LoRA step s | exact round s | in LoRA steps | "
             "taylor round s | in LoRA steps | Spearman | pruned set overlap |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        sampled = "" if r["scored"] == r["open"] else f" (timed on {r['scored']}, scaled)"
        lines.append(f"| {r['built']}, {r['batch'][0]} x {r['batch'][1]} tokens | {r['open']:,} | {r['step_s']:.3f} | "
                     f"{r['exact_s']:.2f}{sampled} | {r['exact_s'] / r['step_s']:.0f} | {r['taylor_s']:.3f} | "
                     f"{r['taylor_s'] / r['step_s']:.1f} | {r['spearman']:.2f} | {r['overlap']} of {r['n_a']} |")
    for r in rows:
        if "naive_s" in r:
            lines += ["", f"| {r['model']}, {r['open']} open ranks, dev batch {args.dev_batch} | seconds per round |",
                      "|---|---:|",
                      f"| naive (2 forwards per rank, {2 * r['open']} forwards) | {r['naive_s']:.2f} |",
                      f"| optimized (shared prefixes, {args.per_forward} ablations per forward) | {r['exact_s']:.2f} |",
                      f"| speed-up | {r['naive_s'] / r['exact_s']:.1f}x |",
                      f"| largest score difference | {r['diff']:.2e} |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,smollm2_135m", help="comma-separated model configs")
    parser.add_argument("--dev-batch", type=int, default=32)
    parser.add_argument("--per-forward", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--sample-blocks", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--doc", default=str(benchmarks_doc.DOC), help="the page to write the table into "
                        "(default: %(default)s)")
    parser.add_argument("--no-doc", action="store_true", help="leave the page alone (quick experiments)")
    args = parser.parse_args()
    doc = None if args.no_doc else Path(args.doc)
    benchmarks_doc.preflight("bench_alora.py", DOC_SECTIONS, doc)
    torch.set_num_threads(args.threads)
    from peftrun.host_memory import keep_freed_memory

    keep_freed_memory()  # as peftrun's commands run (peftrun/host_memory.py)
    rows = [measure(name, args) for name in args.models.split(",")]
    table = tables(rows, args)
    print(table)
    intro = (f"One allocation round's scoring, {args.threads} torch thread(s); the fastest of {args.repeats} runs of "
             f"each round, a LoRA step (r=8, same model, the dev batch) the median of 3. The adapter perturbed "
             f"then trained {args.train_steps} steps first. Exact: the AB-LoRA score (the default); taylor: "
             f"`method.score_estimator=taylor`, its first-order estimate, compared with the exact scores over "
             f"the ranks timed (Spearman's rank correlation; overlap of the n_A lowest, the ranks a round "
             f"prunes). Exact rounds on more than {args.sample_blocks} blocks are timed on the ranks of "
             f"{args.sample_blocks} evenly spread blocks and scaled to all.")
    benchmarks_doc.publish("bench_alora.py", {"alora-scoring": f"{intro}\n\n{table}"}, doc, DOC_SECTIONS)


if __name__ == "__main__":
    main()
