"""Our LoRA against Hugging Face PEFT's: same tensors give the same logits, the same trainable
parameter count; the PEFT-format export loads into PEFT; merging gives a plain backbone."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import assert_close_in_fp32, compose_config, tiny_model, toy_batch
from peftrun.export import export_peft, merge_into_backbone
from peftrun.methods.lora import LoraLinear, LoraMethod

peft = pytest.importorskip("peft")
from peft.tuners.lora import LoraLayer  # noqa: E402

ATOL = 1e-5
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]

# (model, our method.targets override, PEFT's target_modules, use_rslora)
CASES = {
    "llama-all-linear": ("tiny", "all-linear", "all-linear", False),
    "llama-q-v": ("tiny", "[q_proj,v_proj]", ["q_proj", "v_proj"], False),
    "llama-rslora": ("tiny", "all-linear", "all-linear", True),
    "gpt2-conv1d": ("tiny_gpt2", "[c_attn,c_proj,c_fc]", GPT2_TARGETS, False),
}


def ours(model_name: str, targets: str, rslora: bool = False):
    """A tiny backbone with our LoRA (r=4, alpha=8) whose B is random, so the update is not zero."""
    model, tokenizer = tiny_model(model_name)
    cfg = compose_config(
        "method=lora", "method.r=4", "method.alpha=8", f"method.targets={targets}", f"method.use_rslora={rslora}"
    )
    adapter = LoraMethod(cfg.method).attach(model)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_B[adapter.name].normal_(std=0.1)
    return model, tokenizer, adapter


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def peft_lora_layers(peft_model) -> dict[str, LoraLayer]:
    base = peft_model.get_base_model()
    return {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_counts_match_peft(case):
    model_name, targets, peft_targets, rslora = CASES[case]
    model, tokenizer, adapter = ours(model_name, targets, rslora)
    batch = toy_batch(tokenizer)

    backbone, _ = tiny_model(model_name)
    base_logits = logits(backbone, batch)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=peft_targets,
        fan_in_fan_out=model_name == "tiny_gpt2",
        use_rslora=rslora,
        task_type="CAUSAL_LM",
    )
    peft_model = peft.get_peft_model(backbone, config)

    layers = peft_lora_layers(peft_model)
    assert set(layers) == set(adapter.layers)  # the same modules are wrapped
    with torch.no_grad():
        for name, layer in adapter.layers.items():
            assert layers[name].scaling["default"] == pytest.approx(layer.scaling[adapter.name])
            layers[name].lora_A["default"].weight.copy_(layer.lora_A[adapter.name])
            layers[name].lora_B["default"].weight.copy_(layer.lora_B[adapter.name])

    ours_logits = logits(model, batch)
    assert not torch.allclose(ours_logits, base_logits, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(ours_logits, logits(peft_model, batch), atol=ATOL, rtol=0)
    assert adapter.parameter_counts()["total"] == peft_model.get_nb_trainable_parameters()[0]
    assert sum(p.numel() for _, p in adapter.trainable_parameters()) == adapter.parameter_counts()["total"]


# ------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("case", ["llama-q-v", "llama-rslora", "gpt2-conv1d"])
def test_export_loads_into_peft(case, tmp_path):
    model_name, targets, _, rslora = CASES[case]
    model, tokenizer, adapter = ours(model_name, targets, rslora)
    batch = toy_batch(tokenizer)
    folder = export_peft(adapter, f"peftrun/{model_name}", tmp_path / "peft")

    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, rslora)
    assert config["fan_in_fan_out"] == (model_name == "tiny_gpt2")
    assert config["base_model_name_or_path"] == f"peftrun/{model_name}"
    assert sorted(config["target_modules"]) == sorted(adapter.layers)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert set(tensors) == {
        f"base_model.model.{mod}.lora_{kind}.weight" for mod in adapter.layers for kind in "AB"
    }
    assert not list(tmp_path.glob(".tmp-*"))

    backbone, _ = tiny_model(model_name)
    loaded = peft.PeftModel.from_pretrained(backbone, folder)
    assert set(peft_lora_layers(loaded)) == set(adapter.layers)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=ATOL, rtol=0)


def test_export_refuses_a_method_without_peft_state(tmp_path):
    from peftrun.methods import Adapter

    class Other(Adapter):  # the base class's defaults: no PEFT form, not mergeable
        method = "other"

        def __init__(self):
            super().__init__(torch.nn.Linear(2, 2), {}, "default")

    with pytest.raises(ValueError, match="'other' has no Hugging Face PEFT export"):
        export_peft(Other(), "x", tmp_path / "peft")
    with pytest.raises(ValueError, match="'other' does not support merging"):
        merge_into_backbone(Other(), torch.nn.Linear(2, 2))
    assert not (tmp_path / "peft").exists()


# -------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("case", ["llama-all-linear", "gpt2-conv1d"])
def test_merge_into_backbone(case, tmp_path):
    model_name, targets, _, rslora = CASES[case]
    model, tokenizer, adapter = ours(model_name, targets, rslora)
    batch = toy_batch(tokenizer)
    expected = logits(model, batch)

    merged = merge_into_backbone(adapter, model)
    assert merged is model
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert not any("lora" in n or "base_layer" in n for n in merged.state_dict())
    torch.testing.assert_close(logits(merged, batch), expected, atol=ATOL, rtol=0)

    # A plain checkpoint: transformers alone reloads it, with the same outputs.
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(reloaded.eval(), batch), expected, atol=ATOL, rtol=0)


def test_merge_refuses_a_layer_with_another_adapter():
    model, _, adapter = ours("tiny", "[q_proj,v_proj]")
    cfg = compose_config("method.r=2", "method.targets=[q_proj]")
    LoraMethod(cfg.method).attach(model, adapter_name="second")
    with pytest.raises(ValueError, match="second"):
        merge_into_backbone(adapter, model)
    assert all(not layer.merged for layer in adapter.layers.values())  # nothing was changed


# ------------------------------------------------------------------ the fused and shared products
@pytest.mark.parametrize("case", ["llama-all-linear", "gpt2-conv1d"])
def test_loss_and_gradients_match_peft(case):
    """One fused product-and-add per layer (in place into an nn.Linear's output), one rank
    product per group of layers reading the same input (q/k/v, gate/up): the loss and every A
    and B gradient are PEFT's, within fp32 rounding."""
    from peftrun.loss import labelled_loss_sum

    model_name, targets, peft_targets, rslora = CASES[case]
    model, tokenizer, adapter = ours(model_name, targets, rslora)
    backbone, _ = tiny_model(model_name)
    peft_model = peft.get_peft_model(backbone, peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=peft_targets, fan_in_fan_out=model_name == "tiny_gpt2",
        task_type="CAUSAL_LM"))
    layers = peft_lora_layers(peft_model)
    with torch.no_grad():
        for name, layer in adapter.layers.items():
            layers[name].lora_A["default"].weight.copy_(layer.lora_A[adapter.name])
            layers[name].lora_B["default"].weight.copy_(layer.lora_B[adapter.name])
    batch = toy_batch(tokenizer)
    adapter.set_prompt_mask(batch["prompt_mask"])
    out_of_place = []
    addmm = torch.addmm
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "addmm", lambda *a, **k: out_of_place.append(1) or addmm(*a, **k))
        loss = labelled_loss_sum(model, batch)
    if model_name == "tiny":  # nn.Linear: the update goes into the frozen output in place, under autograd too
        assert not out_of_place
    loss.backward()
    peft_loss = labelled_loss_sum(peft_model, batch)
    peft_loss.backward()
    torch.testing.assert_close(loss, peft_loss, rtol=1e-5, atol=1e-5)
    for name, layer in adapter.layers.items():
        for ours_p, theirs in ((layer.lora_A[adapter.name], layers[name].lora_A["default"].weight),
                               (layer.lora_B[adapter.name], layers[name].lora_B["default"].weight)):
            assert ours_p.grad.abs().sum() > 0
            assert_close_in_fp32(ours_p.grad, theirs.grad, msg=name)


def test_layers_reading_one_input_share_one_rank_product(monkeypatch):
    """On Llama, q/k/v share one rank product and gate/up another: 4 products per decoder layer
    (qkv, o, gate+up, down) instead of 7; with dropout in training each layer draws its own mask."""
    from peftrun.methods.common import wrapper
    from peftrun.methods.lora import input_groups, layer as lora_layer

    calls = []
    product = wrapper.rank_product
    counted = lambda A, x: calls.append(A.shape[0]) or product(A, x)  # noqa: E731
    for module in (input_groups, lora_layer):
        monkeypatch.setattr(module, "rank_product", counted)
    model, tokenizer, adapter = ours("tiny", "all-linear")
    batch = toy_batch(tokenizer)
    logits(model, batch)
    layers = model.config.num_hidden_layers
    assert sorted(calls) == sorted([12, 4, 8, 4] * layers)  # ranks: q+k+v, o, gate+up, down (r=4)
    calls.clear()
    dropout_model, _ = tiny_model("tiny")
    cfg = compose_config("method=lora", "method.r=4", "method.targets=all-linear", "method.dropout=0.1")
    LoraMethod(cfg.method).attach(dropout_model).model.train()
    dropout_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert calls == [4] * 7 * layers
