"""Parameter counts on real architectures (meta device: nothing allocated, nothing downloaded)."""

from __future__ import annotations

import importlib.util

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
