"""ALoRA's allocation schedule (Algorithm 1), as a training callback: after a warm-up of K1 steps
and then every K2 steps, for N_A rounds — score every open rank, close the n_A lowest, open as
many new ranks in the modules that lost none."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any

import torch

from ...data import collate_train
from ..lora.layer import LoraLinear
from .report import allocation_table, write_heatmap
from .scoring import Rank, ablation_losses, taylor_scores


def reallocate(scores: dict[Rank, float], allocation: dict[str, int], n: int, max_rank: int | dict[str, int]
               ) -> tuple[list[Rank], dict[str, int]]:
    """The paper's rule. Close the `n` lowest-scored ranks (globally); give as many new ranks to
    the modules that lost none, evenly, the extras to those of higher mean importance, never
    beyond `max_rank` slots (per module where a dict: an expert weight has one pool per expert);
    if no module can take them, the budget shrinks."""
    slots = max_rank if isinstance(max_rank, dict) else dict.fromkeys(allocation, max_rank)
    pruned = sorted(scores, key=lambda r: (scores[r], r))[:n]
    lost = {m for m, _ in pruned}
    by_module: dict[str, list[float]] = defaultdict(list)
    for (m, _), s in scores.items():
        by_module[m].append(s)
    mean = {m: sum(v) / len(v) for m, v in by_module.items()}
    candidates = sorted((m for m in allocation if m not in lost),
                        key=lambda m: (-mean.get(m, float("-inf")), m))
    grow: dict[str, int] = {}
    room = {m: slots[m] - allocation[m] for m in candidates}
    remaining = len(pruned)
    while remaining and any(room[m] > 0 for m in candidates):
        open_ = [m for m in candidates if room[m] > 0]
        share, extra = divmod(remaining, len(open_))
        for i, m in enumerate(open_):  # open_ is in order of mean importance: extras go first
            give = min(room[m], share + (1 if i < extra else 0))
            grow[m] = grow.get(m, 0) + give
            room[m] -= give
            remaining -= give
    return pruned, {m: k for m, k in grow.items() if k}


class AllocationSchedule:
    def __init__(self, adapter: Any):
        self.adapter = adapter
        self.cfg = adapter.cfg

    def on_train_start(self, state) -> None:
        run = state.run
        self.steps = self.adapter.schedule_steps(state.steps_per_epoch)
        dev = run.dev_features[: self.cfg.dev_batch_size]
        batch = collate_train(dev, run.tokenizer.pad_token_id)
        self.batch = {k: v.to(run.accelerator.device) for k, v in batch.items()}
        fitting = [s for s in self.steps if s < state.total_steps]
        if len(fitting) < len(self.steps) and run.accelerator.is_main_process:
            print(f"alora: {len(self.steps) - len(fitting)} of {len(self.steps)} allocation rounds fall after "
                  f"the last step ({state.total_steps}) and will not run")

    def on_step_end(self, state) -> None:
        done = self.adapter.rounds_done
        if done < len(self.steps) and state.step == self.steps[done]:
            self.allocate(state)

    # ------------------------------------------------------------------ one round
    def scores(self, state) -> dict[Rank, float]:
        """AB-LoRA importance of every open rank; the ablations are split over the processes
        and gathered, so every process holds the same scores and takes the same decisions."""
        acc = state.run.accelerator
        live = self.adapter.live_ranks()
        if self.cfg.score_estimator == "taylor":
            return self.taylor(acc, live)
        configs = [("without", r) for r in live] + [("only", r) for r in live]
        rank, world = acc.process_index, acc.num_processes
        mine = ablation_losses(self.adapter, self.batch, configs[rank::world], self.cfg.ablations_per_forward)
        numbered = [(rank + world * i, loss) for i, loss in enumerate(mine)]
        if world > 1:
            from accelerate.utils import gather_object

            numbered = gather_object(numbered)
        losses = [loss for _, loss in sorted(numbered)]
        n = len(live)
        return {r: losses[i] - losses[n + i] for i, r in enumerate(live)}

    def taylor(self, acc, live: list[Rank]) -> dict[Rank, float]:
        """The first-order estimate: two passes, too few to split; the main process's scores go
        to every process, so all take the same decisions whatever their float rounding."""
        scores = taylor_scores(self.adapter, self.batch, live)
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            scores = broadcast_object_list([scores], from_process=0)[0]
        return scores

    def allocate(self, state) -> None:
        adapter, run = self.adapter, state.run
        scores = self.scores(state)
        before = adapter.allocation()
        pruned, grow = reallocate(scores, before, adapter.n_per_round, adapter.capacity())
        optimizer = getattr(run.optimizer, "optimizer", run.optimizer)
        with torch.no_grad():
            for m, slot in pruned:
                adapter.gate(m)[slot] = 0.0
            generator = torch.Generator().manual_seed(run.cfg.trainer.seed * 1000 + adapter.rounds_done)
            for m in sorted(grow):
                layer = adapter.layers[m]
                free = layer.free_slots(adapter.name)
                for slot in free[: grow[m]]:
                    reinit_slot(layer, adapter.name, slot, generator)
                    reset_moments(optimizer, layer.lora_A[adapter.name], slot, dim=0)
                    reset_moments(optimizer, layer.lora_B[adapter.name], slot, dim=1)
        adapter.rounds_done += 1
        record = {
            "event": "alora_round", "step": state.step, "round": adapter.rounds_done,
            "pruned": [[m, s, scores[(m, s)]] for m, s in pruned], "grown": grow,
            "allocation": adapter.allocation(), "open_ranks": sum(adapter.allocation().values()),
            "live_parameters": adapter.live_parameter_count(),
        }
        adapter.history.append(record)
        if run.accelerator.is_main_process:
            run.log(record)
            from rich.console import Console

            Console().print(allocation_table(adapter, f"ALoRA round {adapter.rounds_done} (step {state.step})"))

    def on_train_end(self, state) -> None:
        run = state.run
        if not run.accelerator.is_main_process:
            return
        (run.run_dir / "alora_allocation.json").write_text(
            json.dumps({"final": self.adapter.allocation(), "history": self.adapter.history}, indent=2))
        write_heatmap(self.adapter, run.run_dir / "alora_allocation.png")


def reset_moments(optimizer: torch.optim.Optimizer, param: torch.Tensor, slot: int, dim: int) -> None:
    """A re-initialized slot starts with fresh Adam moments."""
    state = optimizer.state.get(param)
    if not state:
        return
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key].select(dim, slot).zero_()


def reinit_slot(layer: LoraLinear, name: str, slot: int, generator: torch.Generator) -> None:
    """A new rank: A row random (Kaiming-uniform bound, as at init), B column zero, gate open —
    the model's output is unchanged at the moment of growth."""
    A, B = layer.lora_A[name], layer.lora_B[name]
    bound = 1.0 / math.sqrt(A.shape[1])
    with torch.no_grad():
        A[slot] = (torch.rand(A.shape[1], generator=generator) * 2 - 1).mul_(bound).to(A.device, A.dtype)
        B[:, slot] = 0.0
        layer.lora_gate[name][slot] = 1.0
