"""Training cost per method against references measured in the same run: the frozen backbone's
forward + backward (the floor) and Hugging Face PEFT's LoRA at the same rank; on a small random
Llama (`--hidden`, `--layers`, `--batch` x `--seq` tokens, labels on the second half of each row,
torch threads default) and on SmolLM2-135M's shape (30 layers, hidden 576, 9/3 heads, vocab
49,152: its real weights from models/smollm2_135m when that folder is there, `make smollm2`,
else the same shape randomly initialised; the table says which), one torch thread, batch 4 x 128
tokens with labels on the last 32, and at 512 tokens for the backbone, LoRA and IAPT. The LM
head runs where a label is (peftrun's training loss); the optimizer is the run's AdamW.

Each configuration runs in its own process (peak memory is a per-process high-water mark):
warm-up steps, then timed optimizer steps (forward, backward, AdamW) on one batch, alternating
with a frozen backbone's in the same process; its ratio to the backbone is the median of the
per-pair ratios, and its ratio to PEFT's LoRA that over PEFT's (a ratio of two ratios, each
steady within its process, where raw seconds across processes swing by 15%). ALoRA is also
timed as a whole run with its allocation rounds, against LoRA's run.

Its tables go into docs/benchmarks.md too (sections `train` and `train-alora-runs`, and the
machine's at the top; `--no-doc` leaves the page alone, `--doc PATH` writes another copy).

    python scripts/bench_train.py                     # writes bench/train.md and bench/train.png
    python scripts/bench_train.py --steps 20 --hidden 512 --layers 8
    python scripts/bench_train.py --no-whole-runs      # the step tables only (about 20 min instead of 50)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
DOC_SECTIONS = ("train", "train-alora-runs")

# name -> method overrides (None: no adapter; "peft": Hugging Face PEFT's LoRA)
CONFIGS = {
    "backbone (frozen, fwd+bwd)": None,
    "peft lora r=8": "peft",
    "lora r=8": ("method=lora", "method.r=8"),
    "tied_lora tl6 r=8": ("method=tied_lora", "method.preset=tl6", "method.r=8"),
    "alora r_init=8 (step)": ("method=alora", "method.r_init=8", "method.max_rank=16"),
    "para bottleneck 12": ("method=para", "method.bottleneck=12"),
    "iapt bottleneck 64": ("method=iapt", "method.bottleneck=64"),
}


# SmolLM2-shape rows: name -> (method overrides as in CONFIGS, tokens per row)
SMOLLM2_CONFIGS = {
    **{name: (spec, 128) for name, spec in CONFIGS.items()},
    "backbone (frozen, fwd+bwd), 512 tokens": (None, 512),
    "lora r=8, 512 tokens": (("method=lora", "method.r=8"), 512),
    "iapt bottleneck 64, 512 tokens": (("method=iapt", "method.bottleneck=64"), 512),
}
SMOLLM2 = {"batch": 4, "labelled": 32, "threads": 1}
SMOLLM2_FOLDER = ROOT / "models" / "smollm2_135m"


def smollm2_model():
    """(model, tokenizer, what it is): SmolLM2-135M from its converted folder when present, else a
    Llama of the same shape, randomly initialised (seed 0), with the offline tokenizer (its ids
    fit the 49,152-row embedding; the cost does not depend on which ids)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from peftrun.models import build_model, load_tokenizer, offline_tokenizer

    if (SMOLLM2_FOLDER / "config.json").exists():
        cfg = compose(["model=smollm2_135m", f"model.name_or_path={SMOLLM2_FOLDER}"])
        tokenizer = load_tokenizer(cfg.model)
        return build_model(cfg.model, tokenizer), tokenizer, smollm2_description()
    config = LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=2048,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = offline_tokenizer()
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, smollm2_description()


def smollm2_description() -> str:
    """What `smollm2_model` builds on this machine."""
    if (SMOLLM2_FOLDER / "config.json").exists():
        return "SmolLM2-135M (its converted weights)"
    return "SmolLM2-135M's shape, randomly initialised (no models/smollm2_135m)"


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


def model_overrides(args) -> list[str]:
    return [f"model.build.hidden_size={args.hidden}", f"model.build.num_layers={args.layers}",
            f"model.build.num_heads={args.hidden // 64}", f"model.build.num_kv_heads={max(1, args.hidden // 128)}",
            f"model.build.intermediate_size={args.hidden * 8 // 3 // 8 * 8}",
            f"model.build.max_position_embeddings={max(256, args.seq)}"]


def small_model(args):
    """(model, tokenizer, what it is): the small random Llama of `--hidden` and `--layers`."""
    from peftrun.models import build_model, load_tokenizer

    cfg = compose(model_overrides(args))
    tokenizer = load_tokenizer(cfg.model)
    return build_model(cfg.model, tokenizer), tokenizer, f"Llama hidden {args.hidden}, {args.layers} layers"


def measure(name: str, args, smollm2: bool) -> dict:
    """One configuration, in this process: its steps (after warm-up) alternate with a frozen
    backbone's in the same process, and its ratio to the backbone is the median of the per-pair
    ratios: drift in the machine's speed moves both sides of a pair. s / step is the median of
    its own steps; peak RSS is taken before the reference model exists."""
    import torch

    if smollm2:
        torch.set_num_threads(SMOLLM2["threads"])
        spec, seq = SMOLLM2_CONFIGS[name]
        shape, build = (SMOLLM2["batch"], seq, SMOLLM2["labelled"]), smollm2_model
    else:
        spec, shape, build = CONFIGS[name], (args.batch, args.seq, args.seq // 2), lambda: small_model(args)
    step, params, built = stepper(build, spec, *shape)
    for _ in range(args.warmup):
        step()
    result = {"name": name, "built": built, "seq": shape[1], "trainable": sum(p.numel() for p in params),
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if spec is None:
        result["seconds"] = statistics.median(step() for _ in range(args.steps))
        return result
    reference = stepper(build, None, *shape)[0]
    for _ in range(args.warmup):
        reference()
    pairs = [(reference(), step()) for _ in range(args.steps)]
    result.update(seconds=statistics.median(s for _, s in pairs),
                  vs_backbone=statistics.median(s / b for b, s in pairs))
    return result


def stepper(build, spec, batch: int, seq: int, labelled: int):
    """(one timed optimizer step as a function, the trainable parameters, what the model is) of
    a configuration on the model `build()` gives: one random batch of `batch` x `seq` ids, the
    loss on the last `labelled` tokens of each row (the prompt: the rest) with the LM head at
    those positions only, peftrun's training loss (PEFT's model gets the same call), and the
    run's AdamW (peftrun/train/optimizer.py)."""
    import torch

    from peftrun.loss import keeps_logits, labelled_loss_sum
    from peftrun.train.optimizer import adamw

    torch.manual_seed(0)
    model, tokenizer, built = build()
    kept = keeps_logits(model)
    ids = torch.randint(4, len(tokenizer), (batch, seq))
    labels = torch.full_like(ids, -100)
    labels[:, -labelled:] = ids[:, -labelled:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    prompt_mask = (labels == -100).long()  # PARA and IAPT read the prompt
    model, adapter, params = attach(model, spec)
    optimizer = adamw(params, lr=1e-4) if params else None
    model.train()
    n = int((labels[:, 1:] != -100).sum())

    def step() -> float:
        start = time.perf_counter()
        if adapter is not None:
            adapter.set_prompt_mask(prompt_mask)
        (labelled_loss_sum(model, batch, kept) / n).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step, params, built


def attach(model, spec):
    """(model, adapter or None, trainable parameters) for a CONFIGS entry on a frozen model. The
    backbone's own row runs backward through every block from the embeddings' output with no
    weight gradient: SmolLM2 ties its LM head to the embeddings, whose 28M-float gradient would
    inflate the floor."""
    from peftrun.methods import build_method

    if spec is None:
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
        return model, None, []
    if spec == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                           lora_dropout=0.0))
        return model, None, [p for p in model.parameters() if p.requires_grad]
    adapter = build_method(compose(list(spec)).method).attach(model)
    return model, adapter, [p for _, p in adapter.trainable_parameters()]


def step_table(rows: list[dict], setting: str, args) -> list[str]:
    """Each row against the backbone stepped beside it in its process (the backbone's own row:
    itself), and against PEFT's LoRA as the ratio of the two rows' backbone ratios (each taken
    in its own process), at the shortest length."""
    peft_x = next(r["vs_backbone"] for r in rows if r["name"] == "peft lora r=8")
    lines = [f"{setting}; each configuration in its own process after {args.warmup} warm-up steps, its "
             f"{args.steps} timed steps alternating with a frozen backbone's in that process: s / step the "
             "median, x backbone the median of the per-pair ratios, x PEFT LoRA the ratio of the two x backbone.",
             "", "| configuration | trainable | s / step | x backbone fwd+bwd | x PEFT LoRA | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        x = r.get("vs_backbone", 1.0)
        vs_peft = f"{x / peft_x:.2f}" if r["seq"] == rows[0]["seq"] else "-"
        lines.append(f"| {r['name']} | {r['trainable']:,} | {r['seconds']:.3f} | {x:.2f} | {vs_peft} | "
                     f"{r['peak_rss_mib']:.0f} |")
    return lines


# Whole runs of the toy task (2,000 training examples), LoRA against ALoRA with its rounds:
# "dense" packs 8 rounds into 120 steps (a round every 10 steps), the worst case for ALoRA;
# "paper" is the ALoRA paper's protocol (batch 16 under 10k examples, 10 epochs, K1 = 1 epoch,
# 8 rounds every 0.25 epoch), 1,250 steps.
WHOLE_RUNS = {
    "dense": (["trainer.max_steps=120"], ["method.warmup_steps=40", "method.interval_steps=10", "method.rounds=8"]),
    "paper": (["trainer.max_steps=-1", "trainer.epochs=10", "trainer.micro_batch_size=16"],
              ["method.warmup_epochs=1", "method.interval_epochs=0.25", "method.rounds=8"]),
}


def whole_run(name: str, args) -> float:
    """Training seconds of a complete toy-task run; `name` is "<method>:<schedule>"."""
    import tempfile

    from peftrun.train.loop import train

    method, schedule = name.split(":")
    trainer, alora = WHOLE_RUNS[schedule]
    overrides = trainer + ["trainer.progress=false", "trainer.eval_every=0", "trainer.save_every=0",
                           "task.num_test=16", "task.num_dev=64"]
    if method == "alora":
        overrides += ["method=alora", *alora]
    with tempfile.TemporaryDirectory() as run_dir:
        return train(compose(overrides), Path(run_dir))["train_seconds"]


def whole_runs_text(runs: dict) -> list[str]:
    lora, alora = (runs[(m, "dense")] for m in ("lora", "alora"))
    text = [f"Whole toy-task runs (tiny model), ALoRA with 8 allocation rounds against LoRA: 120 steps, a round "
            f"every 10 steps: LoRA {lora:.1f} s, ALoRA {alora:.1f} s = {alora / lora:.2f}x;"]
    lora, alora = (runs[(m, "paper")] for m in ("lora", "alora"))
    return text + [f"the paper's schedule (batch 16, 10 epochs = 1,250 steps, rounds every 0.25 epoch after the "
                   f"first): LoRA {lora:.1f} s, ALoRA {alora:.1f} s = {alora / lora:.2f}x."]


def machine() -> str:
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch threads default"


def bar_chart(path: Path, names: list[str], values: list[float], xlabel: str, colors: list[str]) -> None:
    """Horizontal bars, one per configuration, with a dashed line at 1 (the reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.25 * len(names)))
    ax.barh(names, values, color=colors)
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_child(kind: str, name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--name", name, "--hidden", str(args.hidden),
           "--layers", str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if kind == "smollm2":  # one thread for the libraries below torch too
        env["OMP_NUM_THREADS"] = str(SMOLLM2["threads"])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{name}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench"))
    parser.add_argument("--doc", default=str(benchmarks_doc.DOC), help="the page to write the tables into "
                        "(default: %(default)s)")
    parser.add_argument("--no-doc", action="store_true", help="leave the page alone (quick experiments)")
    parser.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2-shape rows")
    parser.add_argument("--no-whole-runs", action="store_true", help="skip ALoRA's whole runs against LoRA's "
                        "(about 30 min) and leave their section of the page as it is")
    parser.add_argument("--child", choices=["step", "run", "smollm2"], help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        from peftrun.host_memory import keep_freed_memory

        keep_freed_memory()  # as peftrun's commands run (peftrun/host_memory.py)
    if args.child in ("step", "smollm2"):
        print(json.dumps(measure(args.name, args, smollm2=args.child == "smollm2")))
        return
    if args.child == "run":
        print(json.dumps({"seconds": whole_run(args.name, args)}))
        return
    doc = None if args.no_doc else Path(args.doc)
    sections = DOC_SECTIONS[:1] if args.no_whole_runs else DOC_SECTIONS
    benchmarks_doc.preflight("bench_train.py", sections, doc)

    rows = [run_child("step", name, args) for name in CONFIGS]
    big = [] if args.no_smollm2 else [run_child("smollm2", name, args) for name in SMOLLM2_CONFIGS]
    runs = {} if args.no_whole_runs else {
        (m, s): run_child("run", f"{m}:{s}", args)["seconds"] for s in WHOLE_RUNS for m in ("lora", "alora")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    small_table = step_table(rows, f"Training step, {rows[0]['built']}, batch {args.batch} x {args.seq} tokens, "
                                   f"labels on the last {args.seq // 2}, fp32, torch threads default", args)
    big_table = step_table(big, f"{big[0]['built']}, batch {SMOLLM2['batch']} x 128 tokens (and 512 where named), "
                                f"labels on the last {SMOLLM2['labelled']}, fp32, {SMOLLM2['threads']} torch "
                                "thread", args) if big else []
    whole = whole_runs_text(runs) if runs else []
    lines = [f"On {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}).", "", *small_table,
             *(["", *big_table] if big else []), *(["", *whole] if whole else [])]
    (out / "train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    peft_x = next(r["vs_backbone"] for r in rows if r["name"] == "peft lora r=8")
    bar_chart(out / "train.png", [r["name"] for r in rows], [r.get("vs_backbone", 1.0) / peft_x for r in rows],
              "training step / PEFT LoRA's (each against the backbone)", ["#999"] * 2 + ["#3b7"] * (len(rows) - 2))
    # The page names the machine once, at the top: here the setting and the tables only.
    benchmarks_doc.publish("bench_train.py", {
        "train": "\n".join([*small_table, *(["", *big_table] if big else [])]),
        "train-alora-runs": "\n".join(whole) if runs else None,  # --no-whole-runs: the page keeps its figures
    }, doc, DOC_SECTIONS)


if __name__ == "__main__":
    main()
