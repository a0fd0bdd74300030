"""Tools around the papers' tasks: the tokenized-data cache, the preview, rescoring a run's
predictions (peftrun.evaluate), and an end-to-end `peftrun task=squad` on local files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, compose_config, run_cli
from peftrun.data import tokenize_examples
from peftrun.models import offline_tokenizer
from peftrun.tasks import build_task
from peftrun.token_cache import tokenize_cached
from test_hub_tasks import squad, write_jsonl


@pytest.fixture
def squad_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [squad(i) for i in range(40)])
    dev = write_jsonl(tmp_path / "dev.jsonl", [squad(100 + i) for i in range(8)])
    return f"task.data_files={{train:{train},validation:{dev}}}"


def squad_examples(files, *overrides):
    return build_task(compose_config("task=squad", files, *overrides).task).examples("train")


def test_cache_hits_the_same_and_misses_a_new_template_or_tokenizer(squad_files, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTRUN_CACHE", str(tmp_path / "cache"))
    tok = offline_tokenizer()
    examples = squad_examples(squad_files)

    feats, report, hit = tokenize_cached(examples, tok, 256, min_examples=0)
    assert hit is False and len(list((tmp_path / "cache").rglob("*.safetensors"))) == 1
    again, report2, hit = tokenize_cached(examples, tok, 256, min_examples=0)
    assert hit is True and again == feats and report2 == report
    assert feats == tokenize_examples(examples, tok, 256)[0]  # the cache changes nothing

    other_template = squad_examples(squad_files, "task.prompt_template='Q: {question} C: {context} A:'")
    assert tokenize_cached(other_template, tok, 256, min_examples=0)[2] is False
    other_tok = offline_tokenizer()
    other_tok.add_tokens(["<extra>"])  # a new vocabulary entry: another tokenizer
    assert tokenize_cached(examples, other_tok, 256, min_examples=0)[2] is False
    assert tokenize_cached(examples, tok, 128, min_examples=0)[2] is False  # another max_length
    assert tokenize_cached(examples, tok, 256, min_examples=0)[2] is True

    monkeypatch.setenv("PEFTRUN_CACHE", "off")
    assert tokenize_cached(examples, tok, 256, min_examples=0)[2] is None


def test_preview_marks_masked_label_positions(squad_files):
    from peftrun.preview import preview

    text = preview(["task=squad", squad_files], n=2)
    assert text.count("--- q") == 2
    # the prompt is masked, the answer and EOS carry loss
    assert "[masked: <s>|C|o|n|t|e|x|t|:" in text and "|:]| |P|a|r|i|s|</s>" in text
    assert "7 with loss" in text
    text = preview(["task=squad", squad_files, "task.loss_on_prompt=true"], n=1)
    assert "[masked" not in text


def test_evaluate_rescores_a_predictions_file(tmp_path, squad_files):
    run = tmp_path / "run"
    run.mkdir()
    cfg = compose_config("task=squad", squad_files)
    from omegaconf import OmegaConf

    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    rows = [{"id": "a", "prompt": "p", "target": " Paris", "references": ["Paris", "in Paris"],
             "prediction": " in Paris."},
            {"id": "b", "prompt": "p", "target": " Lyon", "references": ["Lyon"],
             "prediction": " the Lyon city"}]
    write_jsonl(run / "predictions.jsonl", rows)
    out = subprocess.run([sys.executable, "-m", "peftrun.evaluate", str(run)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # EM 1, 0; F1 1 and 2/3 ("lyon city" vs "lyon": P 1/2, R 1)
    assert json.loads(out.stdout) == pytest.approx(
        {"primary_metric": "exact_match", "exact_match": 50.0, "f1": 100 * (1 + 2 / 3) / 2,
         "em_f1": (50.0 + 100 * (1 + 2 / 3) / 2) / 2})
    missing = subprocess.run([sys.executable, "-m", "peftrun.evaluate", str(tmp_path / "none")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1


def test_unreachable_hub_dataset_is_one_line_exit_2(tmp_path):
    out = run_cli("task=squad", "task.hub_id=nobody/no-such-dataset-p7", "trainer.max_steps=1",
                  f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 2, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("peftrun: error: task.hub_id:") and "task.data_files=" in line


@pytest.mark.slow
def test_peftrun_squad_on_local_files_trains_and_reports_em_f1(tmp_path, squad_files):
    run = tmp_path / "run"
    out = run_cli("task=squad", squad_files, "trainer.max_steps=20", "trainer.micro_batch_size=8",
                  "trainer.eval_every=10", "trainer.save_every=0", "trainer.progress=false",
                  f"hydra.run.dir={run}", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["primary_metric"] == "test_exact_match"
    assert {"test_exact_match", "test_f1", "test_em_f1"} <= set(summary)
    assert summary["test_f1"] > 50  # the tiny model learns the fixture's answer
    row = json.loads((run / "predictions.jsonl").read_text().splitlines()[0])
    assert row["references"] == ["Paris", "in Paris"]
    from peftrun.evaluate import evaluate

    rescored = evaluate(run)
    assert rescored["f1"] == pytest.approx(summary["test_f1"])
