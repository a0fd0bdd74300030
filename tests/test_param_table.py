"""Parameter counts on real architectures (meta device: nothing allocated, nothing downloaded)."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("param_table", ROOT / "scripts" / "param_table.py")
param_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(param_table)


def test_lora_rank8_all_linear_on_llama2_7b():
    # The ALoRA/PARA/IAPT papers' LoRA baseline: rank 8 on all seven linears, 19.99M.
    assert param_table.count("llama2_7b", "lora", ("method.r=8",))["total"] == 19_988_480


def test_lora_qv_on_gpt2_fused_attention():
    # c_attn is one fused Conv1D (768 -> 2304): r (768 + 2304) per layer, 12 layers.
    counts = param_table.count("gpt2", "lora", ("method.r=4", "method.targets=[c_attn]"))
    assert counts["total"] == 12 * 4 * (768 + 2304)


def test_tied_lora_presets_on_llama2_7b_rank8():
    # DESIGN §3: L=32, d=4096, out=q+k+v=12288; tl6 is 12.5% of lora, the paper's headline.
    expected = {"lora": 4_194_304, "tl5": 131_072, "tl6": 524_544, "vera": 393_472}
    got = {p: param_table.count("llama2_7b", "tied_lora", (f"method.preset={p}", "method.r=8"))["total"] for p in expected}
    assert got == expected
    assert got["tl6"] / got["lora"] == pytest.approx(0.125, abs=1e-4)


def test_tied_lora_rank_sweep_follows_the_formulas():
    # Every preset row at the ends of the paper's 2..128 sweep, against L (d + out) r,
    # (d + out) r, (d + out) r + L (r + out), L (r + out).
    L, d, out = 32, 4096, 12288
    ranks = (2, 128)
    rows = dict(param_table.table("llama2_7b", ["tied_lora"], ranks))
    for r in ranks:
        assert rows[f"tied_lora lora r={r} qkv"] == L * (d + out) * r
        assert rows[f"tied_lora tl5 r={r} qkv"] == (d + out) * r
        assert rows[f"tied_lora tl6 r={r} qkv"] == (d + out) * r + L * (r + out)
        assert rows[f"tied_lora vera r={r} qkv"] == L * (r + out)


def test_tied_lora_on_a_gqa_shape():
    # Qwen2.5-0.5B: 14 query heads, 2 KV heads of 64: out = 896 + 128 + 128 = 1152; 24 layers.
    total = param_table.count("qwen2_5_0_5b", "tied_lora", ("method.preset=tl6", "method.r=8"))["total"]
    assert total == (896 + 1152) * 8 + 24 * (8 + 1152)


def test_para_bottleneck12_on_llama2_7b():
    # Per layer: down r*d + self-attention query r + up (q + v + up widths)*r, no biases;
    # L=32, d=4096, r=12, widths 4096 + 4096 + 11008 = 19200:
    # 32 * (12*4096 + 12 + 19200*12) = 32 * 279,564 = 8,946,048 (the paper: about 8.9M).
    counts = param_table.count("llama2_7b", "para", ("method.bottleneck=12",))
    assert counts == {"down": 32 * 12 * 4096, "query": 32 * 12, "up": 32 * 19200 * 12, "total": 8_946_048}
    rows = dict(param_table.table("llama2_7b", ["para"], (8,)))
    assert rows["para bottleneck 12 q,v,up (mean pooling)"] == 8_946_048 - 32 * 12


def test_para_on_gpt2_fused_attention():
    # q and v are 768-wide slices of c_attn, c_fc is 3072 wide: 12 * (12*768 + 12 + 12*(768+768+3072)).
    total = param_table.count("gpt2", "para", ())["total"]
    assert total == 12 * (12 * 768 + 12 + 12 * (768 + 768 + 3072))


def test_iapt_bottleneck320_on_llama2_7b():
    # Per layer (d=4096, m=320, 4 soft tokens, 32 heads): down d*m + m = 1,311,040; pooling
    # queries m*4 = 1,280; rational (6+1) + 5 = 12; up m*d + d = 1,314,816; gate 32 (one per head).
    # 2,627,180 per layer, x 32 layers = 84,069,760.
    counts = param_table.count("llama2_7b", "iapt", ("method.bottleneck=320", "method.n_soft=4"))
    assert counts == {"down": 32 * 1_311_040, "pooling": 32 * 1_280, "rational": 32 * 12,
                      "up": 32 * 1_314_816, "gate": 32 * 32, "total": 84_069_760}
    rows = dict(param_table.table("llama2_7b", ["iapt"], (8,)))
    assert rows["iapt bottleneck 320, 4 soft tokens"] == 84_069_760


def test_alora_open_ranks_match_lora_on_llama2_7b():
    # With r_init = max_rank = 8 the pool is exactly LoRA r=8 plus one frozen gate per slot.
    assert param_table.count("llama2_7b", "alora", ("method.r_init=8", "method.max_rank=8"))["total"] == 19_988_480
