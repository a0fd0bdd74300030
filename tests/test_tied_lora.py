"""Tied-LoRA beyond the contract table: the formula on fused q|k|v (GQA slices, one computation
per layer), the flag rules, tied tensors stored once and re-tied on load, PEFT export parity,
merging into a plain backbone, in-process training of the presets, and a CLI run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, compose_config, needs_torchrun, run_cli, run_torchrun, tiny_model, toy_batch
from peftrun.errors import ConfigError
from peftrun.export import export_peft, merge_into_backbone
from peftrun.methods import build_method, load_adapter, save_adapter
from peftrun.methods.tied_lora import PRESETS, TiedLoraBlock, TiedLoraLinear

R = 4
ATOL = 1e-5


def attach(model_name: str = "tiny", *overrides: str):
    cfg = compose_config("method=tied_lora", f"method.r={R}", *overrides, f"model={model_name}")
    model, tokenizer = tiny_model(model_name)
    torch.manual_seed(0)
    return model, tokenizer, build_method(cfg.method).attach(model)


def randomize(adapter) -> None:
    """Every tensor away from its init (frozen ones too), so every factor matters."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in adapter.saved_tensors():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ------------------------------------------------------------------------------- formula
def test_fused_qkv_update_is_computed_once_and_split_gqa(monkeypatch):
    model, tokenizer, adapter = attach("tiny")
    randomize(adapter)
    attn = model.model.layers[0].self_attn
    block = attn.q_proj.tied_lora["default"]
    assert attn.k_proj.tied_lora["default"] is block and attn.v_proj.tied_lora["default"] is block
    # GQA: q 64 + k 32 + v 32 outputs share one B of 128 rows.
    assert tuple(block.B.shape) == (64 + 32 + 32, R) and tuple(block.A.shape) == (R, 64)
    x = torch.randn(2, 5, 64)
    z = block.v * (block.B @ (block.u * (x @ block.A.T))[..., None]).squeeze(-1)
    with torch.no_grad():
        for proj, (s, e) in (("q_proj", (0, 64)), ("k_proj", (64, 96)), ("v_proj", (96, 128))):
            layer = getattr(attn, proj)
            torch.testing.assert_close(layer(x), layer.base_layer(x) + z[..., s:e], atol=ATOL, rtol=0)

    calls = []
    original = TiedLoraBlock.compute
    monkeypatch.setattr(TiedLoraBlock, "compute", lambda self, x: calls.append(self) or original(self, x))
    logits(model, toy_batch(tokenizer, n=2))
    assert len(calls) == len(model.model.layers)  # once per layer, not once per projection
    assert all(b._cache is None for b in adapter.blocks.values())  # no activations held afterwards


def test_gpt2_adapts_fused_c_attn():
    model, _, adapter = attach("tiny_gpt2")
    assert sorted(adapter.layers) == [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    assert tuple(adapter.blocks[("transformer.h.0.attn", "qkv")].B.shape) == (3 * 64, R)


# ------------------------------------------------------------------------------- flags
def resolved(*overrides: str) -> dict:
    cfg = compose_config("method=tied_lora", *overrides)
    return build_method(cfg.method).check_config()


def test_presets_are_the_design_table():
    assert resolved("method.preset=tl6") == PRESETS["tl6"]
    table = {  # (A tied, trains), (B tied, trains), u trains, v trains
        "lora": ((False, True), (False, True), False, False),
        "tl5": ((True, True), (True, True), False, False),
        "tl6": ((True, True), (True, True), True, True),
        "vera": ((True, False), (True, False), True, True),
    }
    for name, (a, b, u, v) in table.items():
        f = resolved(f"method.preset={name}")
        assert ((f["tie_A"], f["train_A"]), (f["tie_B"], f["train_B"]), f["train_u"], f["train_v"]) == (a, b, u, v)


def test_a_flag_overrides_its_preset():
    # tl6 with one B per layer: B counts L times (2 layers, out 128, r 4).
    _, _, adapter = attach("tiny", "method.tie_B=false")
    assert adapter.parameter_counts()["B"] == 2 * 128 * R
    assert adapter.parameter_counts()["A"] == 64 * R
    assert json.loads(json.dumps(adapter.config_dict()))["tie_B"] is False


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (("method.preset=vera", "method.train_u=false", "method.train_v=false"), "method.train_A", "nothing trains"),
        (("method.init_v=1",), "method.init_B", "not start at the backbone"),
        (("method.preset=tl5", "method.init_v=0", "method.train_v=true"), "method.init_v", "dead"),
        (("method.train_v=false",), "method.train_v", "dead"),  # tl6's v starts at 0
        (("method.preset=tl5", "method.train_B=false"), "method.train_B", "dead"),
        (("method.preset=tl5", "method.init_u=2"), "method.init_u", "only rescales"),
        (("method.init_A=orthogonal",), "method.init_A", "kaiming"),
        (("method.preset=tl7",), "method.preset", "tl6"),
        (("method.r=0",), "method.r", "positive"),
    ],
)
def test_contradictory_flags_fail_with_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        resolved(*overrides)
    assert err.value.key == key and words in err.value.message


def test_unknown_target_fails_before_weights():
    from peftrun.models import meta_model, load_tokenizer

    cfg = compose_config("method=tied_lora", "method.targets=[qkv,nope]")
    model = meta_model(cfg.model, load_tokenizer(cfg.model))
    with pytest.raises(ConfigError, match="nope"):
        build_method(cfg.method).check_model(model)


# ------------------------------------------------------------------------------- tied tensors
def test_tied_tensors_exist_once_and_are_retied_on_load(tmp_path):
    model, tokenizer, adapter = attach("tiny")
    blocks = list(adapter.blocks.values())
    assert all(b.A is blocks[0].A and b.B is blocks[0].B for b in blocks)
    assert all(b.u is not blocks[0].u for b in blocks[1:])
    names = [n for n, _ in adapter.trainable_parameters()]
    assert names.count("qkv.A") == 1 and names.count("qkv.B") == 1
    optimizer = torch.optim.AdamW([p for _, p in adapter.trainable_parameters()])
    assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == adapter.parameter_counts()["total"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == adapter.parameter_counts()["total"]

    randomize(adapter)
    save_adapter(adapter, tmp_path / "a")
    stored = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert sum(k.endswith(".A") for k in stored) == 1  # the tied A, once
    fresh, _ = tiny_model("tiny")
    loaded = load_adapter(tmp_path / "a", fresh)
    fresh_blocks = list(loaded.blocks.values())
    assert all(b.A is fresh_blocks[0].A and b.B is fresh_blocks[0].B for b in fresh_blocks)
    torch.testing.assert_close(fresh_blocks[1].A, blocks[0].A, atol=0, rtol=0)
    batch = toy_batch(tokenizer)
    torch.testing.assert_close(logits(fresh, batch), logits(model, batch), atol=0, rtol=0)


def test_vera_keeps_its_frozen_random_matrices(tmp_path):
    _, _, adapter = attach("tiny", "method.preset=vera")
    assert adapter.parameter_counts() == {"A": 0, "B": 0, "u": 2 * R, "v": 2 * 128, "total": 2 * (R + 128)}
    save_adapter(adapter, tmp_path / "a")
    torch.manual_seed(123)  # another draw: the saved A/B must win over it
    fresh, _ = tiny_model("tiny")
    loaded = load_adapter(tmp_path / "a", fresh)
    assert torch.equal(dict(loaded.saved_tensors())["qkv.B"], dict(adapter.saved_tensors())["qkv.B"])


# ------------------------------------------------------------------------------- export / merge
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("model_name", ["tiny", "tiny_gpt2"])
def test_peft_export_loads_with_equal_logits(model_name, tmp_path):
    model, tokenizer, adapter = attach(model_name)
    randomize(adapter)
    batch = toy_batch(tokenizer)
    expected = logits(model, batch)
    folder = export_peft(adapter, f"peftrun/{model_name}", tmp_path / "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", R, R)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    members = ["q_proj", "k_proj", "v_proj"] if model_name == "tiny" else ["c_attn"]
    assert {k.split(".")[-3] for k in tensors} == set(members)  # split where the backbone splits

    backbone, _ = tiny_model(model_name)
    base = logits(backbone, batch)
    loaded = peft.PeftModel.from_pretrained(backbone, folder)
    assert not torch.allclose(expected, base, atol=1e-3)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_name", ["tiny", "tiny_gpt2"])
def test_merge_into_backbone_leaves_a_plain_model(model_name):
    model, tokenizer, adapter = attach(model_name)
    randomize(adapter)
    batch = toy_batch(tokenizer)
    expected = logits(model, batch)
    merged = merge_into_backbone(adapter, model)
    assert not any(isinstance(m, TiedLoraLinear) for m in merged.modules())
    assert not any("tied_lora" in n or "base_layer" in n for n in merged.state_dict())
    torch.testing.assert_close(logits(merged, batch), expected, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------- training
TRAIN = (
    "trainer.max_steps=6", "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress=false",
    "trainer.micro_batch_size=8", "trainer.lr=1e-2", "task.num_train=64", "task.num_dev=8", "task.num_test=8",
)


@pytest.mark.parametrize("model_name", ["tiny", "tiny_gpt2"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_train_in_process(preset, model_name, tmp_path):
    from peftrun.train.loop import train

    cfg = compose_config("method=tied_lora", f"method.preset={preset}", f"model={model_name}", *TRAIN)
    summary = train(cfg, tmp_path / "run")
    assert summary["steps"] == 6 and summary["method"] == "tied_lora"
    state = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    moved = [k for k in state if not torch.equal(state[k], torch.zeros_like(state[k])) and k.endswith((".B", ".v"))]
    assert moved, "the zero-started factor trained"
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [x["loss"] for x in lines if x["event"] == "train"]
    assert train_losses and all(map(lambda v: v == v, train_losses))


@pytest.mark.slow
def test_cli_trains_tl6(tmp_path):
    result = run_cli("method=tied_lora", *TRAIN, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tied_lora trainable parameters: 1,808" in result.stdout  # (64 + 128) 8 + 2 (8 + 128)
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["method"] == "tied_lora" and saved["config"]["preset"] == "tl6"


@pytest.mark.slow
@needs_torchrun
def test_two_processes_keep_the_tied_tensors_identical(tmp_path):
    """2 processes (gloo on CPU) train tl6; afterwards both hold the same tied A and B (moved
    from their init), equal to the saved adapter."""
    run = run_torchrun(str(ROOT / "tests" / "ddp_run.py"), "tied_lora", str(tmp_path), *TRAIN)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / f"rank{k}.safetensors")) for k in (0, 1))
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    init = load_file(str(tmp_path / "init0.safetensors"))
    assert set(rank0) == set(rank1) == set(saved) and {"qkv.A", "qkv.B"} <= set(saved)
    for key in saved:
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.equal(rank0[key], saved[key]), key
    assert not torch.equal(rank0["qkv.A"], init["qkv.A"]) and not torch.equal(rank0["qkv.B"], init["qkv.B"])
