"""The pretraining corpus, the pretrained tiny backbone (`scripts/pretrain_tiny.py`,
`model=tiny_pretrained`) and the synthetic downstream tasks (synth_qa, synth_math,
synth_sentiment)."""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, compose_config, run_cli
from peftrun.errors import ConfigError
from peftrun.model_checks import validate_model_config
from peftrun.tasks import build_task
from peftrun.tasks.synthetic_world import NEGATIVE, PEOPLE, PLACES, POSITIVE

spec = importlib.util.spec_from_file_location("synthetic_corpus", ROOT / "scripts" / "synthetic_corpus.py")
synthetic_corpus = importlib.util.module_from_spec(spec)
spec.loader.exec_module(synthetic_corpus)
CORPUS_NEVER, SKILLS, corpus_documents = (synthetic_corpus.CORPUS_NEVER, synthetic_corpus.SKILLS,
                                          synthetic_corpus.corpus_documents)

SYNTH = ("synth_qa", "synth_math", "synth_sentiment")


def docs(seed: int, n: int) -> list[tuple[str, str]]:
    return list(itertools.islice(corpus_documents(seed), n))


# ----------------------------------------------------------------------------------- corpus
def test_corpus_is_deterministic_and_seeded():
    assert docs(0, 300) == docs(0, 300)
    assert docs(0, 300) != docs(1, 300)


def test_corpus_covers_every_skill_and_is_right():
    sample = docs(3, 1500)
    assert {skill for skill, _ in sample} == set(SKILLS)
    by_skill = {s: [d for k, d in sample if k == s] for s in SKILLS}
    # Lookup: every question is answered by the fact stated before it.
    for doc in by_skill["lookup"]:
        facts = dict(((r, s), v) for r, s, v in re.findall(r"The (\w+) of (\w+) is (\w+)\.", doc))
        asked = re.findall(r"Q: What is the (\w+) of (\w+)\? A: (\w+)", doc)
        assert asked and all(facts[(r, s)] == v for r, s, v in asked), doc
    # Arithmetic: every equation holds, results stay in 0..99.
    equations = [e for d in by_skill["arithmetic"] for e in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", d)]
    assert len(equations) > 100
    for a, op, b, r in equations:
        assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(r) and 0 <= int(r) <= 99
    stories = [s for d in by_skill["arithmetic"]
               for s in re.findall(r"has (\d+) \w+\. \w+ ([a-z ]+) (\d+)( more)?\. Now \w+ has (\d+)", d)]
    assert len(stories) > 20
    for a, _, b, more, r in stories:
        assert int(a) + (int(b) if more else -int(b)) == int(r)
    worked = [w for d in by_skill["arithmetic"] for w in re.findall(r"has (\d+) \w+\. [^\n]*? (\d+) [+-] \d+ = "
                                                                       r"[^\n]*= (\d+)\. Now \w+ has (\d+)", d)]
    assert len(worked) > 20
    for start, first_operand, last_result, end in worked:  # the work starts from the story's count
        assert start == first_operand and last_result == end
    # Copying: the span comes back verbatim.
    for doc in by_skill["copy"]:
        for line in doc.splitlines():
            if line.startswith("Copy: "):
                left, right = line.removeprefix("Copy: ").split(" => ")
                assert left == right
    assert all(d.startswith("Instruction: ") and "\nOutput: " in d for d in by_skill["instruction"])
    for doc in by_skill["sentiment"]:
        for adj, mood in re.findall(r"was (\w+), so \w+ was (\w+)\.", doc):
            assert (adj in POSITIVE) == (mood == "happy") and (adj in NEGATIVE) == (mood == "sad")
    # The downstream tasks' templates never occur in the corpus; their words do.
    text = "".join(d for _, d in sample)
    assert CORPUS_NEVER.search(text) is None


def test_corpus_knows_the_tasks_words():
    """Every word of the tasks (labels and "####" included) occurs in the corpus, so the
    tokenizer has pieces for it and the backbone has written it: only the forms are new."""
    word = re.compile(r"[A-Za-z]+|#+")
    corpus = {w for _, d in docs(3, 3000) for w in word.findall(d)}
    for name in SYNTH:
        examples = task(name, "task.num_train=300").examples("train")
        words = {w for e in examples for w in word.findall(e.prompt + e.target)} - set(PEOPLE + PLACES)
        assert sorted(words - corpus) == [], name


# ----------------------------------------------------------------------------- downstream tasks
def task(name: str, *overrides: str):
    return build_task(compose_config(f"task={name}", *overrides).task)


@pytest.mark.parametrize("name", SYNTH)
def test_synthetic_task_is_deterministic_and_splits_are_disjoint(name):
    a, b = task(name), task(name)
    splits = {s: a.examples(s) for s in ("train", "dev", "test")}
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [2000, 200, 200]
    for s in splits:
        assert [(e.prompt, e.target) for e in splits[s]] == [(e.prompt, e.target) for e in b.examples(s)]
    prompts = {s: {e.prompt for e in splits[s]} for s in splits}
    assert len(prompts["train"]) == 2000  # no repeats within train either
    assert not prompts["train"] & prompts["dev"] and not prompts["train"] & prompts["test"]
    assert not prompts["dev"] & prompts["test"]
    # num_train does not move dev/test; another seed gives other examples.
    assert [e.prompt for e in task(name, "task.num_train=50").examples("test")] == [e.prompt for e in splits["test"]]
    assert [e.prompt for e in task(name, "task.seed=7").examples("test")] != [e.prompt for e in splits["test"]]
    # Forms the pretraining corpus never uses.
    corpus_forms = ("Q: What is the", "Copy:", "Instruction:", "So the result is", ", so ")
    assert not any(f in e.prompt for e in splits["train"] for f in corpus_forms)
    # Every target is right.
    for ex in splits["test"]:
        if name == "synth_qa":
            assert ex.references[0] in ex.prompt.split("\nQuestion:")[0]
        elif name == "synth_math":
            steps = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", ex.target)
            assert len(steps) == 2 and steps[0][0] in ex.prompt
            for a_, op, b_, r in steps:
                assert (int(a_) + int(b_) if op == "+" else int(a_) - int(b_)) == int(r)
            assert ex.target.endswith(f"#### {steps[-1][3]}")
        else:
            adjectives = re.findall(r"was (\w+)", ex.prompt)
            good = {adj in POSITIVE for adj in adjectives}
            assert ex.references[0] == {frozenset({True}): "positive", frozenset({False}): "negative"}.get(
                frozenset(good), "mixed")


def test_synthetic_metrics_on_hand_examples():
    qa = task("synth_qa", "task.num_train=0", "task.num_dev=0", "task.num_test=2")
    ex = qa.examples("test")
    answer = ex[0].references[0]
    scores = qa.score([f" {answer}", "nothing like it"], ex)
    assert scores["exact_match"] == 50.0 and scores["f1"] == 50.0
    scores = qa.score([f"the {answer} town", ex[1].references[0].lower() + "."], ex)
    assert scores["exact_match"] == 50.0  # articles, case and punctuation normalized away
    assert scores["f1"] == pytest.approx(100 * (2 / 3 + 1) / 2)  # "{answer} town": P 1/2, R 1

    math = task("synth_math", "task.num_train=0", "task.num_dev=0", "task.num_test=3")
    ex = math.examples("test")
    final = ex[0].target.rsplit("#### ", 1)[1]
    preds = [f" 1 + 1 = 2. #### {final}", f" the answer is {final}", f" #### {int(final) + 1}"]
    assert math.score(preds, [ex[0]] * 3)["accuracy"] == pytest.approx(200 / 3)

    sentiment = task("synth_sentiment", "task.num_train=0", "task.num_dev=0", "task.num_test=3")
    ex = sentiment.examples("test")
    labels = [e.references[0] for e in ex]
    assert sentiment.score([f" {labels[0].capitalize()}.", labels[1], "neutral"], ex)["accuracy"] == pytest.approx(200 / 3)


# ---------------------------------------------------------------------- the pretrained backbone
def script_module(name: str):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "scripts"))


QUICK = ["--steps", "3", "--hidden", "32", "--layers", "1", "--batch", "4", "--seq", "64",
         "--eval-windows", "4", "--log-every", "1"]


@pytest.mark.slow
def test_pretrain_quick_mode_is_seeded_and_trains_through_the_cli(tmp_path):
    pretrain = script_module("pretrain_tiny")
    # Two data-parallel processes (the default), each with half of every batch.
    info = pretrain.main(["--out", str(tmp_path / "a"), *QUICK])
    pretrain.main(["--out", str(tmp_path / "b"), *QUICK])
    pretrain.main(["--out", str(tmp_path / "c"), *QUICK, "--seed", "1"])
    pretrain.main(["--out", str(tmp_path / "d"), *QUICK, "--procs", "1"])
    a, b, c, d = (load_file(str(tmp_path / x / "model.safetensors")) for x in "abcd")
    assert info["args"]["procs"] == 2
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # same seed, same weights
    assert any((a[k] != c[k]).any() for k in a)
    # One process on the whole batch takes the same steps, up to the order of float additions,
    # which Adam scales up where a gradient is nearly zero (a few 1e-6 after 3 steps; a step
    # taken differently would move a weight by about the learning rate, 2e-3).
    assert all(torch.allclose(a[k], d[k], rtol=1e-4, atol=2e-5) for k in a)
    assert info["heldout_loss"]["all"] > 0 and set(SKILLS) < set(info["heldout_loss"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "pretrain.json"} <= {
        p.name for p in (tmp_path / "a").iterdir()}
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary folder was renamed

    run_dir = tmp_path / "run"
    r = run_cli("model=tiny_pretrained", f"model.name_or_path={tmp_path / 'a'}", "task=synth_sentiment",
                "task.num_train=16", "task.num_dev=4", "task.num_test=4", "trainer.max_steps=1",
                "trainer.micro_batch_size=4", "trainer.eval_every=0", "trainer.save_every=0",
                "trainer.progress=false", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (run_dir / "summary.json").read_text()
    assert '"steps": 1' in summary and '"test_accuracy"' in summary


@pytest.mark.parametrize("bad", [["--procs", "3"], ["--procs", "0"], ["--batch", "x"]])
def test_pretrain_refuses_bad_arguments_in_one_line(bad, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_tiny.py"), "--out", str(tmp_path / "out"),
                        *bad], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("pretrain_tiny.py: error: ") and bad[0] in line
    assert list(tmp_path.iterdir()) == []


def test_missing_pretrained_folder_exits_2_naming_the_command(tmp_path, monkeypatch, capsys):
    # The command line's own check (peftrun.cli.precheck runs before Hydra makes a run folder).
    from peftrun.cli import precheck

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        precheck(["model=tiny_pretrained", f"model.name_or_path={tmp_path / 'missing'}", "task=synth_qa",
                  f"hydra.run.dir={run_dir}"])
    assert exit_.value.code == 2
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert len(lines) == 1 and out.out == "", out
    assert lines[0].startswith("peftrun: error: model.name_or_path:")
    assert "python scripts/pretrain_tiny.py" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no run folder, nothing else


def test_missing_local_folder_is_named_before_any_load(tmp_path):
    # The shipped default points at models/tiny_pretrained under the working directory.
    cfg = compose_config("model=tiny_pretrained", f"model.name_or_path={tmp_path / 'nothing'}").model
    with pytest.raises(ConfigError) as err:
        validate_model_config(cfg)
    assert err.value.key == "model.name_or_path" and "python scripts/pretrain_tiny.py" in str(err.value)
    # Any path no Hub id can look like: no Hub error, the missing folder is named.
    gpt2 = compose_config("model=gpt2", f"model.name_or_path={tmp_path / 'nothing'}").model
    with pytest.raises(ConfigError, match="no folder"):
        validate_model_config(gpt2)
    validate_model_config(compose_config("model=gpt2").model)  # a Hub id is left to the Hub
    validate_model_config(compose_config("model=tiny_pretrained", f"model.name_or_path={tmp_path}").model)


@pytest.mark.slow
def test_quality_benchmark_smoke_writes_the_table_and_plot(tmp_path):
    # A throwaway backbone, 4 steps per run, every default method and task, two worker processes.
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_quality.py"), "--smoke"],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    written = ["quality_curves.md", *(f"quality_{task}.png" for task in sorted(SYNTH))]
    assert f"smoke: wrote {written}" in r.stdout
    lines = r.stdout.splitlines()
    for task in SYNTH:
        assert f"**{task}** (dev {'exact_match' if task == 'synth_qa' else 'accuracy'})" in lines
        assert f"![{task}: dev" in r.stdout and f"quality_{task}.png)" in r.stdout
    heads = [line for line in lines if line.startswith("| method | knob | trainable | lr | final ")]
    assert len(heads) == len(SYNTH) and all("steps to 90% | train s to 90% | last-quarter gain |" in h for h in heads)
    for label in ("backbone, no adapter (zero-shot)", "lora", "tied_lora tl6", "tied_lora tl5", "tied_lora tl6 r=8",
                  "alora", "para", "iapt"):
        rows = [line for line in lines if line.startswith(f"| {label} |")]
        assert len(rows) == len(SYNTH), label
        assert [row.count("|") for row in rows] == [head.count("|") for head in heads], rows  # tasks in order
    assert sum(line.startswith("Threshold: 90% of the best final ") or line.startswith("No threshold: ")
               for line in lines) == len(SYNTH)
    assert "bench_quality.py: wrote quality-backbone, quality-curves, machine into" in r.stderr
    assert list(tmp_path.iterdir()) == []  # the smoke run writes into a temporary folder only


@pytest.mark.slow
def test_quality_benchmark_learning_rate_sweep_smoke(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_quality.py"), "--smoke", "--sweep-lr",
                        "1e-3,1e-2", "--methods", "lora,iapt", "--tasks", "synth_qa,synth_sentiment"],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "smoke: wrote ['quality_lr.md']" in r.stdout
    rows = [line.split(" | ") for line in r.stdout.splitlines() if line.startswith(("| lora |", "| iapt |"))]
    assert len(rows) == 2
    for cells in rows:  # two rates, each "qa / sentiment" dev losses, and the pick among them
        assert all(len(c.split(" / ")) == 2 for c in cells[1:3])
        assert cells[3].rstrip(" |") in ("0.001", "0.01")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [["--sweep-lr", "1e-3,x"], ["--lr", "lora"], ["--lr", "lorra=1e-3"], ["--seeds", "a"],
                                 ["--evals", "0"], ["--methods", "lora,lorra"]])
def test_quality_benchmark_refuses_malformed_arguments_in_one_line(bad):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_quality.py"), *bad],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("bench_quality.py: error: --")


@pytest.mark.parametrize("bad", [["--tasks", "synth_qa,squad"], ["--methods", "lorra"], ["--seeds", "0,x"],
                                 ["--lr", "lora=fast"]])
def test_smollm2_quality_benchmark_refuses_malformed_arguments_in_one_line(bad):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_quality_smollm2.py"), *bad],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("bench_quality_smollm2.py: error: --")


def test_smollm2_quality_benchmark_without_the_model_names_make_smollm2(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("untouched")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_quality_smollm2.py"), "--folder",
                        str(tmp_path / "smollm2_135m"), "--doc", str(doc), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("bench_quality_smollm2.py: error: ") and "`make smollm2`" in lines[0]
    assert str(tmp_path / "smollm2_135m") in lines[0]
    assert [p.name for p in tmp_path.iterdir()] == ["benchmarks.md"] and doc.read_text() == "untouched"
