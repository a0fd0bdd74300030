"""Every method on every decoder family users fine-tune: tiny random models built from
transformers' own config classes (2 layers, hidden 32, vocabulary 128, fixed seeds), one test per
(family, method) cell running the contract checks on one model build:

zero start (adapted logits = the backbone's), one training step changes the outputs, the loss with
the LM head only at labelled positions equals the full-logits loss, greedy generation with the KV
cache equals generation without, save/load gives equal logits, merged equals unmerged (linear
methods), the PEFT export loads in PEFT with equal logits (LoRA family), ALoRA's fast importance
equals its definition, and PARA scales exactly the query and value columns the attention uses.
A family whose config class this transformers lacks is skipped with the reason."""

from __future__ import annotations

import functools
import sys

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from conftest import compose_config
from peftrun.loss import labelled_loss_sum
from peftrun.methods import build_method, load_adapter, save_adapter

pytestmark = [
    pytest.mark.slow,
    # PEFT warns about rank/alpha patterns of parameter targets, and applies them (tested below).
    pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning"),
]

VOCAB = 128
IDS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
GQA = dict(SMALL, num_key_value_heads=2)
MOE = dict(GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
TWO_KINDS = dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4)

# family -> (config class, its fields)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", GQA),
    "qwen2": ("Qwen2Config", GQA),
    "qwen3": ("Qwen3Config", dict(GQA, head_dim=8)),
    "mistral": ("MistralConfig", GQA),
    "gemma": ("GemmaConfig", dict(SMALL, num_key_value_heads=1, head_dim=8)),
    "gemma2": ("Gemma2Config", dict(GQA, head_dim=8, final_logit_softcapping=3.0, attn_logit_softcapping=5.0,
                                    **TWO_KINDS)),
    "gemma3": ("Gemma3TextConfig", dict(GQA, head_dim=8, **TWO_KINDS)),
    "phi3": ("Phi3Config", GQA),
    "phi": ("PhiConfig", SMALL),
    "gpt_neox": ("GPTNeoXConfig", SMALL),
    "falcon": ("FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=32)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_inner=64, n_layer=2, n_head=4)),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(n_embd=32, n_inner=64, n_layer=2, n_head=4, multi_query=True)),
    "stablelm": ("StableLmConfig", GQA),
    "olmo2": ("Olmo2Config", GQA),
    "granite": ("GraniteConfig", dict(GQA, logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5,
                                      attention_multiplier=0.3)),
    "mixtral": ("MixtralConfig", dict(GQA, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(MOE, shared_expert_intermediate_size=32)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(MOE, head_dim=8)),
    "starcoder2": ("Starcoder2Config", GQA),
    "cohere": ("CohereConfig", dict(GQA, logit_scale=0.5, use_qk_norm=True)),
    "bloom": ("BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4)),
    "gptj": ("GPTJConfig", dict(n_embd=32, n_inner=64, n_layer=2, n_head=4, rotary_dim=4)),
    "gpt_oss": ("GptOssConfig", dict(GQA, intermediate_size=32, head_dim=8, num_local_experts=4,
                                     num_experts_per_tok=2, **TWO_KINDS)),
    "deepseek_v3": ("DeepseekV3Config", dict(SMALL, num_key_value_heads=4, moe_intermediate_size=16,
                                             n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                             first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16,
                                             q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)),
    "smollm3": ("SmolLM3Config", GQA),
}
# Other layouts of a fused q|k|v, for the methods that read it (PARA, IAPT, Tied-LoRA's qkv).
VARIANTS: dict[str, tuple[str, dict]] = {
    "falcon40b_grouped": ("FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               new_decoder_architecture=True, num_kv_heads=2)),
    "falcon_interleaved": ("FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                multi_query=False)),
    "gpt_bigcode_mha": ("GPTBigCodeConfig", dict(n_embd=32, n_inner=64, n_layer=2, n_head=4, multi_query=False)),
}
FAMILIES_AND_VARIANTS = {**FAMILIES, **VARIANTS}
MOE_FAMILIES = {"mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3"}

METHODS: dict[str, tuple[str, ...]] = {
    "lora": ("method=lora", "method.r=2"),
    "alora": ("method=alora", "method.r_init=1", "method.max_rank=2"),
    "tied_lora": ("method=tied_lora", "method.preset=tl6", "method.r=2"),
    "para": ("method=para", "method.bottleneck=4"),
    "iapt": ("method=iapt", "method.bottleneck=8", "method.n_soft=2"),
}
PEFT_METHODS = {"lora", "alora", "tied_lora"}


def build(family: str) -> torch.nn.Module:
    cls_name, fields = FAMILIES_AND_VARIANTS[family]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cls(**IDS, **fields))
    model.eval().requires_grad_(False)
    return model


@functools.lru_cache(maxsize=None)
def method_config(method: str, family: str):
    overrides = METHODS[method]
    if method == "para" and family in MOE_FAMILIES:
        overrides += ("method.targets=[q,v]",)  # no dense up projection to scale
    if method == "tied_lora" and family in MOE_FAMILIES:
        overrides += ("method.targets=[qkv,experts]",)  # the expert weights too
    return compose_config(*overrides).method


def batch() -> dict[str, torch.Tensor]:
    """Two rows, the second right-padded; the first 4 tokens are the prompt, the rest the target."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    prompt = torch.zeros_like(ids)
    prompt[:, :4] = 1
    labels = ids.masked_fill((prompt == 1) | (mask == 0), -100)
    return {"input_ids": ids, "attention_mask": mask, "prompt_mask": prompt, "labels": labels}


def logits(model, adapter, b) -> torch.Tensor:
    if adapter is not None:
        adapter.set_prompt_mask(b["prompt_mask"])
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def perturb(adapter, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in adapter.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def greedy(model, adapter, use_cache: bool) -> torch.Tensor:
    prompt = torch.tensor([[5, 9, 17, 33, 65, 7], [11, 12, 13, 14, 15, 16]])
    adapter.set_prompt_mask(torch.ones_like(prompt))
    with torch.no_grad():
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                              min_new_tokens=4, do_sample=False, use_cache=use_cache, pad_token_id=0)


CELLS = [(f, m) for f in FAMILIES for m in METHODS]
CELLS += [(f, m) for f in VARIANTS for m in ("tied_lora", "para", "iapt")]


@pytest.mark.parametrize(("family", "method"), CELLS, ids=[f"{f}-{m}" for f, m in CELLS])
def test_cell(family, method, tmp_path):
    model = build(family)
    b = batch()
    backbone = logits(model, None, b)
    torch.manual_seed(0)
    adapter = build_method(method_config(method, family)).attach(model)
    assert torch.equal(logits(model, adapter, b), backbone), "zero start: the adapted model is the backbone"
    if family in MOE_FAMILIES and method in PEFT_METHODS:  # every expert weight is adapted, no router
        experts = {n for n, p in model.named_parameters() if p.dim() == 3 and not p.requires_grad}
        assert {n.replace(".base_layer", "") for n in experts} == {n for n in adapter.layers if ".experts." in n}
        assert not any(n.endswith(("gate", "router", "shared_expert_gate")) for n in adapter.layers)

    # One training step changes the outputs; every trainable tensor gets a gradient.
    params = [p for _, p in adapter.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    adapter.set_prompt_mask(b["prompt_mask"])
    labelled_loss_sum(model, b).backward()
    assert all(p.grad is not None for p in params)
    optimizer.step()
    assert not torch.allclose(logits(model, adapter, b), backbone)

    perturb(adapter)
    # The LM head only at labelled positions: the same loss as with full logits.
    adapter.set_prompt_mask(b["prompt_mask"])
    with torch.no_grad():
        kept, full = labelled_loss_sum(model, b, True), labelled_loss_sum(model, b, False)
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-5)

    assert torch.equal(greedy(model, adapter, True), greedy(model, adapter, False)), "cache == no cache"

    expected = logits(model, adapter, b)
    save_adapter(adapter, tmp_path / "adapter")
    assert torch.equal(logits(build(family), None, b), backbone)  # builds are reproducible
    fresh = build(family)
    torch.testing.assert_close(logits(fresh, load_adapter(tmp_path / "adapter", fresh), b), expected,
                               rtol=0, atol=0)

    if adapter.supports_merge:
        adapter.merge()
        # fp32 rounding only, amplified on Gemma's sqrt(hidden)-scaled states (~40 against logits ~0.4)
        torch.testing.assert_close(logits(model, adapter, b), expected, rtol=1e-4, atol=1e-4)
        adapter.unmerge()
    if method in PEFT_METHODS:
        check_peft_export(family, adapter, expected, b, tmp_path)
    if method == "alora":
        fast, naive = adapter.importance(b, ablations_per_forward=8), adapter.importance_naive(b)
        assert fast.keys() == naive.keys()
        for rank, score in naive.items():
            assert fast[rank] == pytest.approx(score, abs=1e-5), rank
    if method == "para":
        check_para_columns(model, adapter, b)


def check_peft_export(family, adapter, expected, b, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    from peftrun.export import export_peft

    export_peft(adapter, "unused", tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(build(family), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, None, b), expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ PARA: the columns it scales
def check_para_columns(model, adapter, b) -> None:
    """With PARA's vectors forced to 2 on the query entries and 4 on the value entries, the values
    the attention receives are 4 times the backbone's and its keys unchanged; its queries twice the
    backbone's (unchanged where a query norm follows the projection)."""
    q_w, v_w = attention_width(model, "q"), attention_width(model, "v")
    assert list(adapter.cfg.targets)[:2] == ["q", "v"]
    generators = list(adapter.generators.values())
    with adapter.disabled():
        plain = capture_qkv(model, adapter, b)
    for i, has_q_norm in enumerate(query_norms(model)):  # one layer at a time: its input is the backbone's
        for j, gen in enumerate(generators):
            segments = [s for segs in gen.segments[adapter.name].values() for s in segs]
            assert sum(s.end - s.start for s in segments if s.offset < q_w) == q_w
            entries = torch.ones(sum(s.end - s.start for s in segments))
            if i == j:
                entries[:q_w], entries[q_w : q_w + v_w] = 2.0, 4.0
            gen.forward = lambda name, hidden, mask, examples=None, e=entries: e.expand(hidden.shape[0], -1)
        try:
            q, k, v = capture_qkv(model, adapter, b)[i]
        finally:
            for gen in generators:
                del gen.forward
        q0, k0, v0 = plain[i]
        torch.testing.assert_close(v, 4 * v0)
        torch.testing.assert_close(k, k0)
        if has_q_norm:  # a query norm follows: 2q and q normalize to the same direction
            unit = torch.nn.functional.normalize
            torch.testing.assert_close(unit(q, dim=-1), unit(q0, dim=-1), rtol=1e-4, atol=1e-4)
        else:
            torch.testing.assert_close(q, 2 * q0, rtol=1e-4, atol=1e-4)


def attention_width(model, role: str) -> int:
    from peftrun.methods.common.layouts import heads

    h = heads(model.config)
    if hasattr(model.config, "kv_lora_rank"):  # DeepSeek: q heads of nope+rope, v heads of v_head_dim
        c = model.config
        return h.num_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim if role == "q" else c.v_head_dim)
    return (h.num_heads if role == "q" else h.num_kv_heads) * h.head_dim


def query_norms(model) -> list[bool]:
    from peftrun.methods.common.blocks import decoder_blocks

    _, blocks = decoder_blocks(model)
    return [any(n.endswith(("q_norm", "q_layernorm")) for n, _ in block.named_modules()) for block in blocks]


def capture_qkv(model, adapter, b) -> list[tuple[torch.Tensor, ...]]:
    """(query, key, value) as each layer's attention receives them (Bloom: from its fused projection)."""
    seen: list[tuple[torch.Tensor, ...]] = []
    impl = model.config._attn_implementation
    if type(model).__name__.startswith("Bloom"):
        hooks = [m.query_key_value.register_forward_hook(
            lambda mod, args, out, attn=m: seen.append(tuple(t.clone() for t in attn._reshape(out))))
            for m in model.modules() if type(m).__name__ == "BloomAttention"]
    else:
        original = ALL_ATTENTION_FUNCTIONS[impl] if impl != "eager" else None

        def capture(module, query, key, value, mask, **kwargs):
            seen.append((query.clone(), key.clone(), value.clone()))
            if original is not None:
                return original(module, query, key, value, mask, **kwargs)
            eager = sys.modules[type(module).__module__].eager_attention_forward
            return eager(module, query, key, value, mask, **kwargs)

        AttentionInterface.register(f"capture_{impl}", capture)
        AttentionMaskInterface.register(f"capture_{impl}", ALL_MASK_ATTENTION_FUNCTIONS[impl])
        model.config._attn_implementation, hooks = f"capture_{impl}", []
    try:
        logits(model, adapter, b)
    finally:
        model.config._attn_implementation = impl
        for h in hooks:
            h.remove()
    return seen


# ------------------------------------------------------------------ what the matrix does not show
@pytest.mark.parametrize("family", ["qwen3", "olmo2", "gemma3", "cohere"])
def test_iapt_soft_keys_get_the_key_norm_of_real_keys(family):
    """Qwen3, Gemma 3 and Cohere normalize each key head, OLMo2 the whole key: soft keys too."""
    model = build(family)
    adapter = build_method(method_config("iapt", family)).attach(model)
    perturb(adapter)
    attn = model.model.layers[0].self_attn
    soft = []
    hook = attn.iapt.generators[adapter.name].register_forward_hook(lambda m, a, out: soft.append(out))
    logits(model, adapter, batch())
    hook.remove()
    keys = attn.k_proj(soft[0])
    if family == "olmo2":
        expected = attn.k_norm(keys).unflatten(-1, (-1, 8))
    else:
        expected = attn.k_norm(keys.unflatten(-1, (-1, 8)))
    torch.testing.assert_close(attn.iapt.soft_kv[0], expected.transpose(1, 2))
    assert not torch.allclose(attn.iapt.soft_kv[0], keys.unflatten(-1, (-1, 8)).transpose(1, 2))


def test_para_refusal_names_the_targets_that_work():
    from peftrun.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        build_method(compose_config(*METHODS["para"]).method).attach(build("mixtral"))
    assert err.value.key == "method.targets"
    assert "mixture of experts" in err.value.message and "method.targets=[q,v]" in err.value.message


@pytest.mark.parametrize("family", ["gemma2", "bloom", "gpt_oss"])
def test_models_without_sdpa_are_told_to_use_eager(family):
    from peftrun.errors import ConfigError
    from peftrun.models import _attn_errors

    cls_name, fields = FAMILIES[family]
    with pytest.raises(ConfigError) as err, _attn_errors():
        AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**IDS, **fields), attn_implementation="sdpa")
    assert err.value.key == "model.attn_implementation"
    assert err.value.message.endswith("try model.attn_implementation=eager")
    model = build(family)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ConfigError) as err:
        build_method(method_config("iapt", family)).attach(model)
    assert err.value.message.endswith("set model.attn_implementation=eager")


@pytest.mark.parametrize("method", ["lora", "alora", "tied_lora"])
def test_mixed_tenants_get_their_own_expert_updates(method):
    """A batch whose rows name different adapters (or none) on Mixtral's expert weights: each row's
    logits are those of the row run alone with its adapter."""
    model = build("mixtral")
    adapters = {}
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        adapters[name] = build_method(method_config(method, "mixtral")).attach(model, adapter_name=name)
        perturb(adapters[name], scale=0.2 + 0.1 * i)
    b = batch()
    ids = torch.cat([b["input_ids"], b["input_ids"][:1]])
    mask = torch.cat([b["attention_mask"], b["attention_mask"][:1]])
    names = ["a", None, "b"]
    with adapters["a"].routing(names), torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask).logits
    for row, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with adapters["a"].disabled():
                    alone = model(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1]).logits
            else:
                adapters[name].activate()
                alone = model(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1]).logits
        torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed[0], mixed[2])


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_alora_export_keeps_uneven_ranks(family, tmp_path):
    """After allocation rounds modules (and experts) hold different ranks: PEFT loads them all,
    dense MLPs beside experts and stacked expert weights included."""
    peft = pytest.importorskip("peft")
    from peftrun.export import export_peft

    model = build(family)
    cfg = compose_config("method=alora", "method.r_init=2", "method.max_rank=3").method
    torch.manual_seed(0)
    adapter = build_method(cfg).attach(model)
    perturb(adapter)
    with torch.no_grad():
        for i, m in enumerate(adapter.layers):
            gate = adapter.gate(m)
            gate[i % gate.numel()] = 0.0  # one slot closed, another opened: ranks 1 to 3 per module/expert
            gate[(i + 2) % gate.numel()] = 1.0
    b = batch()
    expected = logits(model, adapter, b)
    export_peft(adapter, "unused", tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(build(family), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, None, b), expected, rtol=1e-4, atol=1e-4)
