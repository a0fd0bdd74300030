"""LoRA on quantized backbones (QLoRA-style NF4, and int8), on the CPU bitsandbytes backend:
the adapter trains in float32 while the quantized base weights stay put; merging is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_config, toy_batch
from peftrun.methods.lora import LoraMethod
from peftrun.models import build_model, load_tokenizer

bnb = pytest.importorskip("bitsandbytes")


def quantized(quantization: str, *overrides: str):
    """The tiny Llama built with `model.quantization=...`, with our LoRA on all linear layers."""
    cfg = compose_config(f"model.quantization={quantization}", "method=lora", "method.targets=all-linear", *overrides)
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer, device="cpu")
    adapter = LoraMethod(cfg.method).attach(model)
    return model, tokenizer, adapter


def token_loss(model, batch) -> torch.Tensor:
    """Mean cross-entropy of the next token over the labelled (non -100) positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100
    )


def base_state(adapter) -> dict[str, torch.Tensor]:
    """Snapshot of every wrapped base layer's stored weight (packed bytes for 4-bit) and its
    quantization constants."""
    out = {}
    for name, layer in adapter.layers.items():
        weight = layer.base_layer.weight
        out[name] = weight.data.clone()
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is not None:
            out[name + ".absmax"] = quant_state.absmax.clone()
    return out


def test_nf4_lora_trains_and_base_stays_frozen():
    model, tokenizer, adapter = quantized("nf4")
    layers = adapter.layers.values()
    assert len(adapter.layers) == 2 * 7  # q k v o gate up down, in each of the 2 blocks
    assert all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in layers)
    assert all(layer.base_layer.weight.__class__.__name__ == "Params4bit" for layer in layers)
    params = adapter.trainable_parameters()
    assert params and all(p.dtype == torch.float32 and p.requires_grad for _, p in params)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for _, p in params}  # nothing of the backbone trains

    batch = toy_batch(tokenizer)
    before = base_state(adapter)
    model.train()
    optimizer = torch.optim.AdamW([p for _, p in params], lr=1e-2)
    loss = token_loss(model, batch)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for name, p in params if "lora_B" in name)
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        after = token_loss(model, batch)
    assert after < loss.detach(), (loss.item(), after.item())

    for key, tensor in base_state(adapter).items():
        assert torch.equal(tensor, before[key]), key
    assert all(p.dtype == torch.float32 for _, p in params)


def test_nf4_merge_is_refused_with_a_clear_error():
    model, tokenizer, adapter = quantized("nf4")
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_B[adapter.name].normal_(std=0.1)
    batch = toy_batch(tokenizer)
    with torch.no_grad():
        expected = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    before = base_state(adapter)

    with pytest.raises(RuntimeError, match="quantiz"):
        adapter.merge()
    assert all(not layer.merged for layer in adapter.layers.values())
    for key, tensor in base_state(adapter).items():
        assert torch.equal(tensor, before[key]), key
    with torch.no_grad():
        again = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    torch.testing.assert_close(again, expected, atol=0, rtol=0)


def test_nf4_logits_match_peft():
    """PEFT's own bitsandbytes LoRA layer, with our tensors, gives our logits."""
    peft = pytest.importorskip("peft")
    model, tokenizer, adapter = quantized("nf4", "method.r=4", "method.alpha=8")
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_B[adapter.name].normal_(std=0.1)
    cfg = compose_config("model.quantization=nf4")
    backbone = build_model(cfg.model, load_tokenizer(cfg.model), device="cpu")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(backbone, config)
    peft_layers = dict(peft_model.get_base_model().named_modules())
    with torch.no_grad():
        for name, layer in adapter.layers.items():
            peft_layers[name].lora_A["default"].weight.copy_(layer.lora_A[adapter.name])
            peft_layers[name].lora_B["default"].weight.copy_(layer.lora_B[adapter.name])
    batch = toy_batch(tokenizer)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, peft_model(**inputs).logits, atol=1e-5, rtol=0)
    assert adapter.parameter_counts()["total"] == peft_model.get_nb_trainable_parameters()[0]


def test_int8_forward_and_backward():
    model, tokenizer, adapter = quantized("int8")
    assert all(isinstance(layer.base_layer, bnb.nn.Linear8bitLt) for layer in adapter.layers.values())
    params = adapter.trainable_parameters()
    assert all(p.dtype == torch.float32 and p.requires_grad for _, p in params)
    before = base_state(adapter)
    model.train()
    loss = token_loss(model, toy_batch(tokenizer))
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for name, p in params if name.endswith("lora_B")]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    for key, tensor in base_state(adapter).items():
        assert torch.equal(tensor, before[key]), key
    with pytest.raises(RuntimeError, match="quantiz"):
        adapter.merge()


def test_nf4_gradients_flow_the_same_after_an_inference_forward():
    # A dev-loss evaluation (eval mode, no gradients) between training steps must leave the
    # 4-bit layers as they were: same stored weights, same gradients to every adapter.
    model, tokenizer, adapter = quantized("nf4")
    batch = toy_batch(tokenizer)
    for _, p in adapter.trainable_parameters():
        torch.nn.init.normal_(p, std=0.02)  # B = 0 would leave A without a gradient

    def gradients() -> dict[str, torch.Tensor]:
        model.train()
        token_loss(model, batch).backward()
        grads = {name: p.grad.clone() for name, p in adapter.trainable_parameters()}
        for _, p in adapter.trainable_parameters():
            p.grad = None
        return grads

    before, state = gradients(), base_state(adapter)
    model.eval()
    with torch.no_grad():
        token_loss(model, batch)
    after = gradients()
    for key, tensor in base_state(adapter).items():
        assert torch.equal(tensor, state[key]), key
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]
