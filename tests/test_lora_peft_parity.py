"""Our LoRA against Hugging Face PEFT's: same tensors give the same logits, the same trainable
parameter count; the PEFT-format export loads into PEFT; merging gives a plain backbone."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import compose_config, tiny_model, toy_batch
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
