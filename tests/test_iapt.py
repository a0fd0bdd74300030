"""IAPT specifics: soft tokens as extra attention positions, prompt-only pooling, the KV cache."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close_in_fp32, compose_config, run_cli, tiny_model, toy_batch
from peftrun.data import collate_train, encode_prompts
from peftrun.errors import ConfigError
from peftrun.methods import build_method
from peftrun.methods.iapt import attention_modules

PROMPTS = ["max of 3 1 4 1:", "min of 9 2 6 5 3 8:", "max 7:"]  # different lengths: padding


def attach(model_name: str = "tiny", *overrides: str, gate: float = 1.0, attention: str = "sdpa"):
    """An IAPT adapter moved off its init, with gates open (joint softmax, as P-tuning v2)."""
    cfg = compose_config("method=iapt", "method.bottleneck=16", f"model={model_name}", *overrides)
    model, tokenizer = tiny_model(model_name)
    model.config._attn_implementation = attention
    torch.manual_seed(0)
    adapter = build_method(cfg.method).attach(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapter.trainable_parameters():
            if name.endswith(".gate"):
                p.fill_(gate)
            else:
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    return model, tokenizer, adapter


def greedy(model, tokenizer, adapter, prompts, **kwargs) -> torch.Tensor:
    batch = encode_prompts(prompts, tokenizer, 64)  # left-padded
    adapter.set_prompt_mask(batch["prompt_mask"])
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id, **kwargs)
    adapter.set_prompt_mask(None)
    return out


@pytest.mark.parametrize("model_name", ["tiny", "tiny_gpt2"])
def test_greedy_with_cache_equals_without_cache(model_name):
    model, tokenizer, adapter = attach(model_name)
    with torch.no_grad():
        cached = greedy(model, tokenizer, adapter, PROMPTS, use_cache=True)
        uncached = greedy(model, tokenizer, adapter, PROMPTS, use_cache=False)
        batch = encode_prompts(PROMPTS, tokenizer, 64)
        adapter.set_prompt_mask(batch["prompt_mask"])
        adapted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with adapter.disabled():
            backbone = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(cached, uncached)
    real = batch["attention_mask"].bool()
    assert not torch.allclose(adapted[real], backbone[real], atol=1e-3), "the soft tokens must matter"


def test_beam_search_expands_the_prompt_mask():
    model, tokenizer, adapter = attach("tiny")
    with torch.no_grad():
        cached = greedy(model, tokenizer, adapter, PROMPTS, num_beams=3, use_cache=True)
        uncached = greedy(model, tokenizer, adapter, PROMPTS, num_beams=3, use_cache=False)
    assert torch.equal(cached, uncached)


def soft_tokens(model, adapter, batch) -> list[torch.Tensor]:
    adapter.set_prompt_mask(batch["prompt_mask"])
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    adapter.set_prompt_mask(None)
    return [torch.cat(layer.soft_kv, dim=-1) for layer in adapter.layers.values()]


@pytest.mark.parametrize("model_name", ["tiny", "tiny_gpt2"])
def test_targets_do_not_change_the_soft_tokens(model_name):
    model, tokenizer, adapter = attach(model_name)
    prompt = list(tokenizer("max of 3 1 4 1:")["input_ids"])

    def batch(target: str, prompt_mask=None):
        ids = prompt + list(tokenizer(target, add_special_tokens=False)["input_ids"])
        mask = prompt_mask or [1] * len(prompt) + [0] * (len(ids) - len(prompt))
        return collate_train([{"input_ids": ids, "labels": ids, "prompt_mask": mask}], tokenizer.pad_token_id)

    short, long = soft_tokens(model, adapter, batch(" 4")), soft_tokens(model, adapter, batch(" 9 9 9 9 9"))
    for a, b in zip(short, long):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # The same target counted as instruction would change them: the mask is what keeps it out.
    leaked = batch(" 9 9 9 9 9")
    leaked["prompt_mask"] = leaked["attention_mask"].clone()
    assert not torch.allclose(soft_tokens(model, adapter, leaked)[0], long[0], atol=1e-4)


@pytest.mark.parametrize("model_name", ["tiny", "tiny_gpt2"])
def test_right_padded_rows_equal_unpadded_runs(model_name):
    model, tokenizer, adapter = attach(model_name)
    features = []
    for prompt, target in zip(PROMPTS, [" 4", " 2 2 2", ""]):
        p = list(tokenizer(prompt)["input_ids"])
        t = list(tokenizer(target, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        features.append({"input_ids": p + t, "labels": p + t, "prompt_mask": [1] * len(p) + [0] * len(t)})
    batch = collate_train(features, tokenizer.pad_token_id)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max(), "the batch must hold padding"
    adapter.set_prompt_mask(batch["prompt_mask"])
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, n in enumerate(lengths.tolist()):
            adapter.set_prompt_mask(batch["prompt_mask"][i : i + 1, :n])
            alone = model(input_ids=batch["input_ids"][i : i + 1, :n]).logits
            torch.testing.assert_close(padded[i, :n], alone[0], atol=1e-5, rtol=1e-5)
    adapter.set_prompt_mask(None)


def test_eager_and_sdpa_agree():
    outputs = []
    for impl in ("sdpa", "eager"):
        model, tokenizer, adapter = attach("tiny", attention=impl)
        assert model.config._attn_implementation == "iapt_" + impl
        batch = toy_batch(tokenizer, n=4)
        adapter.set_prompt_mask(batch["prompt_mask"])
        with torch.no_grad():
            outputs.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def test_gate_zero_is_the_backbone_even_with_trained_generators():
    model, tokenizer, adapter = attach("tiny", gate=0.0)
    backbone, _ = tiny_model("tiny")
    batch = toy_batch(tokenizer)
    adapter.set_prompt_mask(batch["prompt_mask"])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(out, ref)


def test_rational_coefficients_have_their_own_learning_rate():
    _, _, adapter = attach("tiny")
    groups = adapter.param_groups(3e-3)
    assert [g["lr"] for g in groups] == [3e-3, 1e-6]
    rational = {id(p) for n, p in adapter.trainable_parameters() if ".activation." in n}
    assert {id(p) for p in groups[1]["params"]} == rational and len(rational) == 2 * 2  # 2 layers
    assert sum(len(g["params"]) for g in groups) == len(adapter.trainable_parameters())


def test_counts_by_kind():
    model, _, adapter = attach("tiny")
    d, m, n_soft, layers, heads = 64, 16, 4, 2, 4
    per_layer = {"down": d * m + m, "pooling": m * n_soft, "rational": 7 + 5, "up": m * d + d, "gate": heads}
    assert adapter.parameter_counts() == {**{k: v * layers for k, v in per_layer.items()},
                                          "total": sum(per_layer.values()) * layers}
    assert len(attention_modules(model)) == layers


def test_merge_is_refused():
    from peftrun.export import merge_into_backbone

    model, _, adapter = attach("tiny")
    assert not adapter.supports_merge
    with pytest.raises(ValueError, match="cannot be merged"):
        adapter.merge()
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_into_backbone(adapter, model)


# --------------------------------------------------------------- one attention call per layer
def loss_and_grads(model, adapter, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from peftrun.loss import labelled_loss_sum

    for _, p in adapter.trainable_parameters():
        p.grad = None
    adapter.set_prompt_mask(batch["prompt_mask"])
    loss = labelled_loss_sum(model, batch)
    loss.backward()
    adapter.set_prompt_mask(None)
    return loss.detach(), {n: p.grad.clone() for n, p in adapter.trainable_parameters()}


@pytest.mark.parametrize("gate", ["per_head", "none"])
def test_training_in_one_attention_call_equals_the_joint_attention(gate, monkeypatch):
    """Training merges the soft keys through the CPU flash kernel's log-sum-exp, one attention
    call per layer; its loss and every gradient are those of the joint attention call over
    [soft; real] keys (with the gated blend's second call over the real keys)."""
    from peftrun.methods.iapt import attention as iapt

    model, tokenizer, adapter = attach("tiny", f"method.gate={gate}", gate=0.7)
    batch = toy_batch(tokenizer, n=4)
    merges = []
    merge = iapt.merge_soft
    monkeypatch.setattr(iapt, "merge_soft", lambda *args: merges.append(1) or merge(*args))
    loss, grads = loss_and_grads(model, adapter, batch)
    assert len(merges) == model.config.num_hidden_layers, "training took the one-call path"
    monkeypatch.setattr(iapt, "mergeable", lambda *args: False)
    joint_loss, joint_grads = loss_and_grads(model, adapter, batch)
    torch.testing.assert_close(loss, joint_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == joint_grads.keys() and any(n.endswith(".gate") for n in grads) == (gate == "per_head")
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, f"{name}: a zero gradient proves nothing"
        assert_close_in_fp32(grad, joint_grads[name], msg=name)


def reference_attention(query, key, value, mask, causal, scale):
    """(out, log-sum-exp) by the softmax formulas in float64, differentiable by autograd."""
    batch, heads, q_len, dim = query.shape
    group = heads // key.shape[1]
    k, v = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scores = query @ k.mT * scale
    if causal:
        scores = scores.masked_fill(~torch.ones(q_len, key.shape[2], dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    return torch.softmax(scores, dim=-1) @ v, lse


@pytest.mark.parametrize("case", ["causal", "mask", "zero-row-gradient"])
def test_flash_kernel_with_log_sum_exp_has_the_softmax_gradients(case):
    """FlashWithLse: the CPU flash kernel's output and log-sum-exp, differentiable in both
    (the gradient through L folded into the kernel's backward), against autograd through the
    softmax formulas; a row whose output gets no gradient while its L does takes the math path."""
    from peftrun.methods.iapt.real_attention import FlashWithLse

    torch.manual_seed(0)
    query = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    key, value = torch.randn(2, 2, 6, 8, dtype=torch.float64), torch.randn(2, 2, 6, 8, dtype=torch.float64)
    mask, causal = None, case != "mask"
    if case == "mask":
        mask = torch.zeros(2, 1, 6, 6, dtype=torch.float64).masked_fill(torch.rand(2, 1, 6, 6) < 0.3, float("-inf"))
        mask[..., 0] = 0.0  # every query sees a key
    w_out, w_lse = torch.randn(2, 4, 6, 8, dtype=torch.float64), torch.randn(2, 4, 6, dtype=torch.float64)
    if case == "zero-row-gradient":
        w_out[0, 1, 2] = 0.0
    grads = []
    for fn in (lambda *a: FlashWithLse.apply(*a), reference_attention):
        q, k, v = (t.clone().requires_grad_() for t in (query, key, value))
        out, lse = fn(q, k, v, mask, causal, 0.3)
        ((out * w_out).sum() + (lse * w_lse).sum()).backward()
        grads.append((out.detach(), lse.detach(), q.grad, k.grad, v.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # the kernel's float32 softmax


def test_gate_none_is_the_papers_joint_softmax_without_gate_parameters():
    model, tokenizer, adapter = attach("tiny", "method.gate=none")
    assert not any(n.endswith(".gate") for n, _ in adapter.trainable_parameters())
    assert adapter.parameter_counts().get("gate", 0) == 0
    joint, _, gated = attach("tiny", gate=1.0)  # a gate of 1 everywhere is the joint softmax
    batch = toy_batch(tokenizer)
    for a in (adapter, gated):
        a.set_prompt_mask(batch["prompt_mask"])
    with torch.no_grad():
        ungated = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ones = joint(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ungated, ones, rtol=1e-5, atol=1e-5)


def test_gates_have_their_own_learning_rate_when_set():
    _, _, adapter = attach("tiny", "method.gate_lr=5e-2")
    groups = adapter.param_groups(3e-3)
    assert [g["lr"] for g in groups] == [3e-3, 1e-6, 5e-2]
    gates = {id(p) for n, p in adapter.trainable_parameters() if n.endswith(".gate")}
    assert {id(p) for p in groups[2]["params"]} == gates and len(gates) == 2


@pytest.mark.parametrize(
    "override, key",
    [
        ("method.bottleneck=0", "method.bottleneck"),
        ("method.gate=per_layer", "method.gate"),
        ("method.gate_lr=-1", "method.gate_lr"),
        ("method.n_soft=0", "method.n_soft"),
        ("method.rational_degrees=[7,7]", "method.rational_degrees"),
        ("method.rational_init=tanh", "method.rational_init"),
        ("method.rational_lr=-1", "method.rational_lr"),
        ("method.gate=none method.gate_lr=1e-2", "method.gate_lr"),
    ],
)
def test_bad_config_is_refused_before_weights(override, key):
    cfg = compose_config("method=iapt", *override.split())
    with pytest.raises(ConfigError) as err:
        build_method(cfg.method).check_config()
    assert err.value.key == key


def test_unsupported_attention_is_refused():
    cfg = compose_config("method=iapt")
    model, _ = tiny_model("tiny")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError) as err:
        build_method(cfg.method).attach(model)
    assert err.value.key == "model.attn_implementation"
    assert all(p.requires_grad is False for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["tiny", "tiny_gpt2"])
def test_cli_learns_the_toy_task(model_name, tmp_path):
    # The untrained backbones score 0 exact match on task=toy (tests/test_toy_learning.py).
    # trainer.lr=3e-2, 8 soft tokens: the gates start at 0 and must open before the generators
    # get gradient; at the default 3e-3 they stay nearly shut in 300 steps at this size.
    result = run_cli(f"model={model_name}", "method=iapt", "method.bottleneck=32", "method.n_soft=8", "trainer.lr=3e-2",
                     "trainer.progress=false", "trainer.save_every=0", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "iapt"
    # A low bar, measured: train loss only 4.6 -> ~3.9 (10-17 EM). Deep prompts only add key/value
    # positions to a random 2-layer backbone, a far weaker lever than LoRA's weight updates here;
    # plain P-tuning v2 (gates fixed at 1) plateaus the same way.
    assert summary["test_exact_match"] >= 5


class RecordRational:
    """Copies of the rational coefficients and of one other generator tensor after each step."""

    def __init__(self):
        self.rational, self.other = [], []

    def on_train_start(self, state):
        self.on_step_end(state)

    def on_step_end(self, state):
        adapter = state.run.adapter
        named = adapter.trainable_parameters()
        self.rational.append(torch.cat([p.detach().flatten().clone() for n, p in named if adapter.kind_of(n) == "rational"]))
        self.other.append(torch.cat([p.detach().flatten().clone() for n, p in named if adapter.kind_of(n) == "up"]))


def test_alternating_rational_update_learns_from_dev_batches_only(tmp_path):
    """rational_update=alternating, every 2 steps: step 2 ends with a dev-batch step that moves
    the coefficients; step 3, a training step only, moves the rest but not them. In joint mode
    step 3 moves them too. (Step 1 moves no generator tensor: the per-head gates open there.)"""
    from conftest import compose_config
    from peftrun.train.loop import train

    common = ("method=iapt", "method.bottleneck=8", "method.rational_lr=1e-2", "trainer.lr=1e-2",
              "trainer.max_steps=4", "trainer.warmup_steps=1", "trainer.eval_every=0", "trainer.save_every=0",
              "trainer.progress=false", "trainer.micro_batch_size=8", "task.num_train=64", "task.num_dev=16",
              "task.num_test=4")
    alternating = RecordRational()
    train(compose_config(*common, "method.rational_update=alternating", "method.rational_update_every=2",
                         "method.rational_dev_batch_size=8"), tmp_path / "alt", extra_callbacks=[alternating])
    assert not torch.equal(alternating.rational[2], alternating.rational[1])
    assert torch.equal(alternating.rational[3], alternating.rational[2])  # step 3: a training step only
    assert not torch.equal(alternating.other[3], alternating.other[2])
    joint = RecordRational()
    train(compose_config(*common), tmp_path / "joint", extra_callbacks=[joint])
    assert not torch.equal(joint.rational[3], joint.rational[2])
