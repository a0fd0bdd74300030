"""AB-LoRA importance, the score ALoRA ranks by: from forward passes only, on one fixed batch,

    IS(r) = CE(every open rank but r) - CE(only r open in the whole network)

`ablation_losses` computes many gate configurations at once (see its docstring); the adapter's
`importance` and the allocation schedule both use it. `taylor_scores` is the cheaper first-order
estimate `method.score_estimator=taylor` selects (not the default: see its note)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...loss import keeps_logits
from ..common.blocks import decoder_blocks

Rank = tuple[str, int]  # (module name, slot)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of Transformer blocks."""
    found = decoder_blocks(model)
    if found is None:
        raise ValueError("cannot find the model's list of Transformer blocks")
    return found


def block_of(module: str, prefix: str) -> int:
    return int(module[len(prefix) + 1 :].split(".", 1)[0])


@torch.inference_mode()
def ablation_losses(adapter: Any, batch: dict[str, torch.Tensor], configs: list[tuple[str, Rank]],
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
    kept_logits = keeps_logits(model)

    def set_gates(chunk: list[tuple[str, Rank]]) -> None:
        for m, layer in layers.items():
            g = torch.stack([open_gates[m] if kind == "without" else torch.zeros_like(open_gates[m])
                             for kind, _ in chunk])
            for i, (kind, (rm, slot)) in enumerate(chunk):
                if rm == m:
                    g[i, slot] = 0.0 if kind == "without" else 1.0
            slots = torch.nonzero(g.any(0)).flatten()
            layer.ablation_gate, layer.ablation_slots, layer.ablation_closed = g[:, slots], slots, slots.numel() == 0

    def run(k: int, start_block: int, start_hidden: torch.Tensor | None, capture: dict | None = None,
            keep: torch.Tensor | None = None) -> torch.Tensor | None:
        """The model on k stacked copies of the batch from block `start_block` on; the logits at
        the positions `keep` (stacked batch x length, bool) through the model's own head and what
        it does after it (Gemma 2's soft-capping, Granite's and Cohere's logit scales)."""
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
        inputs = {"input_ids": batch["input_ids"].repeat(k, 1), "attention_mask": batch["attention_mask"].repeat(k, 1)}
        try:
            if keep is None:  # the hidden states entering each block are all we want
                model.base_model(**inputs)
                return None
            if kept_logits:
                return model(**inputs, logits_to_keep=keep).logits
            return model(**inputs).logits[keep]
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
                # The LM head only where there is a label: K stacked copies' full logits would
                # be K x batch x length x vocab, far more memory than the forward itself.
                stacked_labels = labels.repeat(k, 1)
                where = stacked_labels != -100
                logits = run(k, block, entering[kind][block], keep=F.pad(where, (0, 1), value=False))
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


# `method.score_estimator`: "exact" is the definition above; "taylor" its first-order estimate
# from two forward + backward passes of the dev batch instead of 2 x (open ranks) ablated
# forwards. A gate c_r scales rank r's output, so closing r (c_r 1 -> 0) changes the loss by about
# -dL/dc_r at the adapter, and opening r alone on the backbone (c_r 0 -> 1) by about +dL/dc_r at
# the backbone. Its agreement with the exact scores is measured by scripts/bench_alora.py: the
# second term is estimated well; the first is weak on a trained adapter, whose loss is near a
# minimum in every gate (the change there is second order), so it is an option, not the default.
SCORE_ESTIMATORS = ("exact", "taylor")


def taylor_scores(adapter: Any, batch: dict[str, torch.Tensor], ranks: list[Rank]) -> dict[Rank, float]:
    """IS(r) ~ [L(open) - dL/dc_r there] - [L(backbone) + dL/dc_r there] for each of `ranks` (the
    open ones), the gradients taken through the layers' ablation gates (one copy of the batch, its
    gates a leaf tensor per layer over the open slots: all 1, then all 0)."""
    from ...loss import labelled_loss_sum

    model = adapter.model
    was_training = model.training
    model.eval()  # as the exact score: no dropout
    slots: dict[str, list[int]] = {}
    for m, s in ranks:
        slots.setdefault(m, []).append(s)
    n_tokens = int((batch["labels"][:, 1:] != -100).sum())
    kept_logits = keeps_logits(model)
    loss_at, grad_at = {}, {}
    try:
        for kind, value in (("open", 1.0), ("backbone", 0.0)):
            gates = {}
            for m, layer in adapter.layers.items():
                device = adapter.gate(m).device
                gates[m] = torch.full((1, len(slots.get(m, []))), value, device=device, requires_grad=True)
                layer.ablation_gate, layer.ablation_closed = gates[m], m not in slots
                layer.ablation_slots = torch.tensor(slots.get(m, []), dtype=torch.long, device=device)
            with torch.enable_grad():
                loss = labelled_loss_sum(model, batch, kept_logits) / n_tokens
                # Only the gates' gradients: autograd skips the adapter weights' own.
                grads = torch.autograd.grad(loss, [gates[m] for m in slots])
            loss_at[kind], grad_at[kind] = float(loss.detach()), dict(zip(slots, grads))
    finally:
        for layer in adapter.layers.values():
            layer.ablation_gate, layer.ablation_slots, layer.ablation_closed = None, None, False
        model.train(was_training)
    scores = {}
    for m, module_slots in slots.items():
        for i, s in enumerate(module_slots):
            without = loss_at["open"] - float(grad_at["open"][m][0, i])
            alone = loss_at["backbone"] + float(grad_at["backbone"][m][0, i])
            scores[(m, s)] = without - alone
    return scores
