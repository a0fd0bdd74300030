"""ALoRA — Allocating LoRA (Liu et al., NAACL 2024, arXiv 2403.16187). Not PEFT's "aLoRA"
(Activated LoRA), an unrelated method.

LoRA whose ranks carry fixed 0/1 gates: z = x A^T diag(g) B^T. Every module owns a pool of
`max_rank` rank slots allocated once; `r_init` start open. An allocation schedule (Algorithm 1,
schedule.py) scores every open rank by AB-LoRA importance on a fixed dev batch (scoring.py),
closes the lowest ones globally, and opens as many new slots in modules that lost none — by
flipping gates and re-initializing slots, so parameters, optimizer and DDP wrapper never change.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ..base import DEFAULT_ADAPTER
from ..common.targets import find_targets
from ..common.peft_format import lora_peft_config, lora_peft_tensors, peft_keys
from ..lora.model import LoraAdapter, LoraMethod
from ..registry import register_method
from .config import AloraConfig
from .schedule import AllocationSchedule
from .scoring import SCORE_ESTIMATORS, Rank, ablation_losses, taylor_scores


class AloraAdapter(LoraAdapter):
    method = "alora"

    def __init__(self, model: nn.Module, cfg: Any, name: str, layers: dict, n_per_round: int, schedule_steps):
        super().__init__(model, cfg, name, layers)
        self.n_per_round = n_per_round  # n_A: ranks closed (and opened) per round
        self.schedule_steps = schedule_steps  # steps_per_epoch -> the steps after which rounds run
        self.rounds_done = 0
        self.history: list[dict[str, Any]] = []

    # -- gates
    def gate(self, module: str) -> torch.Tensor:
        return self.layers[module].lora_gate[self.name]

    def live_ranks(self) -> list[Rank]:
        return [(m, int(s)) for m in self.layers for s in torch.nonzero(self.gate(m)).flatten().tolist()]

    def capacity(self) -> dict[str, int]:
        """Rank slots per module (max_rank; per expert for a stacked expert weight)."""
        return {m: self.gate(m).numel() for m in self.layers}

    def allocation(self) -> dict[str, int]:
        return {m: int(self.gate(m).sum()) for m in self.layers}

    def live_parameter_count(self) -> int:
        return sum(int(self.gate(m).sum()) * sum(layer.lora_A[self.name].shape[1:]) +
                   int(self.gate(m).sum()) * layer.lora_B[self.name].shape[0]
                   for m, layer in self.layers.items())

    # -- state: gates are part of the adapter, schedule progress is method state
    def saved_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return super().saved_tensors() + [(f"{m}.lora_gate", self.gate(m)) for m in self.layers]

    def extra_state(self) -> dict[str, Any]:
        return {"rounds_done": self.rounds_done, "history": self.history}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.rounds_done = int(state.get("rounds_done", 0))
        self.history = list(state.get("history", []))

    def callbacks(self) -> list[Any]:
        return [AllocationSchedule(self)]

    def peft_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """A standard LoRA adapter sliced to the open ranks, with PEFT's `rank_pattern`; modules
        left with no rank are dropped. `alpha_pattern` keeps our scale alpha / r_init."""
        c = self.cfg
        factors, ranks = {}, {}
        for m, layer in self.layers.items():
            open_slots = torch.nonzero(self.gate(m)).flatten()
            if open_slots.numel() == 0:
                continue
            factors[m] = layer.peft_factors(self.name, open_slots)
            ranks[m] = factors[m][0].shape[0] // getattr(layer, "num_experts", 1)
        keys = peft_keys(self.model, ranks)
        factors = {keys[m]: f for m, f in factors.items()}
        scale = c.alpha / c.r_init
        config = lora_peft_config(self.model, {m: self.layers[m] for m in ranks}, c.r_init, c.alpha, c.dropout,
                                  rank_pattern=ranks, alpha_pattern={m: scale * r for m, r in ranks.items()})
        return config, lora_peft_tensors(factors)

    # -- AB-LoRA importance
    def importance(self, batch: dict[str, torch.Tensor], ablations_per_forward: int = 32,
                   estimator: str = "exact") -> dict[Rank, float]:
        """IS(r) for every open rank on one batch, eval mode: exactly (forward passes only, no
        grad) or by its first-order estimate (`estimator="taylor"`, scoring.py)."""
        live = self.live_ranks()
        if estimator == "taylor":
            return taylor_scores(self, batch, live)
        configs = [("without", r) for r in live] + [("only", r) for r in live]
        with torch.no_grad():
            losses = ablation_losses(self, batch, configs, ablations_per_forward)
        n = len(live)
        return {r: losses[i] - losses[n + i] for i, r in enumerate(live)}

    @torch.inference_mode()
    def importance_naive(self, batch: dict[str, torch.Tensor]) -> dict[Rank, float]:
        """The definition, as written: set the real gates, two full forwards per open rank.
        The reference the optimized scoring is checked and timed against."""
        model, was_training = self.model, self.model.training
        model.eval()
        labels = batch["labels"][:, 1:]

        def ce() -> float:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100))

        open_gates = {m: self.gate(m).clone() for m in self.layers}
        scores = {}
        try:
            for m, slot in self.live_ranks():
                for mm in self.layers:
                    self.gate(mm).copy_(open_gates[mm])
                self.gate(m)[slot] = 0
                without = ce()
                for mm in self.layers:
                    self.gate(mm).zero_()
                self.gate(m)[slot] = 1
                scores[(m, slot)] = without - ce()
        finally:
            for mm in self.layers:
                self.gate(mm).copy_(open_gates[mm])
            model.train(was_training)
        return scores



@register_method
class AloraMethod(LoraMethod):
    name = "alora"
    config_class = AloraConfig
    adapter_class = AloraAdapter
    fsdp_unsupported = "its allocation rounds rewrite ranks and their optimizer moments in place"

    def check_config(self) -> None:
        c = self.cfg
        if c.r_init <= 0:
            raise ConfigError("method.r_init", f"must be a positive integer, got {c.r_init}")
        if c.max_rank < c.r_init:
            raise ConfigError("method.max_rank", f"the slots per module ({c.max_rank}) must hold r_init={c.r_init}")
        self.check_factors()
        if c.rounds < 0:
            raise ConfigError("method.rounds", f"must be 0 or more, got {c.rounds}")
        if c.ranks_per_round is not None and c.ranks_per_round <= 0:
            raise ConfigError("method.ranks_per_round", "must be positive, or null for the adapted module kinds per block")
        if c.dev_batch_size <= 0 or c.ablations_per_forward <= 0:
            raise ConfigError("method.dev_batch_size", "dev_batch_size and ablations_per_forward must be positive")
        if c.score_estimator not in SCORE_ESTIMATORS:
            raise ConfigError("method.score_estimator",
                              f"must be one of {', '.join(SCORE_ESTIMATORS)}, got {c.score_estimator!r}")
        if c.warmup_steps <= 0 and c.warmup_epochs <= 0:
            raise ConfigError("method.warmup_epochs", "the warm-up must be positive (warmup_epochs or warmup_steps)")
        if c.interval_steps <= 0 and c.interval_epochs <= 0:
            raise ConfigError("method.interval_epochs", "the interval must be positive (interval_epochs or interval_steps)")

    def check_model(self, model: nn.Module) -> None:
        names = find_targets(model, self.cfg.targets)
        per_round = self.ranks_per_round(names)
        if self.cfg.rounds and per_round >= len(names) * self.cfg.r_init:
            raise ConfigError("method.ranks_per_round",
                              f"{per_round} ranks per round is not below the {len(names) * self.cfg.r_init} open ranks")

    def ranks_per_round(self, names: list[str]) -> int:
        """n_A: the paper's default is the number of adapted module kinds per block."""
        if self.cfg.ranks_per_round is not None:
            return self.cfg.ranks_per_round
        return len({n.rsplit(".", 1)[-1] for n in names})

    def schedule(self, steps_per_epoch: int) -> list[int]:
        """Steps after which allocation rounds run: K1, K1 + K2, ... (N_A of them)."""
        c = self.cfg
        warmup = c.warmup_steps if c.warmup_steps > 0 else max(1, round(c.warmup_epochs * steps_per_epoch))
        interval = c.interval_steps if c.interval_steps > 0 else max(1, round(c.interval_epochs * steps_per_epoch))
        return [warmup + i * interval for i in range(c.rounds)]

    def check_run(self, total_steps: int, steps_per_epoch: int) -> None:
        """Called by the loop once the run's length is known, before any weights load."""
        steps = self.schedule(steps_per_epoch)
        if steps and steps[0] >= total_steps:
            raise ConfigError(
                "method.warmup_epochs",
                f"the warm-up ends at step {steps[0]} but the run has {total_steps} steps; shorten the "
                f"warm-up (method.warmup_epochs / method.warmup_steps) or train longer",
            )

    def scaling(self) -> float:
        return self.cfg.alpha / self.cfg.r_init

    def attach(self, model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> AloraAdapter:
        self.check_config()
        c = self.cfg
        layers = self.inject(model, adapter_name, c.max_rank)
        for layer in layers.values():
            layer.add_gate(adapter_name, c.r_init)
        return AloraAdapter(model, c, adapter_name, layers, self.ranks_per_round(list(layers)), self.schedule)

