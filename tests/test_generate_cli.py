"""`peftrun-generate`: rebuild the backbone of saved runs, load their adapters under names,
serve a mixed batch of requests; refuse bad input in one line (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import call_main, compose_config, tiny_model
from peftrun.generate import generate
from peftrun.methods import build_method, load_adapter, save_adapter
from peftrun.serve import main

PROMPTS = ["max 3815=", "min 42=", "sort 9071=", "max 5="]


def make_run(folder: Path, method: str, model_name: str = "tiny", seed: int = 0, *overrides: str) -> Path:
    """A run folder as `peftrun` leaves it (config.yaml, adapter/), with a random adapter far
    enough from its init to change the outputs."""
    cfg = compose_config(f"method={method}", f"model={model_name}", *overrides)
    model, _ = tiny_model(model_name)
    torch.manual_seed(seed)
    adapter = build_method(cfg.method).attach(model)
    with torch.no_grad():
        for name, p in adapter.trainable_parameters():
            p.copy_(torch.ones_like(p)) if name.endswith(".gate") else p.add_(torch.randn_like(p) * {"para": 3.0}.get(method, 0.3))
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    save_adapter(adapter, folder / "adapter", {"base_model": cfg.model.name})
    return folder


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    return call_main(main, argv, capsys)


@pytest.mark.slow
def test_serves_a_mixed_batch_of_saved_adapters(tmp_path, capsys):
    runs = {"default": make_run(tmp_path / "lora", "lora"),
            "p": make_run(tmp_path / "para", "para", "tiny", 1, "method.bottleneck=8"),
            "i": make_run(tmp_path / "iapt", "iapt", "tiny", 2, "method.bottleneck=16")}
    requests = [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "adapter": "p"},
                {"prompt": PROMPTS[2], "adapter": None}, {"prompt": PROMPTS[3], "adapter": "i"},
                {"prompt": PROMPTS[1], "adapter": "default"}]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    code, out, err = cli([runs["default"], "--adapter", f"p={runs['p']}", "--adapter", f"i={runs['i'] / 'adapter'}",
                          "--prompts-file", tmp_path / "requests.jsonl", "--max-new-tokens", 5,
                          "--batch-size", 4, "--output", tmp_path / "out" / "completions.jsonl"], capsys)
    assert (code, out, err) == (0, "", "")
    rows = [json.loads(line) for line in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["adapter"]) for r in rows] == [
        (r["prompt"], r.get("adapter", "default")) for r in requests]
    # Each request alone, on a backbone that holds its adapter only.
    expected = []
    for r in rows:
        model, tokenizer = tiny_model("tiny")
        adapter = load_adapter(runs[r["adapter"]] / "adapter", model) if r["adapter"] else None
        expected += generate(model, tokenizer, adapter, [r["prompt"]], max_new_tokens=5)
    assert [r["completion"] for r in rows] == expected
    assert len(set(expected[:4])) > 2, "the adapters change the outputs"

    code, out, _ = cli([runs["default"], "--prompt", PROMPTS[0], "--max-new-tokens", 5], capsys)
    assert code == 0 and json.loads(out) == {**rows[0], "adapter": "default"}


@pytest.mark.parametrize("case, words", [
    ("different backbone", "was trained on another backbone"),
    ("unknown adapter", "request 2 names adapter 'zz'"),
    ("lora with tied_lora", "lora and tied_lora adapters cannot share one backbone"),
    ("not an adapter", "holds no saved adapter"),
    ("bad spec", "expected NAME=DIR"),
])
def test_refusals_are_one_line(case, words, tmp_path, capsys):
    run = make_run(tmp_path / "a", "lora")
    argv = {
        "different backbone": [run, "--adapter", f"g={make_run(tmp_path / 'g', 'lora', 'tiny_gpt2')}", "--prompt", "x"],
        "unknown adapter": [run, "--prompts-file", tmp_path / "r.jsonl"],
        "lora with tied_lora": [run, "--adapter", f"t={make_run(tmp_path / 't', 'tied_lora')}", "--prompt", "x"],
        "not an adapter": [tmp_path, "--prompt", "x"],
        "bad spec": [run, "--adapter", str(run), "--prompt", "x"],
    }[case]
    (tmp_path / "r.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b", "adapter": "zz"}\n')
    code, out, err = cli(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("peftrun-generate: error: adapter: ") and err.count("\n") == 1, err
    assert words in err


@pytest.mark.slow
def test_console_script_refuses_a_missing_folder(tmp_path):
    script = Path(sys.executable).with_name("peftrun-generate")
    out = subprocess.run([str(script), str(tmp_path / "nope"), "--prompt", "x"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"peftrun-generate: error: adapter: {tmp_path / 'nope'} does not exist; give a run " \
                         "folder (outputs/RUN) or a saved adapter folder\n"
