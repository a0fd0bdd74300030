"""Backbones and tokenizers, offline: built models only (a local folder stands in for the Hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer
from transformers.pytorch_utils import Conv1D

from peftrun.config import ModelConfig
from peftrun.errors import ConfigError
from peftrun.model_checks import validate_model_config
from peftrun.models import (
    build_model,
    load_tokenizer,
    meta_model,
    model_config,
    offline_tokenizer,
    output_head_names,
)

CONF = Path(__file__).resolve().parents[1] / "peftrun" / "conf"
TEXT = "Q: max of 3, 1 and 4?\n  A: 4 .\t(done) ~`{x}[y]|\\ 'q' \"z\" ; 10% #1 @ ^_^ <tag>"


def model_cfg(name: str, **overrides):
    """peftrun/conf/model/<name>.yaml over the schema, as Hydra would compose it (defaults list dropped)."""
    data = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    data.pop("defaults")
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), data, overrides)


@pytest.fixture(scope="module")
def tok():
    return offline_tokenizer()


def batch(tok, texts=(TEXT, "short")):
    return tok(list(texts), padding=True, return_tensors="pt")


# ----------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_bos(tok):
    ids = tok(TEXT)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) == len(TEXT) + 1  # one token per character, plus BOS
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == ids[1:]
    assert tok.decode(tok("a\n\nb  c")["input_ids"], skip_special_tokens=True) == "a\n\nb  c"
    assert tok.pad_token_id == 0 and None not in (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id)
    assert tok("é")["input_ids"] == [tok.bos_token_id, tok.unk_token_id]


def test_tokenizer_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert len(again) == len(tok)
    assert again(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert again.decode(again(TEXT)["input_ids"], skip_special_tokens=True) == TEXT
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )


def test_load_tokenizer(tmp_path, tok):
    assert load_tokenizer(model_cfg("tiny"))(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    with pytest.raises(ConfigError) as err:
        load_tokenizer(model_cfg("gpt2", name_or_path=str(tmp_path / "missing")))
    assert err.value.key == "model.name_or_path"


# ---------------------------------------------------------------------------------- built models
@pytest.mark.parametrize("name", ["tiny", "tiny_gpt2"])
def test_built_model_is_deterministic_and_frozen(name, tok):
    cfg = model_cfg(name)
    first, second = build_model(cfg, tok), build_model(cfg, tok)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other_seed = build_model(model_cfg(name, build={"seed": 1}), tok)
    embeddings = first.get_input_embeddings().weight
    assert not torch.equal(embeddings, other_seed.get_input_embeddings().weight)

    assert not first.training and not any(p.requires_grad for p in first.parameters())
    assert first.config.use_cache and first.config.vocab_size == len(tok)
    inputs = batch(tok)
    with torch.no_grad():
        logits = first(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(tok)) and torch.isfinite(logits).all()
    assert output_head_names(first) == {"lm_head"}


def test_tiny_llama_has_grouped_query_attention(tok):
    model = build_model(model_cfg("tiny"), tok)
    attn = model.model.layers[0].self_attn
    assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4
    assert attn.k_proj.out_features == attn.q_proj.out_features // 2


def test_tiny_gpt2_uses_conv1d(tok):
    model = build_model(model_cfg("tiny_gpt2"), tok)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    assert model.config.n_inner == 256


def test_dtype_is_a_cast_of_the_float32_weights(tok):
    full = build_model(model_cfg("tiny"), tok)
    half = build_model(model_cfg("tiny", dtype="bfloat16"), tok)
    assert half.dtype == torch.bfloat16 and half.config.dtype == torch.bfloat16
    for key, value in half.state_dict().items():
        assert torch.equal(full.state_dict()[key].to(torch.bfloat16), value)


def test_gradient_checkpointing_lets_gradients_reach_an_adapter(tok):
    model = build_model(model_cfg("tiny", gradient_checkpointing=True), tok)
    assert model.is_activation_checkpointing
    model.train()
    # A stand-in adapter: a trainable scale on the first layer's query projection output.
    scale = torch.nn.Parameter(torch.ones(model.config.hidden_size))
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, out: out * scale)
    inputs = batch(tok)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["tiny", "tiny_gpt2"])
def test_meta_model_matches_without_storage(name, tok):
    cfg = model_cfg(name)
    meta = meta_model(cfg, tok)
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    real = build_model(cfg, tok)
    assert [n for n, _ in meta.named_modules()] == [n for n, _ in real.named_modules()]
    assert {type(m) for m in meta.modules()} == {type(m) for m in real.modules()}
    assert output_head_names(meta) == {"lm_head"}


def test_local_folder_loads_like_the_hub(tok, tmp_path):
    built = build_model(model_cfg("tiny"), tok)
    built.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = model_cfg("tiny", build=None, name_or_path=str(tmp_path))
    loaded = build_model(cfg, load_tokenizer(cfg))
    assert not any(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in built.state_dict().items())
    assert model_config(cfg, tok).num_key_value_heads == 2
    assert [n for n, _ in meta_model(cfg, tok).named_modules()] == [n for n, _ in loaded.named_modules()]


# ---------------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("name", ["tiny", "tiny_gpt2"])
def test_nf4_runs_on_cpu(name, tok):
    import bitsandbytes as bnb

    model = build_model(model_cfg(name, quantization="nf4"), tok)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    # Llama: q k v o gate up down; GPT-2: its Conv1D c_attn c_proj c_fc c_proj become Linear4bit.
    per_layer = {"tiny": 7, "tiny_gpt2": 4}[name]
    assert len(layers) == per_layer * model.config.num_hidden_layers
    assert output_head_names(model) == {"lm_head"}
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # the head stays unquantized
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        logits = model(**batch(tok)).logits
    assert torch.isfinite(logits).all()


def test_int8_runs_on_cpu(tok):
    import bitsandbytes as bnb

    model = build_model(model_cfg("tiny", quantization="int8"), tok)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    with torch.no_grad():
        assert torch.isfinite(model(**batch(tok)).logits).all()


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "name, overrides, key",
    [
        ("tiny", {"name_or_path": "gpt2"}, "model.build"),
        ("gpt2", {"name_or_path": None}, "model.name_or_path"),
        ("tiny", {"dtype": "float64"}, "model.dtype"),
        ("tiny", {"quantization": "int4"}, "model.quantization"),
        ("tiny", {"bnb_4bit_compute_dtype": "int8"}, "model.bnb_4bit_compute_dtype"),
        ("tiny", {"build": {"arch": "mistral"}}, "model.build.arch"),
        ("tiny", {"build": {"num_layers": 0}}, "model.build.num_layers"),
        ("tiny", {"build": {"hidden_size": -8}}, "model.build.hidden_size"),
        ("tiny", {"build": {"hidden_size": 66}}, "model.build.num_heads"),
        ("tiny", {"build": {"num_kv_heads": 3}}, "model.build.num_kv_heads"),
        ("tiny_gpt2", {"build": {"num_kv_heads": 2}}, "model.build.num_kv_heads"),
    ],
)
def test_validate_refuses_bad_values(name, overrides, key):
    with pytest.raises(ConfigError) as err:
        validate_model_config(model_cfg(name, **overrides))
    assert err.value.key == key


def test_validate_accepts_shipped_configs(tmp_path):
    for path in sorted((CONF / "model").glob("*.yaml")):
        # Folders made here (tiny_pretrained: scripts/pretrain_tiny.py; smollm2_135m: make smollm2) are
        # absent from a fresh clone.
        local = {"name_or_path": str(tmp_path)} if path.stem in ("tiny_pretrained", "smollm2_135m") else {}
        validate_model_config(model_cfg(path.stem, **local))


def test_quantization_without_bitsandbytes(monkeypatch):
    import peftrun.model_checks as model_checks

    monkeypatch.setattr(model_checks, "_bitsandbytes_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        validate_model_config(model_cfg("tiny", quantization="nf4"))
    assert err.value.key == "model.quantization" and "pip install bitsandbytes" in err.value.message
    validate_model_config(model_cfg("tiny"))  # not needed without quantization


def test_unavailable_attention_is_a_config_error(tok):
    with pytest.raises(ConfigError) as err:
        build_model(model_cfg("tiny", attn_implementation="no_such_attention"), tok)
    assert err.value.key == "model.attn_implementation"
