"""IAPT's alternating update of the rational activations (the option the authors' group uses):
the rational coefficients learn from dev batches only, one optimizer step on a dev batch after
every `rational_update_every` training steps; training batches update everything else.

The coefficients stay in the run's optimizer (their own param group, lr `rational_lr`), so their
Adam moments are checkpointed with the rest; which dev examples a step uses is a function of the
step, so a resumed run repeats the same updates."""

from __future__ import annotations

import torch

from ...data import collate_train
from ...loss import keeps_logits, label_tokens, labelled_loss_sum


class AlternatingRationalUpdate:
    def __init__(self, adapter):
        self.adapter = adapter
        self.every = adapter.cfg.rational_update_every
        self.batch_size = adapter.cfg.rational_dev_batch_size
        self.on_dev = False
        self.hooks = []

    def rational(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.adapter.trainable_parameters() if self.adapter.kind_of(n) == "rational"]

    def on_train_start(self, state) -> None:
        # Gradients of training batches never reach the coefficients: dropped once accumulated,
        # so the optimizer skips them (a parameter without a gradient is not stepped).
        def drop_unless_dev(param: torch.Tensor) -> None:
            if not self.on_dev:
                param.grad = None

        self.hooks = [p.register_post_accumulate_grad_hook(drop_unless_dev) for p in self.rational()]

    def on_train_end(self, state) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def dev_batch(self, state) -> dict[str, torch.Tensor]:
        features = state.run.dev_features
        start = (state.step // self.every - 1) * self.batch_size
        chosen = [features[(start + i) % len(features)] for i in range(min(self.batch_size, len(features)))]
        batch = collate_train(chosen, state.run.tokenizer.pad_token_id)
        return {k: v.to(state.run.accelerator.device) for k, v in batch.items()}

    def on_step_end(self, state) -> None:
        if state.step % self.every:
            return
        run = state.run
        # Every process takes the same dev batch with the same parameters, so the unwrapped
        # model gives every process the same update without a gradient all-reduce.
        model = run.accelerator.unwrap_model(run.model)
        batch = self.dev_batch(state)
        optimizer = run.optimizer
        optimizer.zero_grad(set_to_none=True)
        self.on_dev = True
        try:
            self.adapter.set_prompt_mask(batch["prompt_mask"])
            with run.accelerator.autocast():
                loss = labelled_loss_sum(model, batch, keeps_logits(model)) / max(1, label_tokens(batch))
            loss.backward()
        finally:
            self.on_dev = False
            self.adapter.set_prompt_mask(None)
        rational = {id(p) for p in self.rational()}
        for _, p in self.adapter.trainable_parameters():
            if id(p) not in rational:
                p.grad = None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
