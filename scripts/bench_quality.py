"""Learning curves at matched trainable-parameter budgets: every method on every synthetic task,
several seeds, on the small backbone pretrained here (`scripts/pretrain_tiny.py`, run first if
its folder is missing).

Each method's size knob is set so its trainable parameters come nearest a common budget (LoRA
r=4 on every linear; `quality/methods.py`), but `tied_lora tl6 r=8`, the Tied-LoRA paper's
claim of parity at a fraction of the parameters. Training goes through peftrun's own loop (two
runs at a time in worker processes, one torch thread each; `--workers 1`: one at a time here):
AdamW, linear decay after 6% warm-up, batch 16, the same number of steps for every method on a
task (`TASK_STEPS`: every method's curve flattens within it), dev loss and the dev metric
(greedy) every 1/16 of the run, the adapter with the best dev loss tested. The learning rates
come from `quality/lr_picks.json`, which `--sweep-lr` rewrites. Per method and task the table
gives the final and best dev metric, the step and the training seconds (evaluations left out)
at which it first reaches 90% of the best method's final metric, what it still gained over the
last quarter, and the test metric; one PNG per task plots the curves against steps and seconds.

The tables go into docs/benchmarks.md (sections `quality-backbone` and `quality-curves`, with
--sweep-lr `quality-lr`); `--no-doc` leaves the page alone, `--doc PATH` writes another copy,
`--smoke` a throwaway copy unless `--doc` names one.

    python scripts/bench_quality.py                 # bench/quality_curves.md, bench/quality_<task>.png
    python scripts/bench_quality.py --tasks synth_qa --methods lora,iapt --seeds 0 --no-doc
    python scripts/bench_quality.py --smoke         # a minute: a throwaway backbone, 4 steps, tiny splits
    python scripts/bench_quality.py --sweep-lr 1e-3,3e-3,1e-2 --sweep-steps 300 --tasks synth_qa,synth_math
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Sleeping OpenMP waiters: spinning ones slow every process down many times on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import benchmarks_doc  # noqa: E402  (beside this script)
from quality import benchmark, lr as lr_module, report  # noqa: E402
from quality.methods import DEFAULT_METHODS, METHODS, count, knob_text, match_budget  # noqa: E402
from quality.runs import Plan, add_run_arguments, check_run_arguments, zero_shot  # noqa: E402

# The sections of docs/benchmarks.md this script writes (tests/test_benchmarks_doc.py checks the page has them):
# the backbone and the learning curves, or (--sweep-lr) the learning rates.
DOC_SECTIONS = ("quality-backbone", "quality-curves", "quality-lr")
BACKBONE = "tiny_pretrained"
TASKS = ("synth_qa", "synth_math", "synth_sentiment")
# Steps per task, the same for every method (batch 16; 2,000 training examples = 125 steps an
# epoch): long enough for the slowest method, IAPT, to flatten out. At lr 1e-2 it scored 23.5 exact
# match on synth_qa after 200 steps and 86.5 / 92.5 (seeds 0, 1) after 600, where the weight-based
# methods were at 97-100 by 200; on synth_math it was at 31.5-58.0% after 800 steps, still rising.
TASK_STEPS = {"synth_qa": 960, "synth_math": 1920, "synth_sentiment": 480}
EVALS = 16  # evaluations per run: dev loss and dev metric every steps / EVALS
SMOKE_STEPS = 4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=str(ROOT / "models" / "tiny_pretrained"))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=None, help=f"steps for every task (default: per task, {TASK_STEPS})")
    p.add_argument("--evals", type=int, default=EVALS, help="evaluations per run (default: %(default)s)")
    p.add_argument("--budget-rank", type=int, default=4, help="the budget is LoRA at this rank on every linear")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="override a method's picked lr")
    p.add_argument("--picks", default=str(lr_module.PICKS), help="the learning-rate picks file (default: %(default)s)")
    p.add_argument("--out", default=str(ROOT / "bench"))
    add_run_arguments(p)
    p.add_argument("--smoke", action="store_true", help="a throwaway backbone, 4 steps, tiny splits, one seed")
    p.add_argument("--doc", default=None, help="the page to write the tables into (default: "
                   f"{benchmarks_doc.DOC}; with --smoke, a throwaway copy of it)")
    p.add_argument("--no-doc", action="store_true", help="leave the page alone (quick experiments)")
    p.add_argument("--sweep-lr", default=None, metavar="LR,LR,...",
                   help="instead of the benchmark: each method at each of these rates (first seed, dev loss "
                        "after --sweep-steps), the best mean dev loss over the tasks picked into --picks")
    p.add_argument("--sweep-steps", type=int, default=300, help="steps per sweep run (default: %(default)s)")
    args = p.parse_args(argv)
    check_run_arguments(p, args)
    args.tasks = args.tasks.split(",")
    args.methods = args.methods.split(",")
    for m in args.methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    try:  # argparse's own one-line error (exit 2) for a malformed list
        args.seeds = [int(s) for s in args.seeds.split(",")]
        args.lr = {m: float(v) for m, v in (item.rsplit("=", 1) for item in args.lr)}
        args.sweep_lr = [float(v) for v in args.sweep_lr.split(",")] if args.sweep_lr else None
    except ValueError as e:
        p.error(f"--seeds 0,1 / --lr METHOD=LR / --sweep-lr LR,LR: {e}")
    if args.evals < 1:
        p.error(f"--evals {args.evals}: give 1 or more")
    for m in args.lr:
        if m not in METHODS:
            p.error(f"--lr {m}=...: unknown method; choose from {', '.join(METHODS)}")
    if args.smoke:
        args.steps, args.sweep_steps, args.evals, args.seeds = SMOKE_STEPS, SMOKE_STEPS, 2, args.seeds[:1]
    return args


def task_steps(args, task: str) -> int:
    return args.steps or TASK_STEPS.get(task, 480)


def eval_every(steps: int, evals: int) -> int:
    """The largest divisor of `steps` at most steps / evals (an evaluation at the last step)."""
    every = max(1, steps // evals)
    while steps % every:
        every -= 1
    return every


def ensure_backbone(args, scratch: Path) -> tuple[Path, dict]:
    """The pretrained folder, made first when missing (the smoke mode makes a throwaway one)."""
    import pretrain_tiny

    folder = Path(args.model_dir)
    if args.smoke:
        folder = scratch / "tiny_pretrained"
        pretrain_tiny.main(["--out", str(folder), "--steps", "2", "--hidden", "32", "--layers", "1",
                            "--eval-windows", "4", "--probes", "4", "--log-every", "1"])
    elif not (folder / "config.json").exists():
        print(f"no pretrained backbone in {folder}: pretraining it first", flush=True)
        pretrain_tiny.main(["--out", str(folder)])
    return folder, json.loads((folder / "pretrain.json").read_text())


def doc_path(args, scratch: Path) -> Path | None:
    """Where the tables go: nowhere with --no-doc, else --doc's page; by default docs/benchmarks.md,
    or for a smoke run (whose numbers mean nothing) a throwaway copy of it in `scratch`."""
    if args.no_doc:
        return None
    if args.doc:
        return Path(args.doc)
    if not args.smoke:
        return benchmarks_doc.DOC
    copy = scratch / benchmarks_doc.DOC.name
    if benchmarks_doc.DOC.exists():
        shutil.copyfile(benchmarks_doc.DOC, copy)
    return copy


def picks_path(args, scratch: Path) -> Path:
    """The picks file; a smoke sweep writes a throwaway copy instead of the committed one."""
    path = Path(args.picks)
    if args.smoke and args.sweep_lr:
        copy = scratch / path.name
        if path.exists():
            shutil.copyfile(path, copy)
        return copy
    return path


# pretrain_tiny.py's probe skills -> the page's column names
SKILL_COLUMNS = {"lookup": "facts", "copy": "copying", "arithmetic": "one-step arithmetic", "chain": "worked chains",
                 "story": "two-step stories", "instruction": "instructions", "sentiment": "sentiment words"}


def backbone_report(info: dict) -> str:
    """The backbone's held-out loss and skills, as its pretrain.json records them, in Markdown."""
    a, skills = info["args"], info.get("skill_accuracy", {})
    return "\n".join([
        f"The backbone of the run, as `scripts/pretrain_tiny.py` recorded it: Llama hidden {a['hidden']}, "
        f"{a['layers']} layers, {info['parameters']:,} parameters, {info['tokens']:,} pretraining tokens in "
        f"{info['train_seconds'] / 60:.1f} min of training; held-out loss per "
        f"{info.get('heldout_loss_unit', 'token')}.",
        "",
        "| held-out LM loss | " + " | ".join(SKILL_COLUMNS.get(k, k) for k in skills) + " |",
        "|---:|" + "---:|" * len(skills),
        f"| {info['heldout_loss']['all']:.3f} | " + " | ".join(f"{v:.0f}%" for v in skills.values()) + " |",
        "",
        f"(Greedy accuracy on {a.get('probes', 'the')} held-out probes per form of the corpus.)",
    ])


def test_columns(task: str) -> list[tuple[str, str]]:
    return [("test exact_match", "test_exact_match"), ("test f1", "test_f1")] if task == "synth_qa" else \
        [("test accuracy", "test_accuracy")]


def main(argv=None) -> None:
    args = parse_args(argv)
    argv = None if argv is None else [__file__, *argv]  # the command line the page records
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no bar per checkpoint load
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peftrun-quality-") as scratch:
        scratch = Path(scratch)
        doc = doc_path(args, scratch)
        benchmarks_doc.preflight("bench_quality.py", ["quality-lr"] if args.sweep_lr else
                                 ["quality-backbone", "quality-curves"], doc)  # before the long part
        picks = picks_path(args, scratch)
        lrs = None if args.sweep_lr else lr_module.learning_rates(BACKBONE, args.methods, args.lr, picks)
        folder, info = ensure_backbone(args, scratch)
        model_overrides = (f"model={BACKBONE}", f"model.name_or_path={folder}")
        budget = count("lora", args.budget_rank, list(model_overrides))
        sizes = {label: match_budget(label, budget, list(model_overrides)) for label in args.methods}
        print(f"budget {budget:,} trainable parameters (LoRA r={args.budget_rank}); sizes:", flush=True)
        for label, (k, n) in sizes.items():
            print(f"  {label:18s} {knob_text(label, k):14s} {n:>9,} ({n / budget:.2f}x)", flush=True)
        small = ("task.num_train=32", "task.num_dev=8", "task.num_test=8") if args.smoke else ()
        sweeping = args.sweep_lr is not None
        steps = {t: args.sweep_steps if sweeping else task_steps(args, t) for t in args.tasks}
        plan = Plan(model_overrides=model_overrides, task_overrides={t: (f"task={t}", *small) for t in args.tasks},
                    steps=steps, eval_every={t: s if sweeping else eval_every(s, args.evals) for t, s in steps.items()},
                    sizes=sizes, batch=4 if args.smoke else 16, generate=not sweeping, workers=args.workers,
                    reuse=args.reuse)
        runs_root = Path(args.runs) if args.runs else scratch / "runs"
        out = scratch / "out" if args.smoke else Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if sweeping:
            lines = benchmark.sweep_and_record(plan, BACKBONE, args.tasks, args.methods, args.sweep_lr, args.seeds[0],
                                               runs_root, picks, started)
            text = "\n".join(lines)
            (out / "quality_lr.md").write_text(text + "\n")
            print(text)
            benchmarks_doc.publish("bench_quality.py", {"quality-lr": text}, doc, DOC_SECTIONS, argv)
        else:
            zero = {task: zero_shot(plan, task) for task in args.tasks}
            for task, z in zero.items():
                print(f"{task}: backbone zero-shot {z['primary_metric']} {z[z['primary_metric']]:.1f}", flush=True)
            results, failed = benchmark.run_methods(plan, args.tasks, args.methods, args.seeds, lrs, runs_root, started)
            metrics = {t: zero[t]["primary_metric"].removeprefix("test_") for t in args.tasks}
            a = info["args"]
            lines = [
                f"Backbone: Llama hidden {a['hidden']}, {a['layers']} layers, {info['parameters']:,} parameters "
                f"(`model={BACKBONE}`). Budget: {budget:,} trainable parameters (LoRA r={args.budget_rank} on every "
                f"linear). Batch {plan.batch}; steps per task, the same for every method: "
                + ", ".join(f"{t} {s} (evaluated every {plan.eval_every[t]})" for t, s in steps.items())
                + f"; seeds {', '.join(map(str, args.seeds))}; learning rates from `{Path(args.picks).name}`. "
                "The curves are the seeds' means; training seconds leave the evaluations out, with two one-thread "
                f"runs sharing the cores. Whole benchmark: {(time.perf_counter() - started) / 60:.0f} min.", "",
                *benchmark.task_sections(results, zero, sizes, {t: test_columns(t) for t in args.tasks}, metrics, out,
                                         doc, "quality"),
                *report.failures(failed)]
            text = "\n".join(lines).rstrip() + "\n"
            (out / "quality_curves.md").write_text(text)
            print(text)
            benchmarks_doc.publish("bench_quality.py", {"quality-backbone": backbone_report(info),
                                                        "quality-curves": text}, doc, DOC_SECTIONS, argv)
        if args.smoke:
            print(f"smoke: wrote {sorted(p.name for p in out.iterdir())}")


if __name__ == "__main__":
    main()
