"""One backbone, several adapters, one batch whose requests each name their adapter: for every
method, each request's output equals the same request run alone with its adapter (or the
backbone), greedy and beam search; the routing matters; unknown names are refused."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from conftest import compose_config, tiny_model
from peftrun.errors import ConfigError
from peftrun.generate import generate
from peftrun.methods import build_method
from peftrun.multitenant import Router, generate_mixed

# Per method: the overrides of each tenant. The tenants differ in size (rank, bottleneck, soft
# tokens, targets), so the per-row paths must pad and mask, not assume one shape.
TENANTS = {
    "lora": [("method.r=4",), ("method.r=2",), ("method.r=8", "method.targets=[q_proj,v_proj,c_attn]")],
    "alora": [("method.r_init=2", "method.max_rank=4")] * 3,
    "tied_lora": [("method.r=4",), ("method.r=2",), ("method.r=4", "method.preset=vera")],
    "para": [("method.bottleneck=8",), ("method.bottleneck=4", "method.targets=[k,down]"),
             ("method.bottleneck=8", "method.pooling=mean", "method.targets=[q]")],
    "iapt": [("method.bottleneck=16",), ("method.bottleneck=8", "method.n_soft=2"), ("method.bottleneck=16",)],
}
SCALE = {"lora": 0.3, "alora": 0.3, "tied_lora": 0.2, "para": 3.0, "iapt": 0.3}
PROMPTS = ["max 3815=", "min 42=", "sort 9071=", "max 5=", "sum 1234=", "min 777="]
NAMES = ["a", "b", None, "c", "a", "b"]


@functools.lru_cache(maxsize=None)
def method_config(*overrides: str):
    return compose_config(*overrides).method  # composing is the slow part of attaching a tiny adapter


def attach(model, model_name: str, method: str, names=("a", "b", "c"), seed: int = 0) -> dict:
    """Adapters of `method` moved off their init (IAPT's gates open), far enough to matter."""
    adapters = {}
    for i, (name, overrides) in enumerate(zip(names, TENANTS[method])):
        cfg = method_config(f"method={method}", f"model={model_name}", *overrides)
        torch.manual_seed(seed + i)
        adapter = build_method(cfg).attach(model, adapter_name=name)
        with torch.no_grad():
            for pname, p in adapter.trainable_parameters():
                if pname.endswith(".gate"):
                    p.fill_(1.0)
                else:
                    p.add_(torch.randn_like(p) * SCALE[method])
        adapters[name] = adapter
    return adapters


def run_alone(model, tokenizer, adapters: dict, name, prompt: str, **kwargs) -> str:
    """One request on its own: its adapter active, every other method's adapters off."""
    with contextlib.ExitStack() as stack:
        families: dict = {}
        for a in adapters.values():
            families.setdefault(a.family, a)
        owner = adapters.get(name)
        if owner is not None:
            owner.activate()
        for family in families.values():
            if owner is None or family.family != owner.family:
                stack.enter_context(family.disabled())
        return generate(model, tokenizer, owner, [prompt], **kwargs)[0]


CASES = [(m, "tiny", 1) for m in TENANTS] + [(m, "tiny_gpt2", 1) for m in TENANTS] + [
    (m, "tiny", 2) for m in ("lora", "para", "iapt")]


@pytest.mark.slow
@pytest.mark.parametrize("method,model_name,num_beams", CASES)
def test_mixed_batch_equals_each_request_alone(method, model_name, num_beams):
    model, tokenizer = tiny_model(model_name)
    adapters = attach(model, model_name, method)
    kwargs = dict(max_new_tokens=5, num_beams=num_beams)
    mixed = generate_mixed(model, tokenizer, adapters["a"], list(zip(PROMPTS, NAMES)), **kwargs)
    alone = [run_alone(model, tokenizer, adapters, n, p, **kwargs) for p, n in zip(PROMPTS, NAMES)]
    assert mixed == alone
    everyone_on_a = generate_mixed(model, tokenizer, adapters["a"], [(p, "a") for p in PROMPTS], **kwargs)
    assert everyone_on_a != mixed, "the routing matters: the tenants' adapters differ"


@pytest.mark.parametrize("method", list(TENANTS))
def test_unknown_tenant_is_refused(method):
    model, tokenizer = tiny_model("tiny")
    adapters = attach(model, "tiny", method, names=("a",))
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        generate_mixed(model, tokenizer, adapters["a"], [("max 1=", "a"), ("max 1=", "zz")], max_new_tokens=2)


@pytest.mark.parametrize("method", list(TENANTS))
def test_disabled_is_the_backbone_even_while_routing(method):
    from peftrun.data import encode_prompts

    model, tokenizer = tiny_model("tiny")
    adapters = attach(model, "tiny", method, names=("a", "b"))
    batch = encode_prompts(PROMPTS[:2], tokenizer, 64)
    backbone, _ = tiny_model("tiny")
    with torch.no_grad(), adapters["a"].routing(["a", "b"]):
        adapters["a"].set_prompt_mask(batch["prompt_mask"])
        routed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with adapters["b"].disabled():
            off = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        adapters["a"].set_prompt_mask(None)
        reference = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(off, reference)
    assert not torch.allclose(routed, reference, atol=1e-4)


def test_a_batch_must_be_routed_row_by_row():
    model, tokenizer = tiny_model("tiny")
    adapters = attach(model, "tiny", "lora", names=("a", "b"))
    with adapters["a"].routing(["a", "b"]), pytest.raises(ValueError, match="2 request adapters for a batch of 3"):
        generate(model, tokenizer, adapters["a"], ["max 1=", "max 2=", "max 3="], max_new_tokens=2)


def test_merged_adapters_cannot_be_routed():
    model, tokenizer = tiny_model("tiny")
    adapters = attach(model, "tiny", "lora", names=("a", "b"))
    adapters["b"].merge()
    with pytest.raises(ValueError, match="unmerge them before routing"):
        generate_mixed(model, tokenizer, adapters["a"], [("max 1=", "a")], max_new_tokens=2)


@pytest.mark.slow
def test_adapters_of_several_methods_share_one_batch():
    model, tokenizer = tiny_model("tiny")
    adapters = {}
    # IAPT first: LoRA's all-linear must leave IAPT's generator layers alone.
    for seed, (method, name) in enumerate([("iapt", "i"), ("lora", "l"), ("alora", "al"), ("para", "p"), ("para", "p2")]):
        adapters.update(attach(model, "tiny", method, names=(name,), seed=10 * seed))
    with pytest.raises(ConfigError, match="already holds a LoraLinear adapter, which tied_lora cannot share"):
        attach(model, "tiny", "tied_lora", names=("t",))
    names = ["p", "l", None, "i", "al", "p2"]
    mixed = generate_mixed(model, tokenizer, list(adapters.values()), list(zip(PROMPTS, names)), max_new_tokens=5)
    alone = [run_alone(model, tokenizer, adapters, n, p, max_new_tokens=5) for p, n in zip(PROMPTS, names)]
    assert mixed == alone
    assert len(set(mixed)) > 3, "the adapters change the outputs"
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        generate_mixed(model, tokenizer, Router(adapters.values()), [("max 1=", "zz")], max_new_tokens=2)


@pytest.mark.parametrize("path", ["flash", "lse"])
def test_iapt_decode_merge_equals_the_joint_attention(path, monkeypatch):
    """IAPT's decode steps merge the backbone's attention with the soft tokens' through the
    log-sum-exp; that must be the joint softmax the prefill computes with a second call."""
    from transformers import DynamicCache

    from peftrun.data import encode_prompts
    from peftrun.methods.iapt import attention as iapt

    model, tokenizer = tiny_model("tiny")
    adapters = attach(model, "tiny", "iapt")
    if path == "lse":  # the portable path: L from one q.K product
        monkeypatch.setattr(iapt, "attention_with_lse", lambda *args: None)
    batch = encode_prompts(PROMPTS, tokenizer, 64)

    def decode_logits() -> torch.Tensor:
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), adapters["a"].routing(NAMES):
            adapters["a"].set_prompt_mask(batch["prompt_mask"])
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], cache=cache)
            mask = torch.cat([batch["attention_mask"], torch.ones(len(PROMPTS), 1, dtype=torch.long)], dim=1)
            logits = model(input_ids=torch.full((len(PROMPTS), 1), 7), attention_mask=mask, cache=cache).logits
        adapters["a"].set_prompt_mask(None)
        return logits

    merges = []
    merge = iapt.merge_soft
    monkeypatch.setattr(iapt, "merge_soft", lambda *args: merges.append(1) or merge(*args))
    merged = decode_logits()
    # The flash kernel gives the prefill its log-sum-exp too: one call per layer there as well.
    calls = (2 if path == "flash" else 1) * model.config.num_hidden_layers
    assert len(merges) == calls, "the decode step (and with the flash kernel the prefill) took the merged path"
    monkeypatch.setattr(iapt, "mergeable", lambda *args: False)
    joint = decode_logits()
    torch.testing.assert_close(merged, joint, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged, decode_logits_backbone(model, batch), atol=1e-3), "the soft tokens matter"


def decode_logits_backbone(model, batch) -> torch.Tensor:
    backbone, _ = tiny_model("tiny")
    with torch.no_grad():
        out = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=True)
        mask = torch.cat([batch["attention_mask"], torch.ones(len(batch["input_ids"]), 1, dtype=torch.long)], dim=1)
        return backbone(input_ids=torch.full((len(batch["input_ids"]), 1), 7), attention_mask=mask,
                        cache=out.past_key_values).logits


def test_a_mixed_batch_shares_the_rank_product_of_layers_reading_one_input(monkeypatch):
    """q/k/v and gate/up take their per-row rank products from one batched product each (4 per
    decoder layer instead of 7), and the logits are those of every layer computing its own."""
    from peftrun.data import encode_prompts
    from peftrun.methods.lora import input_groups, layer as lora_layer

    model, tokenizer = tiny_model("tiny")
    adapters = attach(model, "tiny", "lora", names=("a", "b"))  # r=4 and r=2, every linear
    batch = encode_prompts(PROMPTS, tokenizer, 64)
    calls = []
    product = input_groups.per_row_product
    counted = lambda A, x: calls.append(A.shape[1]) or product(A, x)  # noqa: E731
    for module in (input_groups, lora_layer):
        monkeypatch.setattr(module, "per_row_product", counted)

    def routed_logits(names=("a", "b", None, "b", "a", None)) -> torch.Tensor:
        with torch.no_grad(), adapters["a"].routing(list(names)):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    shared = routed_logits()
    layers = model.config.num_hidden_layers
    assert sorted(calls) == sorted([12, 4, 8, 4] * layers)  # q+k+v, o, gate+up, down at the largest rank, 4
    calls.clear()
    for layer in adapters["a"].layers.values():
        monkeypatch.setattr(layer, "input_group", None)
    alone = routed_logits()
    assert calls == [4] * 7 * layers
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(shared, routed_logits(("b", "a", None, "a", "b", None)), atol=1e-3), "the routing matters"


@pytest.mark.parametrize("method", ["lora", "alora"])
def test_a_mixed_batch_sees_an_adapter_as_it_is_now(method):
    """Each layer keeps a tenant's (A, s B) between batches: a change in place (new weights, a
    rank closed) reaches the next batch, which then equals one that builds everything afresh."""
    from peftrun.data import encode_prompts

    model, tokenizer = tiny_model("tiny")
    adapters = attach(model, "tiny", method, names=("a", "b"))
    batch = encode_prompts(PROMPTS, tokenizer, 64)
    names = ["a", "b", None, "b", "a", None]

    def routed_logits() -> torch.Tensor:
        with torch.no_grad(), adapters["a"].routing(names):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    before = routed_logits()
    layers = adapters["b"].layers.values()
    with torch.no_grad():
        for layer in layers:
            layer.lora_B["b"].mul_(2.0)
            if method == "alora":
                layer.lora_gate["b"][0] = 0.0
    after = routed_logits()
    for layer in layers:
        layer._pairs.clear()
    torch.testing.assert_close(after, routed_logits(), rtol=0, atol=0)
    torch.testing.assert_close(after[[0, 2, 4, 5]], before[[0, 2, 4, 5]], rtol=1e-5, atol=1e-5)  # a's rows, the backbone's
    assert not torch.allclose(after[[1, 3]], before[[1, 3]], atol=1e-3)


@pytest.mark.parametrize("method", ["lora", "alora"])
def test_inference_accumulates_the_frozen_product_into_the_update(method, monkeypatch):
    """Where autograd records nothing, a LoRA layer on a plain linear computes its update first
    and the frozen GEMM adds into it (WrapperLayer.frozen_into), for one adapter and for a mixed
    batch; the logits are those of adding the update to the frozen output, and with gradients
    on, or a linear with a bias, the update is added afterwards as before."""
    from peftrun.data import encode_prompts
    from peftrun.methods.common.wrapper import WrapperLayer

    model, tokenizer = tiny_model("tiny")
    adapters = attach(model, "tiny", method, names=("a", "b"))
    batch = encode_prompts(PROMPTS, tokenizer, 64)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    calls, allowed = [], {"update first": True}
    frozen_into, update_first = WrapperLayer.frozen_into, WrapperLayer.update_first
    monkeypatch.setattr(WrapperLayer, "frozen_into",
                        lambda self, u, x: calls.append(u.dim()) or frozen_into(self, u, x))
    monkeypatch.setattr(WrapperLayer, "update_first",
                        lambda self, x: allowed["update first"] and update_first(self, x))

    def logits(names, first: bool, grad: bool = False) -> torch.Tensor:
        allowed["update first"] = first
        calls.clear()
        with torch.set_grad_enabled(grad), adapters["a"].routing(names):
            return model(**inputs).logits.detach()

    layers = len(adapters["a"].layers)
    for names, update_dim in ((["b"] * len(PROMPTS), 2), (["a", "b", None, "b", "a", None], 3)):
        first = logits(names, first=True)
        assert calls == [update_dim] * layers  # every adapted linear took the update-first path
        torch.testing.assert_close(first, logits(names, first=False), rtol=1e-5, atol=1e-5)
        assert not calls
    logits(["b"] * len(PROMPTS), first=True, grad=True)
    assert not calls, "with gradients on, the update is added to the frozen output"

    layer = next(iter(adapters["a"].layers.values()))
    layer.base_layer.bias = torch.nn.Parameter(torch.zeros(layer.out_features), requires_grad=False)
    with torch.no_grad():
        assert not layer.update_first(torch.zeros(1, layer.in_features))
