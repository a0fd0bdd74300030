"""The training loop, top to bottom: set-up, steps (micro-batches, one optimizer step),
evaluation, saving, the closing report. A method is known only through its adapter contract."""

from __future__ import annotations

import json
import math
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from ..data import collate_train
from ..distributed import is_sharded, make_accelerator, padded_shard
from ..token_cache import tokenize_cached
from ..errors import ConfigError
from ..generate import generate
from ..methods import ADAPTER_WEIGHTS, build_method, save_adapter
from ..models import build_model, load_tokenizer
from ..tasks import build_task
from .callbacks import Checkpointer, EarlyStopping, MetricsLog, Progress, TrainState, fire
from .checkpoint import check_resumable, load_checkpoint, remove_partial
from .loss import keeps_logits, label_tokens, labelled_loss_sum
from .preemption import catch_preemption


@dataclass
class Run:
    """The live objects of a run, handed to callbacks through `TrainState.run`."""

    cfg: DictConfig
    run_dir: Path
    accelerator: Accelerator
    model: Any
    adapter: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tokenizer: Any
    callbacks: list
    dev_features: list  # tokenized dev examples (methods that score on dev data use them)
    log: Any  # log(record): one JSON object into metrics.jsonl (main process)


def lr_lambda(total: int, warmup: int, kind: str):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(total - warmup, 1)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


class DataOrder:
    """Which training examples each optimizer step uses: a seeded permutation per epoch, cut
    into global batches. A function of the step alone, so a resumed run and a run on another
    number of processes see the same examples at the same step."""

    def __init__(self, num_examples: int, global_batch: int, seed: int):
        self.n, self.global_batch, self.seed = num_examples, global_batch, seed
        self.steps_per_epoch = num_examples // global_batch
        self._epoch, self._perm = -1, None

    def step_indices(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator)
        return self._perm[pos * self.global_batch : (pos + 1) * self.global_batch].tolist()


def train(cfg: DictConfig, run_dir: Path, extra_callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    t = cfg.trainer
    # ------------------------------------------------------------------ set-up: processes
    acc = make_accelerator(t)  # trainer.strategy: ddp, or fsdp (sharded backbone and adapter)
    console = Console(quiet=not acc.is_main_process, highlight=False)
    world, rank = acc.num_processes, acc.process_index
    if t.num_processes is not None and t.num_processes != world:
        raise ConfigError(
            "trainer.num_processes",
            f"the config asks for {t.num_processes} processes but {world} were started; "
            f"launch {t.num_processes} or set trainer.num_processes={world}",
        )
    resume_from = check_resumable(run_dir, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if acc.is_main_process:
        remove_partial(run_dir)

    # ------------------------------------------------------------------ set-up: data
    task = build_task(cfg.task)
    tokenizer = load_tokenizer(cfg.model)
    examples = {split: task.examples(split) for split in ("train", "dev", "test")}
    # Cached on disk by tokenizer, rendered text and options (peftrun/token_cache.py).
    train_feats, report, _ = tokenize_cached(
        examples["train"], tokenizer, cfg.task.max_length, cfg.task.loss_on_prompt
    )
    dev_feats, dev_report, _ = tokenize_cached(
        examples["dev"], tokenizer, cfg.task.max_length, cfg.task.loss_on_prompt
    )
    console.print(f"[bold]data[/] train: {report}; dev: {dev_report}; test: {len(examples['test'])} prompts")
    global_batch = t.micro_batch_size * t.grad_accum * world
    order = DataOrder(len(train_feats), global_batch, t.seed)
    if order.steps_per_epoch == 0:
        raise ConfigError(
            "trainer.micro_batch_size",
            f"a global batch of {global_batch} (micro_batch_size x grad_accum x processes) "
            f"exceeds the {len(train_feats)} training examples; lower it",
        )
    total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.epochs * order.steps_per_epoch))
    warmup = t.warmup_steps if t.warmup_steps > 0 else int(t.warmup_ratio * total_steps)

    method = build_method(cfg.method)
    if hasattr(method, "check_run"):  # checks that need the run's length (ALoRA's schedule)
        method.check_run(total_steps, order.steps_per_epoch)

    # ------------------------------------------------------------------ set-up: model, adapter, optimizer
    model = build_model(cfg.model, tokenizer, device=acc.device)
    set_seed(t.seed)  # after the backbone, which seeds its own init: the adapter's init is ours
    adapter = method.attach(model)
    params = [p for _, p in adapter.trainable_parameters()]
    # A method may ask for per-group learning rates (optional `param_groups`, see methods/base.py).
    param_groups = adapter.param_groups(t.lr) if hasattr(adapter, "param_groups") else params
    optimizer = torch.optim.AdamW(
        param_groups, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, t.scheduler))
    model, optimizer = acc.prepare(model, optimizer)
    base_model = acc.unwrap_model(model)
    kept_logits = keeps_logits(base_model)  # the LM head only where a label is predicted
    sharded = is_sharded(acc)
    params = [p for _, p in adapter.trainable_parameters()]  # FSDP replaced them with sharded ones

    state = TrainState(total_steps=total_steps, steps_per_epoch=order.steps_per_epoch)
    metrics_log = MetricsLog(run_dir / "metrics.jsonl", t.log_every, enabled=acc.is_main_process)
    callbacks = [
        Progress(t.progress and acc.is_main_process),
        EarlyStopping(t.early_stopping_patience),
        metrics_log,
        *adapter.callbacks(),
        Checkpointer(t.save_every, t.save_total_limit),  # after all that changes a step's state
        *extra_callbacks,
    ]
    state.run = Run(cfg, run_dir, acc, model, adapter, optimizer, scheduler, tokenizer, callbacks,
                    dev_feats, metrics_log.write)
    if resume_from is not None:
        load_checkpoint(resume_from, state, state.run, rank)
        console.print(f"[bold]resume[/] from {resume_from} (step {state.step} of {total_steps})")
    counts = adapter.parameter_counts()
    console.print(f"[bold]{adapter.method}[/] trainable parameters: {counts['total']:,} "
                  f"({', '.join(f'{k} {v:,}' for k, v in counts.items() if k != 'total')})")

    # Dev loss in batches of similar lengths: less padding to compute, the same token sum.
    eval_feats = sorted(dev_feats, key=lambda f: len(f["input_ids"]))

    def dev_loss() -> float:
        model.eval()
        loss, tokens = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
        with torch.no_grad():
            shard, real = padded_shard(eval_feats, rank, world)
            for i in range(0, len(shard), t.eval_batch_size):
                batch = collate_train(shard[i : i + t.eval_batch_size], tokenizer.pad_token_id)
                batch["labels"][max(real - i, 0) :] = -100  # padding rows: same forwards, no loss
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                adapter.set_prompt_mask(batch["prompt_mask"])
                with acc.autocast():
                    loss += labelled_loss_sum(model, batch, kept_logits)
                tokens += label_tokens(batch)
        adapter.set_prompt_mask(None)
        model.train()
        loss, tokens = acc.reduce(loss, "sum"), acc.reduce(tokens, "sum")
        return float(loss / tokens.clamp(min=1))

    def generation_metrics(split: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
        exs = examples[split]
        prompts, real = padded_shard([e.prompt for e in exs], rank, world)
        mine = generate(
            base_model, tokenizer, adapter, prompts,
            batch_size=t.eval_batch_size, max_new_tokens=cfg.task.max_new_tokens,
            num_beams=t.num_beams, max_prompt_length=cfg.task.max_length,
            synced=sharded and world > 1,
        )[:real]
        # Process r generated examples r, r + world, ...: gather and put them back in order.
        numbered = [(rank + world * i, p) for i, p in enumerate(mine)]
        predictions = [p for _, p in sorted(gather_object(numbered) if world > 1 else numbered)]
        metrics = task.score(predictions, exs)
        rows = [{"id": e.id, "prompt": e.prompt, "target": e.target, "references": e.references, "prediction": p} for e, p in zip(exs, predictions)]
        return metrics, rows

    # ------------------------------------------------------------------ steps
    model.train()
    fire(callbacks, "on_train_start", state)
    started = time.perf_counter() - state.train_seconds
    with catch_preemption() as (preempted, hand_on):
        try:
            while state.step < total_steps and not state.should_stop and not state.preempted:
                indices = order.step_indices(state.step)
                per_process = t.micro_batch_size * t.grad_accum
                local = indices[rank * per_process : (rank + 1) * per_process]
                micro_batches = [
                    collate_train([train_feats[i] for i in local[j : j + t.micro_batch_size]], tokenizer.pad_token_id)
                    for j in range(0, per_process, t.micro_batch_size)
                ]
                # Token-normalized accumulation: every labelled token of the global batch weighs
                # the same, however tokens are spread over micro-batches and processes.
                n_tokens = acc.reduce(torch.tensor(float(sum(map(label_tokens, micro_batches))), device=acc.device), "sum")
                step_loss = torch.zeros((), device=acc.device)
                step_tokens = 0
                for j, batch in enumerate(micro_batches):
                    batch = {k: v.to(acc.device) for k, v in batch.items()}
                    sync = j == len(micro_batches) - 1
                    with nullcontext() if sync else acc.no_sync(model):
                        adapter.set_prompt_mask(batch["prompt_mask"])
                        with acc.autocast():
                            loss_sum = labelled_loss_sum(model, batch, kept_logits)
                        # DDP averages gradients over processes; scale back to a global token mean.
                        acc.backward(loss_sum * world / n_tokens.clamp(min=1))
                    step_loss += loss_sum.detach()
                    step_tokens += int(batch["attention_mask"].sum())
                if t.max_grad_norm > 0:
                    acc.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                adapter.set_prompt_mask(None)

                state.step += 1
                # One reduction for the step's loss, its tokens, and whether a signal reached any
                # process (all then stop together, after this step's checkpoint).
                totals = acc.reduce(torch.tensor([float(step_loss), step_tokens, preempted.signum],
                                                 dtype=torch.float64, device=acc.device), "sum")
                state.train_loss = float(totals[0]) / float(n_tokens.clamp(min=1))
                state.tokens_seen += int(totals[1])
                state.preempted = bool(totals[2] > 0)
                state.train_seconds = time.perf_counter() - started
                if t.eval_every > 0 and state.step % t.eval_every == 0:
                    state.dev_loss = dev_loss()
                    if t.generate_every > 0 and state.step % t.generate_every == 0:
                        state.metrics, _ = generation_metrics("dev")
                    fire(callbacks, "on_evaluate", state)
                fire(callbacks, "on_step_end", state)
        finally:
            fire([c for c in callbacks if isinstance(c, Progress)], "on_train_end", state)

        if state.preempted:
            console.print(f"[bold]stopped[/] by a signal at step {state.step}; checkpoint saved in "
                          f"{run_dir / 'checkpoints'}; run the same command again to resume")
            hand_on()

    # ------------------------------------------------------------------ final evaluation and save
    best = run_dir / "best"
    if t.load_best_at_end and t.eval_every > 0 and (best / ADAPTER_WEIGHTS).exists():
        # best/ holds exactly the weights its dev loss was measured on (saved at that evaluation,
        # before anything else of the step): no need to measure it again.
        adapter.load_state_dict(load_file(str(best / ADAPTER_WEIGHTS)))
        state.dev_loss = state.best_dev_loss
        console.print(f"[bold]best[/] adapter of step {state.best_step} loaded (dev loss {state.dev_loss:.4f})")
    else:
        state.dev_loss = dev_loss()
    state.metrics, rows = generation_metrics("test")
    adapter_dir = run_dir / "adapter"
    tensors = adapter.state_dict()  # every process: sharded tensors are gathered
    if acc.is_main_process:
        save_adapter(adapter, adapter_dir, {"base_model": cfg.model.name, "step": state.step}, tensors=tensors)
        with (run_dir / "predictions.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    acc.wait_for_everyone()
    fire([c for c in callbacks if not isinstance(c, Progress)], "on_train_end", state)

    summary = {
        "method": adapter.method,
        "trainable_params": counts["total"],
        "steps": state.step,
        "train_loss": state.train_loss,
        "dev_loss": state.dev_loss,
        **{f"test_{k}": v for k, v in state.metrics.items()},
        "primary_metric": f"test_{task.primary_metric}",
        "tokens_per_second": state.tokens_seen / max(state.train_seconds, 1e-9),
        "train_seconds": state.train_seconds,
        "peak_memory_mb": peak_memory_mb(acc.device),
        "adapter_dir": str(adapter_dir),
        "train_examples": report.kept,
        "truncated": report.truncated,
        "dropped": report.dropped,
    }
    if acc.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        metrics_log.write({"event": "test", "step": state.step, **state.metrics})
        console.print(summary_table(summary))
    return summary


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (Linux: KiB)


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="peftrun summary", show_header=False)
    memory = "peak GPU memory" if torch.cuda.is_available() else "peak RSS"
    rows = [
        ("method", summary["method"]),
        ("trainable parameters", f"{summary['trainable_params']:,}"),
        ("steps", str(summary["steps"])),
        ("train loss", f"{summary['train_loss']:.4f}"),
        ("dev loss", f"{summary['dev_loss']:.4f}"),
        *[(k.removeprefix("test_").replace("_", " ") + " (test)", f"{v:.2f}")
          for k, v in summary.items() if k.startswith("test_") and isinstance(v, float)],
        ("tokens/s (train)", f"{summary['tokens_per_second']:,.0f}"),
        (memory, f"{summary['peak_memory_mb']:,.0f} MiB"),
        ("adapter", summary["adapter_dir"]),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table
