"""The contract every method meets, as one table of cases run over every method.

A new method joins by adding a row to CASES; each row names the method config overrides and
the tiny backbone it runs on.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_close_in_fp32, compose_config, tiny_model, toy_batch
from peftrun.methods import build_method, load_adapter, save_adapter
from peftrun.loss import keeps_logits, labelled_loss_sum, token_loss_sum


@dataclass
class Case:
    id: str
    overrides: tuple[str, ...]
    model: str = "tiny"


CASES = [
    Case("lora", ("method=lora", "method.r=4", "method.alpha=8")),
    Case("lora-qv", ("method=lora", "method.targets=[q_proj,v_proj]", "method.dropout=0.1")),
    Case("lora-regex-rslora", ("method=lora", r"method.targets=.*\.mlp\..*", "method.use_rslora=true")),
    Case("lora-gpt2", ("method=lora", "method.r=4"), model="tiny_gpt2"),
    Case("para", ("method=para",)),
    Case("para-gpt2", ("method=para",), model="tiny_gpt2"),
    Case("para-max-qkv-down", ("method=para", "method.pooling=max", "method.targets=[q,k,v,down]", "method.bottleneck=4")),
    Case("para-last-k-gpt2", ("method=para", "method.pooling=last", "method.targets=[k,o,up]"), model="tiny_gpt2"),
    Case("tied_lora-tl6", ("method=tied_lora", "method.preset=tl6", "method.r=4")),
    Case("tied_lora-tl5", ("method=tied_lora", "method.preset=tl5", "method.r=4")),
    Case("tied_lora-vera", ("method=tied_lora", "method.preset=vera", "method.r=4")),
    Case("tied_lora-lora", ("method=tied_lora", "method.preset=lora", "method.r=4")),
    Case("tied_lora-tl6-gpt2", ("method=tied_lora", "method.preset=tl6", "method.r=4"), model="tiny_gpt2"),
    Case("tied_lora-tl5-gpt2", ("method=tied_lora", "method.preset=tl5", "method.r=4"), model="tiny_gpt2"),
    Case("tied_lora-vera-gpt2", ("method=tied_lora", "method.preset=vera", "method.r=4"), model="tiny_gpt2"),
    Case("tied_lora-lora-gpt2", ("method=tied_lora", "method.preset=lora", "method.r=4"), model="tiny_gpt2"),
    Case("tied_lora-tl6-qkv-o-up", ("method=tied_lora", "method.targets=[qkv,o_proj,up_proj]", "method.dropout=0.1")),
    Case("alora", ("method=alora", "method.r_init=4", "method.max_rank=6")),
    Case("alora-gpt2", ("method=alora", "method.r_init=2", "method.max_rank=3", "method.dropout=0.1"), model="tiny_gpt2"),
    Case("iapt", ("method=iapt", "method.bottleneck=16")),
    Case("iapt-gpt2", ("method=iapt", "method.bottleneck=16"), model="tiny_gpt2"),
    Case("iapt-silu54-2tok", ("method=iapt", "method.bottleneck=8", "method.n_soft=2",
                              "method.rational_init=silu", "method.rational_degrees=[5,4]")),
]


def attach(case: Case):
    cfg = compose_config(*case.overrides, f"model={case.model}")
    model, tokenizer = tiny_model(case.model)
    torch.manual_seed(0)
    adapter = build_method(cfg.method).attach(model)
    return cfg, model, tokenizer, adapter


def logits(model, adapter, batch) -> torch.Tensor:
    model.eval()
    adapter.set_prompt_mask(batch["prompt_mask"])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    adapter.set_prompt_mask(None)
    return out


def perturb(adapter, scale: float = 0.05) -> None:
    """Move every trainable tensor off its init, as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in adapter.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request) -> Case:
    return request.param


def test_injection_and_counts(case):
    cfg, model, _, adapter = attach(case)
    trainable = [p for p in model.parameters() if p.requires_grad]
    owned = [p for _, p in adapter.trainable_parameters()]
    assert {id(p) for p in trainable} == {id(p) for p in owned}, "the adapter owns every trainable tensor"
    counts = adapter.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in owned) == sum(v for k, v in counts.items() if k != "total")
    if cfg.method.name == "lora":
        from peftrun.methods.common.targets import linear_features

        names = adapter.config_dict()["target_modules"]
        expected = sum(cfg.method.r * sum(linear_features(model.get_submodule(n))) for n in names)
        assert counts["total"] == expected
        assert "lm_head" not in " ".join(names)


def test_zero_init_equals_backbone(case):
    _, model, tokenizer, adapter = attach(case)
    backbone, _ = tiny_model(case.model)
    batch = toy_batch(tokenizer)
    with torch.no_grad():
        reference = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(logits(model, adapter, batch), reference)


def test_disabled_equals_backbone(case):
    _, model, tokenizer, adapter = attach(case)
    perturb(adapter)
    backbone, _ = tiny_model(case.model)
    batch = toy_batch(tokenizer)
    with torch.no_grad():
        reference = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(logits(model, adapter, batch), reference)
    with adapter.disabled():
        assert torch.equal(logits(model, adapter, batch), reference)


def test_one_step_lowers_loss(case):
    _, model, tokenizer, adapter = attach(case)
    batch = toy_batch(tokenizer, n=16)
    optimizer = torch.optim.AdamW([p for _, p in adapter.trainable_parameters()], lr=1e-2)

    def loss() -> torch.Tensor:
        adapter.set_prompt_mask(batch["prompt_mask"])
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_loss_sum(out, batch["labels"]) / (batch["labels"][:, 1:] != -100).sum()

    model.eval()  # no dropout: the comparison is of the same function before and after
    before = loss()
    before.backward()
    assert all(p.grad is not None for _, p in adapter.trainable_parameters())
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after < before


def test_labelled_logits_loss_equals_full_logits_loss(case):
    """The loop applies the LM head only where a label is predicted: the loss and every
    gradient are those of the full logits."""
    _, model, tokenizer, adapter = attach(case)
    perturb(adapter)
    batch = toy_batch(tokenizer, n=8)
    assert keeps_logits(model)
    model.eval()
    adapter.set_prompt_mask(batch["prompt_mask"])
    results = []
    for kept in (False, True):
        loss = labelled_loss_sum(model, batch, kept)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in adapter.trainable_parameters()}))
        model.zero_grad(set_to_none=True)
    adapter.set_prompt_mask(None)
    (full, full_grads), (kept, kept_grads) = results
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-5)
    assert kept_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        assert_close_in_fp32(kept_grads[name], grad, msg=name)


def test_save_load_round_trip(case, tmp_path):
    _, model, tokenizer, adapter = attach(case)
    perturb(adapter)
    batch = toy_batch(tokenizer)
    expected = logits(model, adapter, batch)
    save_adapter(adapter, tmp_path / "adapter")
    assert not list(tmp_path.glob(".tmp-*")), "no temporary folder is left behind"
    fresh, _ = tiny_model(case.model)
    loaded = load_adapter(tmp_path / "adapter", fresh)
    assert torch.equal(logits(fresh, loaded, batch), expected)


def test_state_dict_is_safetensors_clean(case, tmp_path):
    _, _, _, adapter = attach(case)
    state = adapter.state_dict()
    assert state and all(t.is_contiguous() for t in state.values())
    save_file(state, str(tmp_path / "x.safetensors"))  # refuses shared storage


def test_merge_equals_unmerged(case):
    _, model, tokenizer, adapter = attach(case)
    if not adapter.supports_merge:
        pytest.skip(f"{adapter.method} is not linear: nothing to merge")
    perturb(adapter)
    batch = toy_batch(tokenizer)
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    unmerged = logits(model, adapter, batch)
    with adapter.disabled():
        backbone = logits(model, adapter, batch)
    adapter.merge()
    torch.testing.assert_close(logits(model, adapter, batch), unmerged, atol=1e-5, rtol=1e-5)
    with adapter.disabled():  # a merged adapter is taken out of the weights while disabled
        torch.testing.assert_close(logits(model, adapter, batch), backbone, atol=1e-5, rtol=1e-5)
    adapter.unmerge()
    for name, p in model.named_parameters():
        if name in weights_before:
            torch.testing.assert_close(p, weights_before[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, adapter, batch), unmerged, atol=1e-5, rtol=1e-5)
