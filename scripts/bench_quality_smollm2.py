"""Learning curves at matched trainable-parameter budgets on a real pretrained model:
SmolLM2-135M-Instruct (`model=smollm2_135m`, made offline by `make smollm2`), with the zero-shot
model as a row.

The tasks are the synthetic ones (an invented world, generated offline: in no model's
pretraining), written as chat conversations and trained through `task=chat`
(`quality/chat_data.py`): a system message stating the answer's form, the question as the user
message, the answer as the reply (the last, and only, one trained). Each method's size knob is
set so its trainable parameters come nearest a common budget (LoRA r=2 on every linear;
Tied-LoRA cannot reach more on this model), but `tied_lora tl6 r=8` (the Tied-LoRA paper's claim
of parity at a fraction of the parameters). Training goes through peftrun's own loop, two runs
at a time in worker processes of one torch thread each: AdamW, linear decay after 6% warm-up,
batch 8 of ~60-80 tokens, the same steps for every method on a task, dev loss and dev exact
match of the reply (greedy) every 1/5 of the run, the adapter with the best dev loss tested.
ALoRA makes one reallocation round, scored on 4 dev examples (a round scores every open rank
with forwards of the whole model). The test set is scored twice: exact match of the reply,
and the synthetic task's own metric (SQuAD exact match / F1; the final number), which forgives
the zero-shot model's sentences. The learning rates come from `quality/lr_picks.json`
(`--sweep-lr` rewrites this model's entry).

The table goes into docs/benchmarks.md (section `quality-smollm2`; with --sweep-lr
`quality-smollm2-lr`); `--no-doc` leaves the page alone, `--doc PATH` writes another copy.

    python scripts/bench_quality_smollm2.py                 # about 95 min on 2 cores (synth_qa 64, synth_sentiment 31)
    python scripts/bench_quality_smollm2.py --seeds 0,1     # twice that
    python scripts/bench_quality_smollm2.py --sweep-lr 1e-4,3e-4,1e-3    # the picks, about 30 min
    python scripts/bench_quality_smollm2.py --smoke         # a few minutes: 4 steps, tiny splits, no page
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import benchmarks_doc  # noqa: E402  (beside this script)
from bench_quality import eval_every, picks_path  # noqa: E402
from quality import benchmark, chat_data, lr as lr_module, report  # noqa: E402
from quality.methods import METHODS, count, knob_text, match_budget  # noqa: E402
from quality.runs import Plan, add_run_arguments, check_run_arguments, zero_shot  # noqa: E402

# The sections of docs/benchmarks.md this script writes (tests/test_benchmarks_doc.py checks the page has them).
DOC_SECTIONS = ("quality-smollm2", "quality-smollm2-lr")
BACKBONE = "smollm2_135m"
DEFAULT_FOLDER = ROOT / "models" / "smollm2_135m"
TASKS = ("synth_qa", "synth_sentiment")  # synth_math too with --tasks: its worked answers make a run ~26 min
METHOD_LABELS = ("lora", "tied_lora tl6", "tied_lora tl6 r=8", "alora", "para", "iapt")
TASK_STEPS = {"synth_qa": 200, "synth_math": 200, "synth_sentiment": 150}
EVALS = 5
# Examples per split: training examples enough for every step to see new ones; dev and test
# small, as every evaluation generates for the whole dev set with a 135M model on CPUs.
COUNTS = {"train": 2000, "dev": 64, "test": 100}
SMOKE_COUNTS = {"train": 16, "dev": 4, "test": 4}
SWEEP_TEST = 8  # test examples of a sweep run (its score is not used)
TEST_COLUMNS = {  # (header, summary key): the reply's exact match, then the task's own metric
    "synth_qa": [("test EM (reply)", "test_exact_match"), ("test EM (task)", "task_exact_match"),
                 ("test F1 (task)", "task_f1")],
    "synth_math": [("test EM (reply)", "test_exact_match"), ("test accuracy (task)", "task_accuracy")],
    "synth_sentiment": [("test EM (reply)", "test_exact_match"), ("test accuracy (task)", "task_accuracy")],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=str(DEFAULT_FOLDER), help="the converted model (default: %(default)s)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(METHOD_LABELS), help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=None, help=f"steps for every task (default: per task, {TASK_STEPS})")
    p.add_argument("--evals", type=int, default=EVALS, help="evaluations per run (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--budget-rank", type=int, default=2, help="the budget is LoRA at this rank on every linear")
    p.add_argument("--alora-rounds", type=int, default=1)
    p.add_argument("--alora-dev-batch", type=int, default=4)
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="override a method's picked lr")
    p.add_argument("--picks", default=str(lr_module.PICKS), help="the learning-rate picks file (default: %(default)s)")
    p.add_argument("--out", default=str(ROOT / "bench"))
    add_run_arguments(p)
    p.add_argument("--smoke", action="store_true", help="4 steps, tiny splits, one seed, nothing written to the page "
                   "or the picks file")
    p.add_argument("--doc", default=str(benchmarks_doc.DOC), help="the page to write the table into (default: %(default)s)")
    p.add_argument("--no-doc", action="store_true", help="leave the page alone (quick experiments)")
    p.add_argument("--sweep-lr", default=None, metavar="LR,LR,...",
                   help="instead of the benchmark: each method at each of these rates (first seed, dev loss after "
                        "--sweep-steps), the best mean dev loss over the tasks picked into --picks")
    p.add_argument("--sweep-steps", type=int, default=60, help="steps per sweep run (default: %(default)s)")
    p.add_argument("--sweep-tasks", default="synth_qa", help="the sweep's tasks (default: %(default)s)")
    args = p.parse_args(argv)
    check_run_arguments(p, args)
    args.tasks = args.tasks.split(",")
    args.sweep_tasks = args.sweep_tasks.split(",")
    args.methods = args.methods.split(",")
    for m in args.methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    for t in {*args.tasks, *args.sweep_tasks}:
        if t not in chat_data.SYSTEM:
            p.error(f"--tasks: unknown task {t!r}; choose from {', '.join(chat_data.SYSTEM)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
        args.lr = {m: float(v) for m, v in (item.rsplit("=", 1) for item in args.lr)}
        args.sweep_lr = [float(v) for v in args.sweep_lr.split(",")] if args.sweep_lr else None
    except ValueError as e:
        p.error(f"--seeds 0,1 / --lr METHOD=LR / --sweep-lr LR,LR: {e}")
    if args.smoke:
        args.steps, args.sweep_steps, args.evals, args.seeds, args.no_doc = 4, 4, 2, args.seeds[:1], True
        args.batch = 2
    return args


def rescore(task: str, summary: dict, count_: int) -> dict:
    """A finished run's test predictions scored with the synthetic task's own metric (`task_*`)."""
    scores = chat_data.native_scores(task, chat_data.read_predictions(Path(summary["run_dir"])), count_)
    return {f"task_{k}": v for k, v in scores.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    argv = None if argv is None else [__file__, *argv]
    folder = Path(args.folder).resolve()
    if not (folder / "config.json").is_file():
        print(f"bench_quality_smollm2.py: error: no converted model in {folder}; make it with `make smollm2`",
              file=sys.stderr)
        raise SystemExit(2)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peftrun-quality-smollm2-") as scratch:
        scratch = Path(scratch)
        doc = None if args.no_doc else Path(args.doc)
        sweeping = args.sweep_lr is not None
        benchmarks_doc.preflight("bench_quality_smollm2.py", ["quality-smollm2-lr" if sweeping else "quality-smollm2"],
                                 doc)
        picks = picks_path(args, scratch)
        lrs = None if sweeping else lr_module.learning_rates(BACKBONE, args.methods, args.lr, picks,
                                                                fallback=1e-4 if args.smoke else None)
        model_overrides = (f"model={BACKBONE}", f"model.name_or_path={folder}")
        budget = count("lora", args.budget_rank, list(model_overrides))
        sizes = {label: match_budget(label, budget, list(model_overrides)) for label in args.methods}
        print(f"budget {budget:,} trainable parameters (LoRA r={args.budget_rank}); sizes:", flush=True)
        for label, (k, n) in sizes.items():
            print(f"  {label:18s} {knob_text(label, k):14s} {n:>9,} ({n / budget:.2f}x)", flush=True)
        tasks = args.sweep_tasks if sweeping else args.tasks
        counts = dict(SMOKE_COUNTS if args.smoke else COUNTS)
        if sweeping:
            counts["test"] = min(counts["test"], SWEEP_TEST)
        data_dir = Path(args.runs) / "data" if args.runs else scratch / "data"
        task_overrides = {t: chat_data.task_overrides(t, chat_data.write_files(t, data_dir, counts)) for t in tasks}
        steps = {t: args.sweep_steps if sweeping else (args.steps or TASK_STEPS.get(t, 200)) for t in tasks}
        plan = Plan(model_overrides=model_overrides, task_overrides=task_overrides, steps=steps,
                    eval_every={t: s if sweeping else eval_every(s, args.evals) for t, s in steps.items()},
                    sizes=sizes, batch=args.batch, eval_batch=32, generate=not sweeping, alora_rounds=args.alora_rounds,
                    alora_dev_batch=min(args.alora_dev_batch, counts["dev"]), workers=args.workers,
                    reuse=args.reuse)
        runs_root = Path(args.runs) if args.runs else scratch / "runs"
        out = scratch / "out" if args.smoke else Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if sweeping:
            lines = benchmark.sweep_and_record(plan, BACKBONE, tasks, args.methods, args.sweep_lr, args.seeds[0],
                                               runs_root, picks, started)
            text = "\n".join(lines)
            (out / "quality_smollm2_lr.md").write_text(text + "\n")
            print(text)
            benchmarks_doc.publish("bench_quality_smollm2.py", {"quality-smollm2-lr": text}, doc, DOC_SECTIONS, argv)
        else:
            zero = {}
            for task in tasks:
                z = zero_shot(plan, task)
                z.update({f"task_{k}": v for k, v in chat_data.native_scores(task, z["predictions"], counts["test"]).items()})
                zero[task] = z
                print(f"{task}: zero-shot EM (reply) {z['test_exact_match']:.1f}, task's metric "
                      f"{ {k: round(v, 1) for k, v in z.items() if k.startswith('task_')} } "
                      f"(e.g. {z['predictions'][0]!r})", flush=True)
            results, failed = benchmark.run_methods(plan, tasks, args.methods, args.seeds, lrs, runs_root, started,
                                                    rescore=lambda t, s: rescore(t, s, counts["test"]))
            lines = [
                f"SmolLM2-135M-Instruct (`model={BACKBONE}`, float32). Budget: {budget:,} trainable parameters "
                f"(LoRA r={args.budget_rank} on every linear). Chat-rendered synthetic tasks, {counts['train']:,} "
                f"training / {counts['dev']} dev / {counts['test']} test examples; batch {plan.batch}; steps per task, "
                "the same for every method: " + ", ".join(f"{t} {s} (evaluated every {plan.eval_every[t]})"
                                                           for t, s in steps.items())
                + f"; seeds {', '.join(map(str, args.seeds))}; learning rates from `{Path(args.picks).name}`; ALoRA "
                f"{args.alora_rounds} round(s) on {plan.alora_dev_batch} dev examples. Dev metric: exact match of the "
                "reply; training seconds leave the evaluations out, with two one-thread runs sharing the cores. "
                f"Whole benchmark: {(time.perf_counter() - started) / 60:.0f} min.", "",
                *benchmark.task_sections(results, zero, sizes, {t: TEST_COLUMNS[t] for t in tasks},
                                         {t: "exact_match" for t in tasks}, out, doc, "quality_smollm2"),
                *report.failures(failed)]
            text = "\n".join(lines).rstrip() + "\n"
            (out / "quality_smollm2.md").write_text(text)
            print(text)
            benchmarks_doc.publish("bench_quality_smollm2.py", {"quality-smollm2": text}, doc, DOC_SECTIONS, argv)
        if args.smoke:
            print(f"smoke: wrote {sorted(p.name for p in out.iterdir())}")


if __name__ == "__main__":
    main()
