"""Quality at matched trainable-parameter budgets: every method on every synthetic task, several
seeds, on the small backbone pretrained here (`scripts/pretrain_tiny.py`; run first if its
folder is missing).

Each method's size knob (LoRA/ALoRA rank, Tied-LoRA rank, PARA/IAPT bottleneck) is set so its
trainable parameters come as close as possible to a common budget (default: LoRA r=4 on every
linear), counted on a meta-device copy of the backbone. Training goes through peftrun's own loop
(`peftrun.train.loop.train`; two runs at a time in worker processes, one torch thread each,
`--workers 1` for one at a time in this process), with the group's protocol scaled to this size:
AdamW, linear decay after 6% warm-up, batch 16, a number of steps per task (`TASK_STEPS`), dev
loss half-way and at the end and the better adapter tested, greedy decoding. The untrained
backbone (no adapter, the same prompts) is a row.

The tables go into docs/benchmarks.md too (sections `quality-backbone` and `quality`, with
--sweep-lr `quality-lr`, and the machine's at the top; `--no-doc` leaves the page alone, `--doc
PATH` writes another copy; `--smoke` writes a throwaway copy unless `--doc` names one).

    python scripts/bench_quality.py                 # writes bench/quality.md and bench/quality.png
    python scripts/bench_quality.py --seeds 0,1,2 --steps 300      # 300 steps on every task
    python scripts/bench_quality.py --tasks synth_sentiment --methods lora,para --lr para=3e-2
    python scripts/bench_quality.py --smoke         # seconds: a throwaway backbone, 2 steps, tiny splits
    python scripts/bench_quality.py --sweep-lr 1e-3,3e-3,1e-2 --steps 150 --tasks synth_qa,synth_math
                                                    # how the learning rates in METHODS were picked
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

# Sleeping OpenMP waiters: spinning ones slow every process down many times on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import benchmarks_doc  # noqa: E402  (beside this script)
from bench_train import compose  # noqa: E402  (the shared Hydra compose helper)

# The sections of docs/benchmarks.md this script writes (tests/test_benchmarks_doc.py checks the page has them):
# the backbone and the results, or (--sweep-lr) the learning rates.
DOC_SECTIONS = ("quality-backbone", "quality", "quality-lr")

TASKS = ("synth_qa", "synth_math", "synth_sentiment")
# Training steps per task, the same for every method (batch 16; 2,000 training examples = 125
# steps an epoch). The word problems get the most: the answer is the longest, and every step of
# its work must copy the right operands out of the story. IAPT decides it: at 500 steps its dev
# loss was still falling fast and it answered 6.5 / 46.5 / 20.5 / 43.0% (seeds 0-3; the
# backbone 0.5%), at 800 steps 31.5 / 47.0 / 53.0 / 58.0%; the weight-based methods are at
# 96-99% by 500. synth_qa at 200 steps instead of 250 pays for part of it (IAPT 23.5 / 23.5 EM
# against 23.0 / 32.0, PARA 99.0 / 99.5).
TASK_STEPS = {"synth_qa": 200, "synth_math": 800, "synth_sentiment": 200}


# label -> (method option, size knob, candidate knob values, fixed overrides (`{k}`: the knob), lr)
# Learning rates: per method, the lowest geometric-mean dev loss on synth_qa and synth_math of
# 1e-3, 3e-3 and 1e-2 after 150 steps, seed 0 (`--sweep-lr 1e-3,3e-3,1e-2 --steps 150 --tasks
# synth_qa,synth_math`; the README has the table); short runs want rates well above the papers' 1e-4.
METHODS: dict[str, tuple[str, str, range, tuple[str, ...], float]] = {
    "lora": ("lora", "method.r", range(1, 65), ("method.alpha={2k}",), 1e-2),
    "tied_lora tl6": ("tied_lora", "method.r", range(1, 385), ("method.preset=tl6",), 1e-2),
    "tied_lora tl5": ("tied_lora", "method.r", range(1, 385), ("method.preset=tl5",), 3e-3),
    "tied_lora vera": ("tied_lora", "method.r", range(1, 385), ("method.preset=vera",), 1e-2),
    # ALoRA's budget is its open ranks (the paper's count); it allocates 2 x r_init slots.
    "alora": ("alora", "method.r_init", range(1, 65), ("method.max_rank={2k}", "method.alpha={2k}"), 1e-2),
    "para": ("para", "method.bottleneck", range(1, 513), (), 1e-2),
    "iapt": ("iapt", "method.bottleneck", range(1, 513), (), 1e-2),
}
DEFAULT_METHODS = ("lora", "tied_lora tl6", "tied_lora tl5", "alora", "para", "iapt")
MARKERS = {"lora": "o", "tied_lora tl6": "^", "tied_lora tl5": "v", "tied_lora vera": "<", "alora": "s",
           "para": "D", "iapt": "P"}


def fill(overrides, k: int) -> list[str]:
    return [o.replace("{2k}", str(2 * k)).replace("{k}", str(k)) for o in overrides]


# ------------------------------------------------------------------------------ budget matching
def with_knob(cfg, label: str, k: int):
    """A copy of a composed config with `label`'s knob (and the overrides tied to it) at k."""
    from omegaconf import OmegaConf

    _, knob, _, fixed, _ = METHODS[label]
    cfg = cfg.copy()
    for item in [f"{knob}={k}", *fill(fixed, k)]:
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
        base = compose(model_overrides + [f"method={option}"])
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


# ------------------------------------------------------------------------------------- runs
def task_steps(args, task: str) -> int:
    return args.steps or TASK_STEPS.get(task, 250)


def task_eval_every(args, task: str) -> int:
    """Dev loss half-way and at the last step (`--eval-every N`: every N steps). With linear decay
    to zero the best adapter is nearly always a late one, and each check of the 200 dev examples
    costs about ten training steps."""
    if args.eval_every is not None:
        return args.eval_every
    steps = task_steps(args, task)
    return steps // 2 if steps % 2 == 0 else steps


def eval_text(args) -> str:
    if args.eval_every is None:
        return "half-way and at the end"
    return f"every {args.eval_every} steps" if args.eval_every else "at the end only"


def steps_text(args) -> str:
    return ", ".join(f"{task} {task_steps(args, task)}" for task in args.tasks)


def trainer_overrides(args, steps: int, eval_every: int, seed: int, lr: float) -> list[str]:
    return [f"trainer.max_steps={steps}", f"trainer.lr={lr}", f"trainer.seed={seed}",
            "trainer.micro_batch_size=16", "trainer.grad_accum=1", "trainer.eval_batch_size=64",
            "trainer.scheduler=linear", "trainer.warmup_ratio=0.06", f"trainer.eval_every={eval_every}",
            "trainer.generate_every=0", "trainer.early_stopping_patience=0", "trainer.load_best_at_end=true",
            "trainer.save_every=0", "trainer.save_total_limit=1", "trainer.progress=false",
            f"trainer.log_every={steps}", "trainer.num_beams=1"]


def task_overrides(args, task: str) -> list[str]:
    out = [f"task={task}"]
    if args.smoke:
        out += ["task.num_train=32", "task.num_dev=8", "task.num_test=8"]
    return out


def alora_schedule(steps: int) -> list[str]:
    """Algorithm 1 scaled to a short run: warm-up K1 = 40% of the steps, then 3 rounds every 10%,
    scored on 16 dev examples (the paper: 32; each round costs two forwards of the dev batch per
    open rank, which dominates a run this short)."""
    warmup = max(1, int(0.4 * steps))
    interval = max(1, int(0.1 * steps))
    rounds = max(1, min(3, (steps - warmup) // interval - 1))
    return [f"method.warmup_steps={warmup}", f"method.interval_steps={interval}", f"method.rounds={rounds}",
            "method.dev_batch_size=16"]


def learning_rate(args, label: str) -> float:
    return args.lr.get(label, METHODS[label][4])


@contextlib.contextmanager
def one_thread():
    """One torch thread for a run, in a worker process or in this one (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_one(args, task: str, label: str, k: int, seed: int, lr: float, run_dir: Path,
            model_overrides: list[str]) -> dict:
    from peftrun.train.loop import train

    option, knob, _, fixed, _ = METHODS[label]
    overrides = model_overrides + task_overrides(args, task) + [f"method={option}", f"{knob}={k}", *fill(fixed, k)]
    steps = task_steps(args, task)
    if option == "alora":
        overrides += alora_schedule(steps)
    cfg = compose(overrides + trainer_overrides(args, steps, task_eval_every(args, task), seed, lr))
    started = time.perf_counter()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_file = run_dir.parent / f"{run_dir.name}.log"  # the run's own output (its summary table...)
    # One thread, whatever --workers: the thread count splits float sums differently, which
    # moves the last bits of a run and, through them, some outcomes (IAPT's on synth_math
    # can go from about 90% to about 3%), so `--workers 1` gives the default's numbers.
    with one_thread(), log_file.open("w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        summary = train(cfg, run_dir)
    summary["wall_seconds"] = time.perf_counter() - started
    summary["lr"] = lr
    return summary


def run_all(args, jobs: list, sizes: dict, runs_root: Path, model_overrides: list[str]):
    """Yield ((task, label, seed, lr), summary) as runs finish. With --workers 2 (the default) two
    one-thread runs share the two cores: tiny models keep two threads poorly busy, so this
    finishes the set about 1.25x sooner than one two-thread run at a time (each run has one
    thread either way, see `run_one`)."""
    def folder(task, label, seed, lr):
        return runs_root / task / label.replace(" ", "_") / f"seed{seed}-lr{lr:g}"

    def call(job):  # run_one's arguments
        task, label, seed, lr = job
        return (args, task, label, sizes[label][0], seed, lr, folder(*job), model_overrides)

    if args.workers <= 1:
        for job in jobs:
            yield job, run_one(*call(job))
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        futures = {pool.submit(run_one, *call(job)): job for job in jobs}
        for future in as_completed(futures):
            yield futures[future], future.result()


def zero_shot(args, task: str, model_overrides: list[str]) -> dict:
    """The backbone with no adapter on the test prompts, generated as in training's evaluation."""
    from peftrun.generate import generate
    from peftrun.models import build_model, load_tokenizer
    from peftrun.tasks import build_task

    cfg = compose(model_overrides + task_overrides(args, task))
    tokenizer = load_tokenizer(cfg.model)
    task_obj = build_task(cfg.task)
    test = task_obj.examples("test")
    started = time.perf_counter()
    predictions = generate(build_model(cfg.model, tokenizer), tokenizer, None, [e.prompt for e in test],
                           batch_size=64, max_new_tokens=cfg.task.max_new_tokens,
                           max_prompt_length=cfg.task.max_length)
    scores = task_obj.score(predictions, test)
    return {**{f"test_{k}": v for k, v in scores.items()}, "primary_metric": f"test_{task_obj.primary_metric}",
            "wall_seconds": time.perf_counter() - started, "examples": predictions[:3]}


# ----------------------------------------------------------------------------------- report
def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}"


def report(args, results: dict, zero: dict, sizes: dict, budget: int, timings: dict, page: bool = False) -> str:
    """The results in Markdown: for quality.md and stdout, or (`page`) for docs/benchmarks.md, inside
    whose headings they go (no headings of their own) and which names the machine once, at the top."""
    lines = [] if page else [f"# Quality at matched budgets (synthetic tasks, `model=tiny_pretrained`)", ""]
    lines += [
        f"Backbone: {timings['backbone']}. Budget: {budget:,} trainable parameters (LoRA r={args.budget_rank} "
        f"on every linear); each method's knob is the value nearest it. Steps of batch 16: {steps_text(args)} "
        f"(AdamW, linear decay, 6% warm-up; dev loss {eval_text(args)}, best adapter tested; "
        f"greedy decoding); seeds {', '.join(map(str, args.seeds))}; mean ± standard deviation over seeds. "
        f"Learning rates: " + ", ".join(f"{m} {learning_rate(args, m):g}" for m in args.methods) + ".",
        "ALoRA: " + "; ".join(f"{t} {' '.join(alora_schedule(task_steps(args, t)))}" for t in args.tasks)
        + "; its count is the open ranks (it allocates twice as many slots).",
        "",
    ]
    for task in args.tasks:
        metric = zero[task]["primary_metric"]
        extra = "test_f1" if "test_f1" in zero[task] else None
        head = f"| method | knob | trainable | {metric.removeprefix('test_')} |"
        rule = "|---|---|---:|---:|"
        if extra:
            head += " f1 |"
            rule += "---:|"
        head += " per seed | train s | wall s |"
        rule += "---|---:|---:|"
        lines += [f"**{task}**" if page else f"## {task}", "", head, rule]
        z = zero[task]
        row = f"| backbone, no adapter (zero-shot) | - | 0 | {z[metric]:.1f} |"
        if extra:
            row += f" {z[extra]:.1f} |"
        lines.append(row + f" - | - | {z['wall_seconds']:.0f} |")
        for label in args.methods:
            runs = results[task][label]
            knob, n = sizes[label]
            vals = [r[metric] for r in runs]
            row = f"| {label} | {METHODS[label][1].split('.')[-1]}={knob} | {n:,} | {spread(vals)} |"
            if extra:
                row += f" {spread([r[extra] for r in runs])} |"
            row += (f" {' / '.join(f'{v:.1f}' for v in vals)} | {statistics.fmean(r['train_seconds'] for r in runs):.0f}"
                    f" | {statistics.fmean(r['wall_seconds'] for r in runs):.0f} |")
            lines.append(row)
        lines.append("")
    machine = "" if page else f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}; "
    lines += [
        f"Pretraining: {timings['pretrain']}. Whole benchmark: {timings['total'] / 60:.1f} min "
        f"({machine}load average at the end {timings['load']}).",
        "",
    ]
    return "\n".join(lines)


def write_report(args, results: dict, zero: dict, sizes: dict, budget: int, timings: dict, out: Path) -> str:
    text = report(args, results, zero, sizes, budget, timings)
    (out / "quality.md").write_text(text)
    plot(args, results, zero, sizes, out)
    return text


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


def plot(args, results: dict, zero: dict, sizes: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, axes = plt.subplots(1, len(args.tasks), figsize=(4.2 * len(args.tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], args.tasks):
        metric = zero[task]["primary_metric"]
        for label in args.methods:
            vals = [r[metric] for r in results[task][label]]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            ax.errorbar([sizes[label][1]], [statistics.fmean(vals)], yerr=[sd], fmt=MARKERS.get(label, "o"),
                        capsize=3, label=label)
        ax.axhline(zero[task][metric], color="k", lw=0.8, ls="--", label="backbone (zero-shot)")
        counts = [sizes[label][1] for label in args.methods]
        if max(counts) > 3 * min(counts):
            ax.set_xscale("log")
        else:  # matched budgets sit within a few percent: a log axis would label only its minor ticks
            ax.set_xlim(0.97 * min(counts), 1.03 * max(counts))
            ax.xaxis.set_major_locator(MaxNLocator(3))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(metric.removeprefix("test_"))
        ax.set_title(task)
    axes[0][-1].legend(fontsize=7, loc="center right")  # on these tasks: adapters near the top, backbone near 0
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=120)


# ------------------------------------------------------------------------------ learning rates
def sweep_learning_rates(args, sizes: dict, runs_root: Path, model_overrides: list[str], out: Path,
                         started: float, doc: Path | None = None, argv=None) -> dict:
    """Each method at each candidate rate on every task (first seed); the pick is the rate with
    the lowest geometric mean of dev losses over the tasks (tasks differ in loss scale). The table
    goes into `doc`'s section quality-lr too (None: not)."""
    seed = args.seeds[0]
    jobs = [(task, label, seed, lr) for task in args.tasks for label in args.methods for lr in args.sweep_lr]
    dev = {}
    for (task, label, _, lr), s in run_all(args, jobs, sizes, runs_root, model_overrides):
        dev[task, label, lr] = s["dev_loss"]
        print(f"{task}: {label:16s} lr {lr:g}: dev loss {s['dev_loss']:.3f} "
              f"(elapsed {(time.perf_counter() - started) / 60:.1f} min)", flush=True)
    picks = {}
    lines = [f"# Learning rates for bench_quality.py: best dev loss after {steps_text(args)} steps, seed {seed}", "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in args.sweep_lr) + " | pick |",
             "|---|" + "---|" * (len(args.sweep_lr) + 1)]
    for label in args.methods:
        score = {lr: statistics.fmean(math.log(dev[t, label, lr]) for t in args.tasks) for lr in args.sweep_lr}
        picks[label] = min(score, key=score.get)
        cells = [" / ".join(f"{dev[t, label, lr]:.3f}" for t in args.tasks) for lr in args.sweep_lr]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {picks[label]:g} |")
    lines += ["", f"Dev losses per cell: {' / '.join(args.tasks)}.", ""]
    text = "\n".join(lines)
    (out / "quality_lr.md").write_text(text)
    print(text)
    body = "\n".join([lines[0].removeprefix("# ") + ".", *lines[1:]])  # no heading of its own on the page
    benchmarks_doc.publish("bench_quality.py", {"quality-lr": body}, doc, DOC_SECTIONS, argv)
    return picks


# ------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=str(ROOT / "models" / "tiny_pretrained"))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps for every task (default: per task, {TASK_STEPS})")
    p.add_argument("--eval-every", type=int, default=None,
                   help="dev loss every N steps (0: at the end only; default: half-way and at the last step)")
    p.add_argument("--budget-rank", type=int, default=4, help="the budget is LoRA at this rank on every linear")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="override a method's lr")
    p.add_argument("--out", default=str(ROOT / "bench"))
    p.add_argument("--runs", default=None, help="keep run folders here (default: a temporary folder); "
                   "a rerun with the same folder resumes its runs (finished ones are not trained again)")
    p.add_argument("--workers", type=int, default=2, help="runs at a time, one torch thread each (1: in this process)")
    p.add_argument("--smoke", action="store_true", help="a throwaway backbone, 2 steps, tiny splits, one seed")
    p.add_argument("--doc", default=None, help="the page to write the tables into (default: "
                   f"{benchmarks_doc.DOC}; with --smoke, a throwaway copy of it)")
    p.add_argument("--no-doc", action="store_true", help="leave the page alone (quick experiments)")
    p.add_argument("--sweep-lr", default=None, metavar="LR,LR,...",
                   help="instead of the benchmark: each method at each of these rates (first seed), "
                        "the best mean dev loss over the tasks picked; writes quality_lr.md")
    args = p.parse_args(argv)
    args.tasks = args.tasks.split(",")
    args.methods = args.methods.split(",")
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    try:  # argparse's own one-line error (exit 2) for a malformed list
        args.seeds = [int(s) for s in args.seeds.split(",")]
        args.lr = {m: float(v) for m, v in (item.rsplit("=", 1) for item in args.lr)}
        args.sweep_lr = [float(v) for v in args.sweep_lr.split(",")] if args.sweep_lr else None
    except ValueError as e:
        p.error(f"--seeds 0,1 / --lr METHOD=LR / --sweep-lr LR,LR: {e}")
    if args.eval_every is not None and args.eval_every < 0:
        p.error(f"--eval-every {args.eval_every}: give a number of steps, 0 or more")
    for m in args.lr:
        if m not in METHODS:
            p.error(f"--lr {m}=...: unknown method; choose from {', '.join(METHODS)}")
    if args.smoke:
        args.steps, args.eval_every, args.seeds = 2, 1, [0]
    return args


def ensure_backbone(args, scratch: Path) -> str:
    """The pretrained folder, made first when missing (the smoke mode makes a throwaway one)."""
    import pretrain_tiny

    folder = Path(args.model_dir)
    if args.smoke:
        folder = scratch / "tiny_pretrained"
        pretrain_tiny.main(["--out", str(folder), "--steps", "2", "--hidden", "32", "--layers", "1",
                            "--eval-windows", "4", "--log-every", "1"])
    elif not (folder / "config.json").exists():
        print(f"no pretrained backbone in {folder}: pretraining it first", flush=True)
        pretrain_tiny.main(["--out", str(folder)])
    info = json.loads((folder / "pretrain.json").read_text())
    return folder, info


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


def main(argv=None) -> None:
    args = parse_args(argv)
    argv = None if argv is None else [__file__, *argv]  # the command line the page records
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no bar per checkpoint load
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peftrun-quality-") as scratch:
        doc = doc_path(args, Path(scratch))
        sections = ["quality-lr"] if args.sweep_lr else ["quality-backbone", "quality"]
        benchmarks_doc.preflight("bench_quality.py", sections, doc)  # before the long part
        folder, info = ensure_backbone(args, Path(scratch))
        runs_root = Path(args.runs) if args.runs else Path(scratch) / "runs"
        model_overrides = ["model=tiny_pretrained", f"model.name_or_path={folder}"]
        budget = count("lora", args.budget_rank, model_overrides)
        sizes = {label: match_budget(label, budget, model_overrides) for label in args.methods}
        print(f"budget {budget:,} trainable parameters (LoRA r={args.budget_rank}); matched sizes:", flush=True)
        for label, (k, n) in sizes.items():
            print(f"  {label:16s} {METHODS[label][1]}={k:<4d} {n:>9,} ({n / budget:.2f}x)", flush=True)

        zero = {}
        for task in args.tasks:
            zero[task] = zero_shot(args, task, model_overrides)
            metric = zero[task]["primary_metric"]
            print(f"{task}: backbone zero-shot {metric} {zero[task][metric]:.1f} "
                  f"(e.g. {zero[task]['examples'][0]!r})", flush=True)
        out = Path(args.out) if not args.smoke else Path(scratch) / "out"
        out.mkdir(parents=True, exist_ok=True)
        if args.sweep_lr:
            sweep_learning_rates(args, sizes, runs_root, model_overrides, out, started, doc, argv)
            if args.smoke:
                print(f"smoke: wrote {sorted(p.name for p in out.iterdir())}")
            return
        jobs = [(task, label, seed, learning_rate(args, label))
                for task in args.tasks for label in args.methods for seed in args.seeds]
        results = {task: {label: {} for label in args.methods} for task in args.tasks}
        for (task, label, seed, _), s in run_all(args, jobs, sizes, runs_root, model_overrides):
            results[task][label][seed] = s
            metric = zero[task]["primary_metric"]
            print(f"{task}: {label:16s} seed {seed}: {metric} {s[metric]:.1f}  dev loss {s['dev_loss']:.3f}  "
                  f"train {s['train_seconds']:.0f} s, wall {s['wall_seconds']:.0f} s  "
                  f"(elapsed {(time.perf_counter() - started) / 60:.1f} min)", flush=True)
        results = {task: {label: [runs[seed] for seed in args.seeds] for label, runs in by_label.items()}
                   for task, by_label in results.items()}
        a = info["args"]
        timings = {
            "backbone": f"Llama hidden {a['hidden']}, {a['layers']} layers, {info['parameters']:,} parameters, "
                        f"{info['tokens']:,} pretraining tokens, held-out LM loss {info['heldout_loss']['all']:.3f}",
            "pretrain": f"{info['train_seconds'] / 60:.1f} min of training ({info['tokens']:,} tokens)",
            "total": time.perf_counter() - started,
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        }
        text = write_report(args, results, zero, sizes, budget, timings, out)
        print(text)
        benchmarks_doc.publish("bench_quality.py", {
            "quality-backbone": backbone_report(info),
            "quality": report(args, results, zero, sizes, budget, timings, page=True),
        }, doc, DOC_SECTIONS, argv)
        if args.smoke:
            print(f"smoke: wrote {sorted(p.name for p in out.iterdir())}")


if __name__ == "__main__":
    main()
