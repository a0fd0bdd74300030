"""One backbone, several LoRA adapters, one batch whose requests each name their adapter: every
request's output equals the same request run alone with its adapter."""

from __future__ import annotations

import pytest
import torch

from conftest import compose_config, tiny_model
from peftrun.generate import generate, generate_mixed
from peftrun.methods import build_method


def tenants(model_name: str):
    model, tokenizer = tiny_model(model_name)
    adapters = {}
    for i, name in enumerate(["a", "b", "c"]):
        cfg = compose_config("method=lora", "method.r=4", f"model={model_name}")
        torch.manual_seed(i)
        adapter = build_method(cfg.method).attach(model, adapter_name=name)
        with torch.no_grad():
            for _, p in adapter.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.3)  # adapters that change the output
        adapters[name] = adapter
    return model, tokenizer, adapters


@pytest.mark.parametrize("model_name,num_beams", [("tiny", 1), ("tiny_gpt2", 1), ("tiny", 2)])
def test_mixed_batch_equals_each_request_alone(model_name, num_beams):
    model, tokenizer, adapters = tenants(model_name)
    model.eval()
    prompts = ["max 3815=", "min 42=", "sort 9071=", "max 5=", "sum 1234=", "min 777="]
    names = ["a", "b", None, "c", "a", "b"]
    mixed = generate_mixed(model, tokenizer, adapters["a"], list(zip(prompts, names)),
                           max_new_tokens=6, num_beams=num_beams)
    alone = []
    for prompt, name in zip(prompts, names):
        if name is None:
            with adapters["a"].disabled():
                alone += generate(model, tokenizer, None, [prompt], max_new_tokens=6, num_beams=num_beams)
        else:
            adapters[name].activate()
            alone += generate(model, tokenizer, None, [prompt], max_new_tokens=6, num_beams=num_beams)
    assert mixed == alone
    everyone_on_a = generate_mixed(model, tokenizer, adapters["a"], [(p, "a") for p in prompts],
                                   max_new_tokens=6, num_beams=num_beams)
    assert everyone_on_a != mixed, "the routing matters: the tenants' adapters differ"


def test_unknown_tenant_is_refused():
    model, tokenizer, adapters = tenants("tiny")
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        generate_mixed(model, tokenizer, adapters["a"], [("max 1=", "zz")], max_new_tokens=2)
