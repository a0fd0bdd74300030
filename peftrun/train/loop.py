"""The training loop, top to bottom: set-up (processes, data, model and adapter, optimizer and
schedule, callbacks, resume), then the steps (micro-batches, token-normalized accumulation, one
optimizer step), evaluation, saving and the closing summary. A method is known only through its
base class (peftrun/methods/base.py). (Over 400 lines on purpose: one class a reader follows top to
bottom, as torchtune's recipes are; the data order, the schedule and the summary table live
beside it in schedule.py and summary.py.)"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate.utils import gather_object, set_seed
from omegaconf import DictConfig
from rich.console import Console
from safetensors.torch import load_file

from ..data import IGNORE_INDEX, collate, real_tokens
from ..distributed import is_sharded, make_accelerator, padded_shard
from ..errors import ConfigError
from ..generate import generate
from ..host_memory import keep_freed_memory
from ..loss import keeps_logits, label_tokens, labelled_loss_sum
from ..methods import ADAPTER_WEIGHTS, save_adapter
from ..models import build_model
from ..token_cache import tokenize_cached
from ..validate import Prepared, check_batch, run_length
from .callbacks import Checkpointer, EarlyStopping, MetricsLog, Progress, fire
from .checkpoint import check_finite_tensors, divergence_error, latest_checkpoint, load_checkpoint, remove_partial
from .curves import write_curves
from .optimizer import adamw
from .preemption import PreemptionFlag, catch_preemption
from .resume_point import adopt_resume_point, check_resumable
from .runlock import acquire_run_lock, release_run_lock
from .schedule import DataOrder, lr_lambda
from .state import Run, TrainState
from .summary import peak_memory_mb, summary_table
from .tracking import Trackers


def train(cfg: DictConfig, run_dir: Path, extra_callbacks: Sequence[Any] = (),
          prepared: Prepared | None = None) -> dict[str, Any]:
    """Train, evaluate and save one run into `run_dir`; returns the summary (also written to
    summary.json). `prepared`: the task, tokenizer and method validation built (built here if
    not given, unchecked)."""
    trainer = Trainer(cfg, Path(run_dir), prepared)
    try:
        trainer.setup(extra_callbacks)
        return trainer.train()
    finally:
        trainer.close()


class Trainer:
    """One run. `setup()` builds everything in the order below; `train()` runs the steps, the
    final evaluation, saving and the summary."""

    def __init__(self, cfg: DictConfig, run_dir: Path, prepared: Prepared | None = None):
        self.cfg, self.t, self.run_dir = cfg, cfg.trainer, run_dir
        self.prepared = prepared
        self.locked = False

    def close(self) -> None:
        """Close the experiment trackers and release the run folder (its lock), once the run
        ended or failed."""
        trackers = getattr(self, "trackers", None)
        if trackers is not None:
            trackers.finish()
        if self.locked:
            release_run_lock(self.run_dir)
            self.locked = False

    # ================================================================== set-up
    def setup(self, extra_callbacks: Sequence[Any] = ()) -> None:
        self.setup_processes()
        self.setup_data()
        self.setup_model()
        self.setup_optimizer()
        self.setup_callbacks(extra_callbacks)
        self.resume()
        self.report_adapter()

    def setup_processes(self) -> None:
        """The accelerator (trainer.strategy: ddp, or fsdp: sharded backbone and adapter), the
        run folder (locked by the main process: one run per folder), and the checkpoint to
        resume from, if any."""
        t = self.t
        keep_freed_memory()  # no page faults to take back each step's memory (host_memory.py)
        self.acc = make_accelerator(t, self.run_dir)  # with the trackers of trainer.report_to
        # Lines are not wrapped at 80 columns in a log file (tables still fit the width).
        self.console = Console(quiet=not self.acc.is_main_process, highlight=False, soft_wrap=True)
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        if t.num_processes is not None and t.num_processes != self.world:
            raise ConfigError(
                "trainer.num_processes",
                f"the config asks for {t.num_processes} processes but {self.world} were started; "
                f"launch {t.num_processes} or set trainer.num_processes={self.world}",
            )
        if self.acc.is_main_process:
            acquire_run_lock(self.run_dir)  # before anything is read, written or cleaned up there
            self.locked = True
        self.resume_from = check_resumable(self.run_dir, self.cfg, main=self.acc.is_main_process)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.acc.is_main_process:
            remove_partial(self.run_dir)
            adopt_resume_point(self.run_dir, self.cfg, self.resume_from)  # trainer.resume_from, the first time
        # Names the run in its log (a sweep's summary finds a killed job's reason by it).
        self.console.print(f"run folder {self.run_dir.absolute()}", markup=False, soft_wrap=True)

    def setup_data(self) -> None:
        """Tokenized splits, the order of training examples, and the run's length (which the
        method checks: ALoRA's schedule must fit)."""
        t, cfg = self.t, self.cfg
        prepared = self.prepared or Prepared.build(cfg)
        self.task, self.tokenizer, self.method = prepared.task, prepared.tokenizer, prepared.method
        self.examples = {split: self.task.examples(split) for split in ("train", "dev", "test")}
        # Cached on disk by tokenizer, rendered text and options (peftrun/token_cache.py).
        self.train_feats, self.data_report, _ = tokenize_cached(
            self.examples["train"], self.tokenizer, cfg.task.max_length, cfg.task.loss_on_prompt
        )
        self.dev_feats, dev_report, _ = tokenize_cached(
            self.examples["dev"], self.tokenizer, cfg.task.max_length, cfg.task.loss_on_prompt
        )
        self.console.print(f"[bold]data[/] train: {self.data_report}; dev: {dev_report}; "
                           f"test: {len(self.examples['test'])} prompts")
        # Dev loss in batches of similar lengths: less padding to compute, the same token sum.
        self.eval_feats = sorted(self.dev_feats, key=lambda f: len(f["input_ids"]))
        global_batch = t.micro_batch_size * t.grad_accum * self.world
        # Validation checked the examples before tokenizing; some may have been dropped since.
        steps_per_epoch = check_batch(cfg, len(self.train_feats), self.world)
        lengths = [len(f["input_ids"]) for f in self.train_feats] if t.group_by_length else None
        self.order = DataOrder(len(self.train_feats), global_batch, t.seed, lengths)
        # trainer.packing: micro-batches (and dev batches) packed into rows of task.max_length.
        self.packing_length = cfg.task.max_length if t.packing else None
        self.total_steps, self.warmup = run_length(t, steps_per_epoch)
        self.method.check_run(self.total_steps, steps_per_epoch)

    def setup_model(self) -> None:
        """The backbone, then the adapter the method attaches to it."""
        self.model = build_model(self.cfg.model, self.tokenizer, device=self.acc.device)
        set_seed(self.t.seed)  # after the backbone, which seeds its own init: the adapter's init is ours
        self.adapter = self.method.attach(self.model)
        if self.t.init_from:
            self.init_adapter(self.t.init_from)

    def init_adapter(self, path: str) -> None:
        """trainer.init_from: a saved adapter's tensors (run, checkpoint or adapter folder) into the
        adapter just attached, before the optimizer sees it (a checkpoint to resume from, loaded
        later, replaces them). Its method state (ALoRA's rounds) starts afresh."""
        from ..multitenant import locate_adapter

        try:
            folder = locate_adapter("init", path).folder
        except ConfigError as e:
            raise ConfigError("trainer.init_from", e.message) from None
        try:
            self.adapter.load_state_dict(load_file(str(folder / ADAPTER_WEIGHTS)))
        except Exception as e:  # noqa: BLE001  (names or shapes that do not fit, an unreadable file)
            raise ConfigError("trainer.init_from", f"{folder} does not fit this run's adapter "
                                                   f"({' '.join(str(e).split())[:200]}); start from an adapter "
                                                   f"of the same method and options") from None
        self.console.print(f"init adapter from {folder}", markup=False)

    def setup_optimizer(self) -> None:
        """AdamW over the adapter's parameter groups, the learning-rate schedule, and the
        accelerator's wrapping (DDP or FSDP) of the model and the optimizer."""
        t = self.t
        optimizer = adamw(self.adapter.param_groups(t.lr), sharded=is_sharded(self.acc), lr=t.lr,
                          betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay)
        schedule = lr_lambda(self.total_steps, self.warmup, t.scheduler)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.model, self.optimizer = self.acc.prepare(self.model, optimizer)
        self.base_model = self.acc.unwrap_model(self.model)
        self.kept_logits = keeps_logits(self.base_model)  # the LM head only where a label is predicted
        self.sharded = is_sharded(self.acc)
        self.params = [p for _, p in self.adapter.trainable_parameters()]  # after FSDP replaced them

    def setup_callbacks(self, extra_callbacks: Sequence[Any]) -> None:
        """The run's state and callbacks, and the live objects (`Run`) they reach through it."""
        t, acc = self.t, self.acc
        self.state = TrainState(total_steps=self.total_steps, steps_per_epoch=self.order.steps_per_epoch)
        self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl", t.log_every, enabled=acc.is_main_process)
        # The console (quiet on other processes): a bar or plain lines, and a line per evaluation.
        self.progress = Progress(t.progress and acc.is_main_process, self.console, t.log_every)
        self.trackers = Trackers(acc, self.cfg, self.run_dir, t.log_every)
        self.callbacks = [
            EarlyStopping(t.early_stopping_patience),
            self.metrics_log,
            self.progress,  # after EarlyStopping: an evaluation's line tells whether it is the best
            self.trackers,
            *self.adapter.callbacks(),
            Checkpointer(t.save_every, t.save_total_limit),  # after all that changes a step's state
            *extra_callbacks,
        ]
        self.state.run = Run(self.cfg, self.run_dir, acc, self.model, self.adapter, self.optimizer, self.scheduler,
                             self.tokenizer, self.callbacks, self.dev_feats, self.metrics_log.write)

    def resume(self) -> None:
        """Load the newest checkpoint of the run folder, if any."""
        if self.resume_from is not None:
            load_checkpoint(self.resume_from, self.state, self.state.run, self.rank)
            self.console.print(f"[bold]resume[/] from {self.resume_from} "
                               f"(step {self.state.step} of {self.total_steps})")

    def report_adapter(self) -> None:
        """The adapter's trainable parameters, by kind (the summary reports this count)."""
        self.counts = counts = self.adapter.parameter_counts()
        self.console.print(f"[bold]{self.adapter.method}[/] trainable parameters: {counts['total']:,} "
                           f"({', '.join(f'{k} {v:,}' for k, v in counts.items() if k != 'total')})")

    # ================================================================== training
    def train(self) -> dict[str, Any]:
        """The steps (until the last one, early stopping or a preemption signal), then the final
        evaluation, saving and the summary. A preempted run exits after its checkpoint."""
        state = self.state
        self.model.train()
        fire(self.callbacks, "on_train_start", state)
        self.started = time.perf_counter() - state.train_seconds
        with catch_preemption() as (preempted, hand_on):
            try:
                while state.step < self.total_steps and not state.should_stop and not state.preempted:
                    self.step(preempted)
                    if self.t.eval_every > 0 and state.step % self.t.eval_every == 0:
                        self.evaluate()
                    fire(self.callbacks, "on_step_end", state)
            finally:
                fire([c for c in self.callbacks if isinstance(c, Progress)], "on_train_end", state)
            if state.preempted:
                if self.acc.is_main_process:
                    saved = latest_checkpoint(self.run_dir)
                    print(f"peftrun: stopped by {preempted.name or 'a signal'} after step {state.step}; "
                          f"checkpoint {saved or self.run_dir / 'checkpoints'} saved; run the same "
                          f"command again to resume", file=sys.stderr, flush=True)
                hand_on()
        rows = self.final_evaluation()
        self.save(rows)
        fire([c for c in self.callbacks if not isinstance(c, Progress)], "on_train_end", state)
        return self.summary()

    # ------------------------------------------------------------------ one optimizer step
    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This process's share of the step's global batch, collated (padded or packed) into
        micro-batches."""
        size, pad = self.t.micro_batch_size, self.tokenizer.pad_token_id
        per_process = size * self.t.grad_accum
        local = self.order.step_indices(step)[self.rank * per_process : (self.rank + 1) * per_process]
        return [collate([self.train_feats[i] for i in local[j : j + size]], pad, self.packing_length)
                for j in range(0, per_process, size)]

    def show_prompt(self, batch: dict[str, torch.Tensor] | None) -> None:
        """Tell the adapter the next forward's prompt tokens (and a packed batch's examples);
        None: forget them. Unpacked batches keep the one-argument call."""
        if batch is None:
            self.adapter.set_prompt_mask(None)
        elif "segment_ids" in batch:
            self.adapter.set_prompt_mask(batch["prompt_mask"], batch["segment_ids"])
        else:
            self.adapter.set_prompt_mask(batch["prompt_mask"])

    def step(self, preempted: PreemptionFlag) -> None:
        """Forward and backward over the micro-batches, the gradient norm (clipped), then one
        reduction agreeing on the step's loss, tokens, finiteness and preemption over every
        process, and the optimizer step — dropped when the loss or the gradient norm is not
        finite (the run stops, or skips it within trainer.max_nonfinite_skips)."""
        acc, state = self.acc, self.state
        micro_batches = self.micro_batches(state.step)
        # Token-normalized accumulation: every labelled token of the global batch weighs the
        # same, however tokens are spread over micro-batches and processes.
        n_tokens = acc.reduce(torch.tensor(float(sum(map(label_tokens, micro_batches))), device=acc.device), "sum")
        step_loss = torch.zeros((), device=acc.device)
        step_tokens = sum(map(real_tokens, micro_batches))  # on the host: no sync
        for j, batch in enumerate(micro_batches):
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            sync = j == len(micro_batches) - 1
            with nullcontext() if sync else acc.no_sync(self.model):
                self.show_prompt(batch)
                with acc.autocast():
                    loss_sum = labelled_loss_sum(self.model, batch, self.kept_logits)
                # DDP averages gradients over processes; scale back to a global token mean.
                acc.backward(loss_sum * self.world / n_tokens.clamp(min=1))
            step_loss += loss_sum.detach()
        grad_norm = self.clip_gradients()
        # fp16: the gradient scaler skips steps with non-finite gradients itself (and lowers
        # its scale); only a non-finite loss counts.
        finite = torch.isfinite(step_loss) if self.t.precision == "fp16" else \
            torch.isfinite(step_loss) & torch.isfinite(grad_norm)
        # One reduction (one sync) for the step's loss, its tokens, whether every process's loss
        # and gradients are finite, and whether a signal reached any process (all then stop
        # together, after this step's checkpoint).
        host = torch.tensor([step_tokens, preempted.signum], dtype=torch.float64).to(acc.device)
        totals = acc.reduce(torch.cat([torch.stack([step_loss.double(), (~finite).double()]), host]), "sum")
        loss_sum, nonfinite, tokens, signals = totals.tolist()
        if nonfinite > 0 and self.t.precision != "fp16":
            self.optimizer.zero_grad(set_to_none=True)  # the update is dropped: the adapter stays finite
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.show_prompt(None)

        state.step += 1
        state.grad_norm = float(grad_norm)  # already computed: the reduction above synchronized
        if nonfinite > 0:
            self.nonfinite_step(loss_sum, float(grad_norm))
        else:
            state.train_loss = loss_sum / float(n_tokens.clamp(min=1))
        state.tokens_seen += int(tokens)
        state.preempted = signals > 0
        state.train_seconds = time.perf_counter() - self.started

    def clip_gradients(self) -> torch.Tensor:
        """Clip the adapter's gradients to trainer.max_grad_norm (0: measure only); their total
        norm before clipping, the same on every process."""
        max_norm = self.t.max_grad_norm if self.t.max_grad_norm > 0 else math.inf
        norm = self.acc.clip_grad_norm_(self.params, max_norm)
        if norm is None:  # a back-end that does not report it
            return torch.zeros((), device=self.acc.device)
        full = getattr(norm, "full_tensor", None)  # FSDP: a DTensor
        return (full() if callable(full) else norm).to(self.acc.device)

    def nonfinite_step(self, loss_sum: float, grad_norm: float) -> None:
        """A step whose loss or gradient norm was not finite (its update was dropped): skipped
        within trainer.max_nonfinite_skips, else the run stops, keeping what it saved."""
        state = self.state
        state.nonfinite_steps += 1
        what = f"the loss is {loss_sum}" if not math.isfinite(loss_sum) else f"the gradient norm is {grad_norm}"
        if state.nonfinite_steps > self.t.max_nonfinite_skips:
            raise divergence_error(self.cfg, state.step, what, self.run_dir)
        self.metrics_log.write({"event": "nonfinite_skip", "step": state.step,
                                "skipped": state.nonfinite_steps, "reason": what})
        self.console.print(f"[bold]skipped[/] step {state.step}: {what} ({state.nonfinite_steps} of "
                           f"trainer.max_nonfinite_skips={self.t.max_nonfinite_skips})")

    # ================================================================== evaluation
    def evaluate(self) -> None:
        """A dev evaluation: the dev loss, generation metrics every trainer.generate_every."""
        state = self.state
        state.dev_loss = self.dev_loss()
        if self.t.generate_every > 0 and state.step % self.t.generate_every == 0:
            state.metrics, _ = self.generation_metrics("dev")
            state.metrics_step = state.step
        fire(self.callbacks, "on_evaluate", state)

    def dev_loss(self) -> float:
        """Token-mean loss over the whole dev set, summed over processes."""
        acc, model, batch_size = self.acc, self.model, self.t.eval_batch_size
        model.eval()
        loss, tokens = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
        with torch.no_grad():
            shard, real = padded_shard(self.eval_feats, self.rank, self.world)
            # The shard's padding examples: the same forwards as every process's, no loss.
            shard = shard[:real] + [{**f, "labels": [IGNORE_INDEX] * len(f["labels"])} for f in shard[real:]]
            for i in range(0, len(shard), batch_size):
                batch = collate(shard[i : i + batch_size], self.tokenizer.pad_token_id, self.packing_length)
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                self.show_prompt(batch)
                with acc.autocast():
                    loss += labelled_loss_sum(model, batch, self.kept_logits)
                tokens += label_tokens(batch)
        self.show_prompt(None)
        model.train()
        loss, tokens = acc.reduce(loss, "sum"), acc.reduce(tokens, "sum")
        return float(loss / tokens.clamp(min=1))

    def generation_metrics(self, split: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Generate for every prompt of `split` (shared over processes) and score the
        predictions with the task's metric; also returns one row per example."""
        t, rank, world = self.t, self.rank, self.world
        exs = self.examples[split]
        prompts, real = padded_shard([e.prompt for e in exs], rank, world)
        mine, size = [], t.eval_batch_size
        # One batch at a time (the batches generate() makes itself), for the progress display.
        with self.progress.generation(split, len(prompts)) as advance:
            for i in range(0, len(prompts), size):
                mine += generate(
                    self.base_model, self.tokenizer, self.adapter, prompts[i : i + size],
                    batch_size=size, max_new_tokens=self.cfg.task.max_new_tokens,
                    num_beams=t.num_beams, max_prompt_length=self.cfg.task.max_length,
                    synced=self.sharded and world > 1,
                )
                advance(len(prompts[i : i + size]))
        mine = mine[:real]
        # Process r generated examples r, r + world, ...: gather and put them back in order.
        numbered = [(rank + world * i, p) for i, p in enumerate(mine)]
        predictions = [p for _, p in sorted(gather_object(numbered) if world > 1 else numbered)]
        metrics = self.task.score(predictions, exs)
        rows = [{"id": e.id, "prompt": e.prompt, "target": e.target, "references": e.references, "prediction": p}
                for e, p in zip(exs, predictions)]
        return metrics, rows

    def final_evaluation(self) -> list[dict[str, Any]]:
        """The dev loss of the adapter kept (the best one where trainer.load_best_at_end), and its
        test metrics; returns the test predictions."""
        state, best = self.state, self.run_dir / "best"
        if self.t.load_best_at_end and self.t.eval_every > 0 and (best / ADAPTER_WEIGHTS).exists():
            # best/ holds exactly the weights its dev loss was measured on (saved at that
            # evaluation, before anything else of the step): no need to measure it again.
            self.adapter.load_state_dict(load_file(str(best / ADAPTER_WEIGHTS)))
            state.dev_loss = state.best_dev_loss
            self.console.print(f"[bold]best[/] adapter of step {state.best_step} loaded "
                               f"(dev loss {state.dev_loss:.4f})")
        else:
            state.dev_loss = self.dev_loss()
        state.metrics, rows = self.generation_metrics("test")
        return rows

    # ================================================================== saving and the summary
    def save(self, rows: list[dict[str, Any]]) -> None:
        """The final adapter (<run>/adapter) and the test predictions (predictions.jsonl)."""
        tensors = self.adapter.state_dict()  # every process: sharded tensors are gathered
        check_finite_tensors(tensors, self.cfg, self.state.step, "adapter", self.run_dir)
        if self.acc.is_main_process:
            metadata = {"base_model": self.cfg.model.name, "step": self.state.step}
            save_adapter(self.adapter, self.run_dir / "adapter", metadata, tensors=tensors)
            with (self.run_dir / "predictions.jsonl").open("w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        self.acc.wait_for_everyone()

    def summary(self) -> dict[str, Any]:
        """The run's summary: written to summary.json, logged as the test event and printed as a
        table (main process); returned on every process."""
        state, report = self.state, self.data_report
        summary = {
            "method": self.adapter.method,
            "trainable_params": self.counts["total"],
            "steps": state.step,
            "train_loss": state.train_loss,
            "dev_loss": state.dev_loss,
            **{f"test_{k}": v for k, v in state.metrics.items()},
            "primary_metric": f"test_{self.task.primary_metric}",
            "tokens_per_second": state.tokens_seen / max(state.train_seconds, 1e-9),
            "train_seconds": state.train_seconds,
            "peak_memory_mb": peak_memory_mb(self.acc.device),
            "adapter_dir": str(self.run_dir / "adapter"),
            "train_examples": report.kept,
            "truncated": report.truncated,
            "dropped": report.dropped,
        }
        if self.acc.is_main_process:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self.metrics_log.write({"event": "test", "step": state.step, **state.metrics})
            self.console.print(summary_table(summary))
            self.plot_curves()
        return summary

    def plot_curves(self) -> None:
        """curves.png in the run folder, from metrics.jsonl (a failure to draw only warns)."""
        try:
            write_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png",
                         self.task.primary_metric, f"{self.adapter.method} - {self.run_dir.name}")
        except Exception as e:  # noqa: BLE001  (the run itself is done and saved)
            self.console.print(f"curves not drawn: {type(e).__name__}: {e}", markup=False)
