"""PARA: vectors from the prompt only, computed once per prompt and reused while decoding
(with the KV cache equal to without), left-padded and beam batches, refused merges, config
errors. The shared contract (step 0 = backbone, save/load, ...) is in test_method_contract.py."""

from __future__ import annotations

import pytest
import torch

from conftest import compose_config, tiny_model, toy_batch, untrained_exact_match
from peftrun.errors import ConfigError
from peftrun.generate import generate
from peftrun.methods import build_method
from peftrun.methods.para import ParaGenerator

MODELS = ["tiny", "tiny_gpt2"]
# Different lengths, so the batch is left-padded.
PROMPTS = ["max 3815=", "sort 2=", "min 90817263=", "last 55=", "sum 123="]


def attached(model_name: str, *overrides: str, scale: float = 0.5):
    cfg = compose_config("method=para", f"model={model_name}", *overrides)
    model, tokenizer = tiny_model(model_name)
    adapter = build_method(cfg.method).attach(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move off the init (up = 0), as training would, and far enough to matter
        for _, p in adapter.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model, tokenizer, adapter


def prefill_vectors(model, adapter, input_ids, attention_mask, prompt_mask) -> dict[str, torch.Tensor]:
    adapter.set_prompt_mask(prompt_mask)
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    vectors = {k: v.clone() for k, v in adapter.vectors().items()}
    adapter.set_prompt_mask(None)
    return vectors


class CountGeneratorRuns:
    def __init__(self, model):
        self.calls = 0
        self.handles = [m.register_forward_hook(self.hook) for m in model.modules() if isinstance(m, ParaGenerator)]

    def hook(self, *_):
        self.calls += 1

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("model_name", MODELS)
def test_vectors_come_from_the_prompt_only(model_name):
    model, tokenizer, adapter = attached(model_name)
    batch = toy_batch(tokenizer)
    ids, attn, prompt = batch["input_ids"], batch["attention_mask"], batch["prompt_mask"]
    reference = prefill_vectors(model, adapter, ids, attn, prompt)
    assert all(not torch.allclose(v, torch.ones_like(v)) for v in reference.values())

    # Other target tokens (teacher forcing feeds them in): the vectors must not move.
    target = (attn == 1) & (prompt == 0)
    other = torch.randint(4, len(tokenizer), ids.shape, generator=torch.Generator().manual_seed(2))
    changed_target = torch.where(target, other, ids)
    assert not torch.equal(changed_target, ids)
    for layer, v in prefill_vectors(model, adapter, changed_target, attn, prompt).items():
        torch.testing.assert_close(v, reference[layer], rtol=0, atol=1e-6)

    # Another prompt token does move them (so the check above can fail).
    changed_prompt = ids.clone()
    changed_prompt[:, 2] = (ids[:, 2] + 1 - 4) % (len(tokenizer) - 4) + 4
    moved = prefill_vectors(model, adapter, changed_prompt, attn, prompt)
    assert all((moved[k] - reference[k]).abs().max() > 1e-4 for k in reference)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("num_beams", [1, 2])
def test_generation_with_cache_equals_without(model_name, num_beams):
    model, tokenizer, adapter = attached(model_name, scale=3.0)  # large enough to change the text
    run = lambda: generate(model, tokenizer, adapter, PROMPTS, max_new_tokens=6, num_beams=num_beams)  # noqa: E731
    layers = len(adapter.generators)

    counter = CountGeneratorRuns(model)
    cached = run()
    assert counter.calls == layers, "one generator run per layer, at the prefill; decode steps reuse it"
    model.generation_config.use_cache = False
    counter.calls = 0
    uncached = run()
    counter.remove()
    model.generation_config.use_cache = True
    assert counter.calls > layers, "without a cache every step re-reads the prompt"
    assert cached == uncached
    assert any(len(text) > 0 for text in cached)
    with adapter.disabled():
        assert run() != cached, "the vectors change what is generated"


@pytest.mark.parametrize("model_name", MODELS)
def test_batched_generation_equals_one_at_a_time(model_name):
    model, tokenizer, adapter = attached(model_name, scale=3.0)
    batched = generate(model, tokenizer, adapter, PROMPTS, max_new_tokens=6)
    single = [generate(model, tokenizer, adapter, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == single


def test_decode_batch_must_match_the_prefill():
    model, tokenizer, adapter = attached("tiny")
    batch = toy_batch(tokenizer, n=4)
    adapter.set_prompt_mask(batch["prompt_mask"][:3])
    with pytest.raises(RuntimeError, match="prompt mask has 3 rows"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_forward_without_a_prompt_mask_is_refused():
    model, tokenizer, adapter = attached("tiny")
    batch = toy_batch(tokenizer, n=2)
    with pytest.raises(RuntimeError, match="set_prompt_mask"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with adapter.disabled():  # the backbone alone needs no mask
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_merge_is_refused_clearly(tmp_path):
    from peftrun.export import export_peft, merge_into_backbone

    model, _, adapter = attached("tiny")
    assert adapter.supports_merge is False
    with pytest.raises(ValueError, match="cannot be merged"):
        adapter.merge()
    with pytest.raises(ValueError, match="does not support merging"):
        merge_into_backbone(adapter, model)
    with pytest.raises(ValueError, match="no Hugging Face PEFT export"):
        export_peft(adapter, "tiny", tmp_path / "peft")


def test_two_adapters_keep_separate_generators():
    cfg = compose_config("method=para")
    model, tokenizer = tiny_model()
    first = build_method(cfg.method).attach(model, adapter_name="a")
    second = build_method(cfg.method).attach(model, adapter_name="b")
    assert set(first.state_dict()) == set(second.state_dict())
    assert not {id(p) for _, p in first.trainable_parameters()} & {id(p) for _, p in second.trainable_parameters()}
    with torch.no_grad():
        for _, p in second.trainable_parameters():
            p.fill_(0.1)
    batch = toy_batch(tokenizer, n=2)
    backbone, _ = tiny_model()
    with torch.no_grad():
        reference = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        second.set_prompt_mask(batch["prompt_mask"])
        assert not torch.allclose(model(input_ids=batch["input_ids"]).logits, reference)  # "b" is active
        second.runtime.active = "a"  # still at its init: the backbone
        assert torch.equal(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, reference)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (("method.bottleneck=0",), "method.bottleneck"),
        (("method.pooling=sum",), "method.pooling"),
        (("method.activation=swish",), "method.activation"),
        (("method.targets=[q,qkv]",), "method.targets"),
        (("method.targets=[]",), "method.targets"),
        (("method.targets=[q,q]",), "method.targets"),
        (("method.targets=[q,gate]", "model=tiny_gpt2"), "method.targets"),  # GPT-2 has no gate
    ],
)
def test_bad_config_is_refused_before_weights_load(overrides, key):
    from peftrun.models import load_tokenizer, meta_model

    cfg = compose_config("method=para", *overrides)
    method = build_method(cfg.method)
    with pytest.raises(ConfigError) as err:
        method.check_config()
        method.check_model(meta_model(cfg.model, load_tokenizer(cfg.model)))
    assert err.value.key == key


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODELS)
def test_para_learns_the_toy_task(tmp_path, model_name):
    # The untrained backbone scores 0 (test_toy_learning.py). PARA only rescales activations of
    # a random backbone, so it needs a larger lr than LoRA's 3e-3 (see README, PARA).
    from peftrun.train.loop import train

    cfg = compose_config("method=para", f"model={model_name}", "trainer.lr=3e-2", "trainer.max_steps=200",
                         "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress=false")
    assert untrained_exact_match(cfg) < 5
    summary = train(cfg, tmp_path)
    assert summary["test_exact_match"] >= 25
