"""ALoRA — Allocating LoRA (Liu et al., NAACL 2024, arXiv 2403.16187). Not PEFT's "aLoRA"
(Activated LoRA), an unrelated method.

LoRA whose ranks carry fixed 0/1 gates: z = x A^T diag(g) B^T. Every module owns a pool of
`max_rank` rank slots allocated once; `r_init` start open. An allocation schedule (Algorithm 1)
scores every open rank by AB-LoRA importance on a fixed dev batch, closes the lowest ones
globally, and opens as many new slots in modules that lost none — by flipping gates and
re-initializing slots, so parameters, optimizer and DDP wrapper never change.

    IS(r) = CE(every open rank but r) - CE(only r open in the whole network)
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .lora import LoraAdapter, LoraLinear, LoraMethod

Rank = tuple[str, int]  # (module name, slot)


class AloraAdapter(LoraAdapter):
    method = "alora"
    supports_merge = True

    def __init__(self, model: nn.Module, layers: dict[str, LoraLinear], cfg: Any, name: str):
        super().__init__(model, layers, cfg, name)
        self.rounds_done = 0
        self.history: list[dict[str, Any]] = []

    # -- gates
    def gate(self, module: str) -> torch.Tensor:
        return self.layers[module].lora_gate[self.name]

    def live_ranks(self) -> list[Rank]:
        return [(m, int(s)) for m in self.layers for s in torch.nonzero(self.gate(m)).flatten().tolist()]

    def allocation(self) -> dict[str, int]:
        return {m: int(self.gate(m).sum()) for m in self.layers}

    def live_parameter_count(self) -> int:
        return sum(int(self.gate(m).sum()) * sum(layer.lora_A[self.name].shape[1:]) +
                   int(self.gate(m).sum()) * layer.lora_B[self.name].shape[0]
                   for m, layer in self.layers.items())

    # -- state: gates are part of the adapter, schedule progress is method state
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        state.update({f"{m}.lora_gate": self.gate(m).detach().clone().contiguous() for m in self.layers})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        gates = {k: v for k, v in state.items() if k.endswith(".lora_gate")}
        if set(gates) != {f"{m}.lora_gate" for m in self.layers}:
            raise ValueError("ALoRA adapter tensors lack the rank gates of some modules")
        super().load_state_dict({k: v for k, v in state.items() if k not in gates})
        with torch.no_grad():
            for m in self.layers:
                self.gate(m).copy_(gates[f"{m}.lora_gate"])

    def extra_state(self) -> dict[str, Any]:
        return {"rounds_done": self.rounds_done, "history": self.history}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.rounds_done = int(state.get("rounds_done", 0))
        self.history = list(state.get("history", []))

    def callbacks(self) -> list[Any]:
        from .alora_schedule import AllocationSchedule

        return [AllocationSchedule(self)]

    def peft_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """A standard LoRA adapter sliced to the open ranks, with PEFT's `rank_pattern`; modules
        left with no rank are dropped. `alpha_pattern` keeps our scale alpha / r_init."""
        c = self.cfg
        tensors, ranks = {}, {}
        for m, layer in self.layers.items():
            open_slots = torch.nonzero(self.gate(m)).flatten()
            if open_slots.numel() == 0:
                continue
            ranks[m] = open_slots.numel()
            tensors[f"base_model.model.{m}.lora_A.weight"] = layer.lora_A[self.name][open_slots].detach().clone().contiguous()
            tensors[f"base_model.model.{m}.lora_B.weight"] = layer.lora_B[self.name][:, open_slots].detach().clone().contiguous()
        scale = c.alpha / c.r_init
        config = {
            "peft_type": "LORA",
            "r": int(c.r_init),
            "lora_alpha": float(c.alpha),
            "rank_pattern": ranks,
            "alpha_pattern": {m: scale * r for m, r in ranks.items()},
            "lora_dropout": float(c.dropout),
            "target_modules": sorted(ranks),
            "fan_in_fan_out": any(type(l.base_layer).__name__ == "Conv1D" for l in self.layers.values()),
            "bias": "none",
        }
        return config, tensors

    # -- AB-LoRA importance
    @torch.no_grad()
    def importance(self, batch: dict[str, torch.Tensor], ablations_per_forward: int = 32) -> dict[Rank, float]:
        """IS(r) for every open rank on one batch: forward passes only, eval mode, no grad."""
        live = self.live_ranks()
        configs = [("without", r) for r in live] + [("only", r) for r in live]
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


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of Transformer blocks (Llama's `model.layers`, GPT-2's `transformer.h`)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError("cannot find the model's list of Transformer blocks")


def block_of(module: str, prefix: str) -> int:
    return int(module[len(prefix) + 1 :].split(".", 1)[0])


@torch.inference_mode()
def ablation_losses(adapter: AloraAdapter, batch: dict[str, torch.Tensor], configs: list[tuple[str, Rank]],
                    per_forward: int) -> list[float]:
    """Token-mean CE of the model on `batch` under each gate configuration: ("without", r) closes
    rank r among the open ones; ("only", r) leaves r alone open in the whole network.

    Two savings keep the scores exact: configurations are stacked `per_forward` at a time into
    one forward (each copy of the batch with its own gates), and a configuration whose rank sits
    in block l starts at block l from the hidden states every configuration of its kind shares
    there (all open, or the backbone), so blocks before l are not run again."""
    model = adapter.model
    was_training = model.training
    model.eval()
    layers = adapter.layers
    prefix, blocks = decoder_layers(model)
    open_gates = {m: adapter.gate(m).detach() for m in layers}
    labels = batch["labels"][:, 1:]
    n_tokens = (labels != -100).sum()

    def set_gates(chunk: list[tuple[str, Rank]]) -> None:
        for m, layer in layers.items():
            g = torch.stack([open_gates[m] if kind == "without" else torch.zeros_like(open_gates[m])
                             for kind, _ in chunk])
            for i, (kind, (rm, slot)) in enumerate(chunk):
                if rm == m:
                    g[i, slot] = 0.0 if kind == "without" else 1.0
            slots = torch.nonzero(g.any(0)).flatten()
            layer.ablation_gate, layer.ablation_slots, layer.ablation_closed = g[:, slots], slots, slots.numel() == 0

    def run(k: int, start_block: int, start_hidden: torch.Tensor | None, capture: dict | None = None):
        hooks = []
        if capture is not None:
            for i, block in enumerate(blocks):
                hooks.append(block.register_forward_pre_hook(
                    lambda mod, args, kwargs, i=i: capture.__setitem__(i, args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True))
        if start_block > 0:
            for block in blocks[:start_block]:
                block.forward = lambda hidden_states, *a, **kw: hidden_states
            stacked = start_hidden.repeat(k, 1, 1)

            def enter(mod, args, kwargs):
                return ((stacked, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": stacked})

            hooks.append(blocks[start_block].register_forward_pre_hook(enter, with_kwargs=True))
        try:
            return model.base_model(input_ids=batch["input_ids"].repeat(k, 1),
                                    attention_mask=batch["attention_mask"].repeat(k, 1)).last_hidden_state
        finally:
            for hook in hooks:
                hook.remove()
            for block in blocks[:start_block]:
                del block.forward

    out: dict[int, float] = {}
    try:
        # The hidden states entering every block with all ranks open, and with none (backbone).
        entering = {}
        for kind in ("without", "only"):
            set_gates([(kind, ("", -1))])
            entering[kind] = {}
            run(1, 0, None, capture=entering[kind])
        groups: dict[tuple[str, int], list[int]] = {}
        for index, (kind, (m, _)) in enumerate(configs):
            groups.setdefault((kind, block_of(m, prefix)), []).append(index)
        for (kind, block), indices in sorted(groups.items()):
            for start in range(0, len(indices), per_forward):
                chunk_ids = indices[start : start + per_forward]
                k = len(chunk_ids)
                set_gates([configs[i] for i in chunk_ids])
                hidden = run(k, block, entering[kind][block])
                # The LM head only where there is a label: K stacked copies' full logits would
                # be K x batch x length x vocab, far more memory than the forward itself.
                stacked_labels = labels.repeat(k, 1)
                where = stacked_labels != -100
                logits = model.get_output_embeddings()(hidden[:, :-1][where])
                token_loss = F.cross_entropy(logits.float(), stacked_labels[where], reduction="none")
                per_copy = torch.zeros(k, device=token_loss.device).index_add_(
                    0, where.nonzero()[:, 0] // labels.shape[0], token_loss)
                for i, loss in zip(chunk_ids, (per_copy / n_tokens).tolist()):
                    out[i] = loss
    finally:
        for layer in layers.values():
            layer.ablation_gate, layer.ablation_slots, layer.ablation_closed = None, None, False
        model.train(was_training)
    return [out[i] for i in range(len(configs))]


class AloraMethod(LoraMethod):
    name = "alora"
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
        if c.warmup_steps <= 0 and c.warmup_epochs <= 0:
            raise ConfigError("method.warmup_epochs", "the warm-up must be positive (warmup_epochs or warmup_steps)")
        if c.interval_steps <= 0 and c.interval_epochs <= 0:
            raise ConfigError("method.interval_epochs", "the interval must be positive (interval_epochs or interval_steps)")

    def check_model(self, model: nn.Module) -> None:
        from .targets import find_targets

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

    def attach(self, model: nn.Module, adapter_name: str = "default") -> AloraAdapter:
        self.check_config()
        c = self.cfg
        layers = self.inject(model, adapter_name, c.max_rank)
        for layer in layers.values():
            layer.add_gate(adapter_name, c.r_init)
        adapter = AloraAdapter(model, layers, c, adapter_name)
        adapter.n_per_round = self.ranks_per_round(list(layers))
        adapter.schedule_steps = self.schedule
        return adapter


def reinit_slot(layer: LoraLinear, name: str, slot: int, generator: torch.Generator) -> None:
    """A new rank: A row random (Kaiming-uniform bound, as at init), B column zero, gate open —
    the model's output is unchanged at the moment of growth."""
    A, B = layer.lora_A[name], layer.lora_B[name]
    bound = 1.0 / math.sqrt(A.shape[1])
    with torch.no_grad():
        A[slot] = (torch.rand(A.shape[1], generator=generator) * 2 - 1).mul_(bound).to(A.device, A.dtype)
        B[:, slot] = 0.0
        layer.lora_gate[name][slot] = 1.0
