"""docs/benchmarks.md is written by the bench scripts (scripts/benchmarks_doc.py): the writer
replaces one marked section and nothing else, and every section a script writes is marked on the
page. The scripts' own runs are faked here (their measurements take minutes): what is checked is
that each one writes, into a copy of the page, the table it prints."""

from __future__ import annotations

import ast
import datetime
import importlib
import json
import os
import re
import shlex
import stat
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
PAGE = ROOT / "docs" / "benchmarks.md"
BENCH_SCRIPTS = ("bench_train", "bench_alora", "bench_multitenant", "bench_quality", "bench_smollm2",
                 "bench_packing", "bench_quality_smollm2", "bench_gpu")


def script_module(name: str):
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module(name)


bd = script_module("benchmarks_doc")

PAGE_TEXT = """# Title

Intro  with  odd   spacing.\t

<!-- bench:alpha -->
old alpha
| a | b |
<!-- /bench:alpha -->

Between, by hand: `<!-- bench:alpha -->` in a code span is no marker.

<!-- bench:beta -->

Measured 2020-01-01 by `python old.py`.

| x |
|---|
| 1 |

<!-- /bench:beta -->
tail without a final newline"""


def page(tmp_path, text=PAGE_TEXT) -> Path:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(text, encoding="utf-8", newline="")
    return doc


def blank_sections(text: str) -> str:
    """The page with what lies inside every section removed: what the writer must leave alone."""
    return re.sub(r"(?ms)^(<!-- bench:(\S+) -->\n).*?^(<!-- /bench:\2 -->)$", r"\1\3", text)


# ------------------------------------------------------------------------------- the writer
def test_update_section_replaces_that_section_only(tmp_path):
    doc = page(tmp_path)
    bd.update_section("alpha", "\n\n| new | table |\n|---|---|\n| 1 | 2 |\n\n", doc, datetime.date(2026, 1, 2),
                      command="python scripts/bench_x.py --steps 2")
    text = doc.read_text(encoding="utf-8")
    assert blank_sections(text) == blank_sections(PAGE_TEXT)
    assert bd.sections(text)["beta"] == bd.sections(PAGE_TEXT)["beta"]
    assert bd.sections(text)["alpha"] == (
        "\nMeasured 2026-01-02 by `python scripts/bench_x.py --steps 2` on the machine named at the top.\n\n"
        "| new | table |\n|---|---|\n| 1 | 2 |\n\n")
    assert text.startswith(PAGE_TEXT[:PAGE_TEXT.index("<!-- bench:alpha -->\n") + len("<!-- bench:alpha -->\n")])
    assert text.endswith(PAGE_TEXT[PAGE_TEXT.index("<!-- /bench:alpha -->"):])
    assert [p.name for p in tmp_path.iterdir()] == ["benchmarks.md"]  # no temporary file left behind


def test_update_section_is_idempotent(tmp_path):
    doc = page(tmp_path)
    for name in ("alpha", "beta"):
        bd.update_section(name, f"body of {name}", doc, "2026-01-02", command="python scripts/bench_x.py")
    once = doc.read_text()
    for name in ("alpha", "beta"):
        bd.update_section(name, f"body of {name}", doc, "2026-01-02", command="python scripts/bench_x.py")
    assert doc.read_text() == once
    bd.update_section("alpha", "other", doc, "2026-01-02", command="python scripts/bench_x.py")
    bd.update_section("alpha", "body of alpha", doc, "2026-01-02", command="python scripts/bench_x.py")
    assert doc.read_text() == once


def test_update_section_writes_today_and_the_command_line(tmp_path, monkeypatch):
    doc = page(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / "bench_x.py"), "--steps", "2", "--label", "a b"])
    bd.update_section("beta", "| t |\n|---|", doc)
    first = bd.sections(doc.read_text())["beta"].splitlines()[1]
    assert first == (f"Measured {datetime.date.today().isoformat()} by `python scripts/bench_x.py --steps 2 "
                     f"--label 'a b'` on the machine named at the top.")
    bd.update_section("alpha", "x", doc, date=datetime.date(2025, 12, 31), command="a `b`")
    assert "Measured 2025-12-31 by `` a `b` `` on the machine" in doc.read_text()


@pytest.mark.parametrize("text, problem", [
    (PAGE_TEXT.replace("<!-- bench:alpha -->\n", ""), "no marker line <!-- bench:alpha -->"),
    (PAGE_TEXT.replace("<!-- /bench:alpha -->", ""), "no marker line <!-- /bench:alpha -->"),
    (PAGE_TEXT.replace("<!-- bench:alpha -->\n", "").replace("<!-- /bench:alpha -->", ""),
     "<!-- bench:alpha --> and <!-- /bench:alpha -->"),
    (PAGE_TEXT + "\n<!-- bench:alpha -->\n<!-- /bench:alpha -->\n", "more than once"),
    (PAGE_TEXT.replace("<!-- bench:alpha -->\n", "@@").replace("<!-- /bench:alpha -->", "<!-- bench:alpha -->")
     .replace("@@", "<!-- /bench:alpha -->\n"), "comes before"),
    (PAGE_TEXT.replace("old alpha", "<!-- bench:gamma -->\n<!-- /bench:gamma -->"), "cannot nest"),
])
def test_update_section_refuses_a_page_without_its_markers(tmp_path, text, problem):
    doc = page(tmp_path, text)
    with pytest.raises(bd.SectionError) as err:
        bd.update_section("alpha", "new", doc, command="python x.py")
    assert problem in str(err.value) and "\n" not in str(err.value)
    assert doc.read_text(encoding="utf-8") == text
    assert [p.name for p in tmp_path.iterdir()] == ["benchmarks.md"]


def test_refusals_of_names_bodies_and_missing_pages(tmp_path):
    doc = page(tmp_path)
    with pytest.raises(bd.SectionError, match="no such file"):
        bd.update_section("alpha", "x", tmp_path / "absent.md", command="c")
    with pytest.raises(bd.SectionError, match="section name"):
        bd.update_section("Alpha beta", "x", doc, command="c")
    with pytest.raises(bd.SectionError, match="empty"):
        bd.update_section("alpha", "\n \n", doc, command="c")
    with pytest.raises(bd.SectionError, match="marker line"):
        bd.update_section("alpha", "x\n<!-- /bench:beta -->\ny", doc, command="c")
    # Several sections are written all together or not at all.
    with pytest.raises(bd.SectionError, match="gamma"):
        bd.update_sections({"alpha": "x", "gamma": "y"}, doc, command="c")
    assert doc.read_text(encoding="utf-8") == PAGE_TEXT


def test_the_page_is_replaced_atomically_and_keeps_its_mode(tmp_path, monkeypatch):
    doc = page(tmp_path)
    doc.chmod(0o640)

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        bd.update_section("alpha", "x", doc, command="c")
    assert doc.read_text(encoding="utf-8") == PAGE_TEXT
    assert [p.name for p in tmp_path.iterdir()] == ["benchmarks.md"]
    monkeypatch.undo()
    bd.update_section("alpha", "x", doc, command="c")
    assert stat.S_IMODE(doc.stat().st_mode) == 0o640


def test_preflight_and_publish_exit_2_in_one_line(tmp_path, capsys):
    doc = page(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        bd.preflight("bench_x.py", ["alpha"], doc)  # the page has no machine section
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench_x.py: error: ") and "bench:machine" in err[0]
    with pytest.raises(SystemExit) as exit_:
        bd.publish("bench_x.py", {"alpha": "x"}, doc, ("alpha",))
    assert exit_.value.code == 2 and doc.read_text(encoding="utf-8") == PAGE_TEXT
    with pytest.raises(ValueError, match="DOC_SECTIONS"):
        bd.publish("bench_x.py", {"gamma": "x"}, doc, ("alpha",))
    bd.preflight("bench_x.py", ["alpha"], None)  # --no-doc: nothing checked
    bd.publish("bench_x.py", {"alpha": "x"}, None, ("alpha",))  # nor written


def test_machine_line_names_cores_cpu_and_torch():
    import torch

    line = bd.machine_markdown()
    assert f"{os.cpu_count()} CPU cores" in line and f"torch {torch.__version__}" in line
    assert ("no GPU" in line) != torch.cuda.is_available()
    assert "\n" not in line


# --------------------------------------------------------------------- the page and the scripts
def declared_sections(name: str) -> tuple[str, ...]:
    """A script's DOC_SECTIONS, read from its source (importing some of them loads torch)."""
    tree = ast.parse((SCRIPTS / f"{name}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DOC_SECTIONS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"scripts/{name}.py has no DOC_SECTIONS")


def published_names(name: str) -> set[str]:
    """The section names in the script's benchmarks_doc.publish(...) calls (dict literals)."""
    names = set()
    for node in ast.walk(ast.parse((SCRIPTS / f"{name}.py").read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "publish":
            assert isinstance(node.args[1], ast.Dict), f"{name}: publish(prog, {{name: body}}, ...)"
            names |= {ast.literal_eval(k) for k in node.args[1].keys}
    return names


@pytest.mark.parametrize("name", BENCH_SCRIPTS)
def test_every_section_a_script_writes_is_marked_on_the_page(name):
    declared = declared_sections(name)
    assert declared and published_names(name) == set(declared)
    bd.check_sections([*declared, bd.MACHINE], PAGE)
    source = (SCRIPTS / f"{name}.py").read_text()
    assert '"--no-doc"' in source and '"--doc"' in source and "benchmarks_doc.preflight(" in source


def test_the_page_marks_no_section_that_no_script_writes():
    written = {bd.MACHINE}.union(*(declared_sections(name) for name in BENCH_SCRIPTS))
    assert set(bd.sections(PAGE.read_text(encoding="utf-8"), PAGE)) == written


# ------------------------------------------------------------ the scripts' runs, faked, into a copy
@pytest.fixture
def copy(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_bytes(PAGE.read_bytes())
    return doc


def check_written(doc: Path, names, command: str, printed: str) -> dict:
    """Only `names` and the machine changed; each under its heading; every table row printed."""
    text = doc.read_text(encoding="utf-8")
    original = PAGE.read_text(encoding="utf-8")
    assert blank_sections(text) == blank_sections(original)
    before, after = bd.sections(original, PAGE), bd.sections(text, doc)
    assert {n for n in after if after[n] != before[n]} == {*names, bd.MACHINE}
    today = datetime.date.today().isoformat()
    for name in names:
        assert after[name].startswith(f"\nMeasured {today} by `{command}` on the machine named at the top.\n\n")
    assert after[bd.MACHINE] == f"\nMeasured {today} by `{command}`.\n\n{bd.machine_markdown()}\n\n"
    rows = [line for line in printed.splitlines() if line.startswith("|")]
    assert rows and all(row in "".join(after[n] for n in names).splitlines() for row in rows)
    assert "CPU cores" not in "".join(after[n] for n in names)  # the machine is named once, at the top
    return after


def test_a_section_published_as_none_keeps_its_figures(copy):
    # bench_train.py --no-whole-runs: the step table is new, the whole-run section stays as it was.
    before = bd.sections(PAGE.read_text(encoding="utf-8"), PAGE)
    bd.publish("bench_train.py", {"train": "| a | b |", "train-alora-runs": None}, copy, ("train", "train-alora-runs"))
    after = bd.sections(copy.read_text(encoding="utf-8"), copy)
    assert after["train-alora-runs"] == before["train-alora-runs"] and "| a | b |" in after["train"]


def test_bench_alora_writes_its_table(copy, monkeypatch, capsys):
    bench = script_module("bench_alora")

    def measure(model, args):
        row = {"model": model, "built": f"`model={model}`", "open": 112 if model == "tiny" else 1680,
               "scored": 112, "n_a": 7, "batch": (32, 12), "step_s": 0.01, "exact_s": 0.5 if model == "tiny" else 50.0,
               "taylor_s": 0.02, "spearman": 0.9, "overlap": 3}
        if model == "tiny":
            row.update(naive_s=1.5, diff=2e-6)
        return row

    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / "bench_alora.py"), "--repeats", "1", "--doc", str(copy)])
    bench.main()
    out = capsys.readouterr()
    assert out.out.startswith("| shape, dev batch 32 | open ranks | LoRA step s | exact round s | in LoRA steps |")
    assert "| `model=tiny`, 32 x 12 tokens | 112 | 0.010 | 0.50 | 50 | 0.020 | 2.0 | 0.90 | 3 of 7 |" in out.out
    assert "| 50.00 (timed on 112, scaled) | 5000 |" in out.out
    assert "| speed-up | 3.0x |" in out.out and "| largest score difference | 2.00e-06 |" in out.out
    assert "bench_alora.py: wrote alora-scoring, machine into" in out.err
    check_written(copy, ["alora-scoring"], shlex.join(["python", "scripts/bench_alora.py", "--repeats", "1", "--doc",
                                                       str(copy)]), out.out)

    # --no-doc: the page is left alone.
    before = copy.read_bytes()
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / "bench_alora.py"), "--no-doc", "--doc", str(copy)])
    bench.main()
    assert copy.read_bytes() == before and "wrote" not in capsys.readouterr().err


def test_bench_alora_spearman_and_sampled_blocks():
    bench = script_module("bench_alora")
    assert bench.spearman([1.0, 2.0, 3.0], [10.0, 20.0, 30.0]) == pytest.approx(1.0)
    assert bench.spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert bench.spearman([1.0, 1.0, 2.0, 3.0], [5.0, 5.0, 6.0, 7.0]) == pytest.approx(1.0)  # ties


def test_bench_alora_refuses_a_page_without_markers_before_measuring(tmp_path, monkeypatch, capsys):
    bench = script_module("bench_alora")
    doc = page(tmp_path)
    monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail("measured before checking the page"))
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / "bench_alora.py"), "--doc", str(doc)])
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench_alora.py: error: ") and "bench:alora-scoring" in err[0]


def test_bench_train_writes_its_tables(copy, tmp_path, monkeypatch, capsys):
    bench = script_module("bench_train")

    def run_child(kind, name, args):
        if kind == "run":
            return {"seconds": 3.0 if name.startswith("alora") else 2.0}
        row = {"name": name, "seconds": 0.1 + 0.01 * len(name), "peak_rss_mib": 500.0, "trainable": 1234,
               "built": "Llama hidden 256, 4 layers", "seq": 128}
        if kind == "smollm2":
            row.update(built="SmolLM2-135M's shape, randomly initialised", seq=512 if "512" in name else 128,
                       seconds=2.0 if name.startswith("backbone") else 2.5)
        if not name.startswith("backbone"):  # paired with a backbone in its process
            row.update(vs_backbone=1.19 if kind == "smollm2" else 1.5 if name.startswith("peft") else 1.2)
        return row

    monkeypatch.setattr(bench, "run_child", run_child)
    monkeypatch.setattr(bench, "bar_chart", lambda *a, **k: None)
    argv = ["--steps", "2", "--warmup", "1", "--out", str(tmp_path / "bench"), "--doc", str(copy)]
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / "bench_train.py"), *argv])
    bench.main()
    out = capsys.readouterr().out
    command = shlex.join(["python", "scripts/bench_train.py", *argv])
    after = check_written(copy, ["train", "train-alora-runs"], command, out)
    assert "after 1 warm-up steps, its 2 timed steps alternating" in after["train"]
    assert "Training step, Llama hidden 256, 4 layers, batch 8 x 128 tokens" in after["train"]
    assert "SmolLM2-135M's shape, randomly initialised, batch 4 x 128 tokens" in after["train"]
    assert "| lora r=8 | 1,234 | 0.180 | 1.20 | 0.80 | 500 |" in after["train"]  # 1.2 / PEFT's 1.5
    assert "| backbone (frozen, fwd+bwd) | 1,234 | 0.360 | 1.00 | 0.67 | 500 |" in after["train"]
    assert "| iapt bottleneck 64, 512 tokens | 1,234 | 2.500 | 1.19 | - | 500 |" in after["train"]
    assert "| backbone (frozen, fwd+bwd), 512 tokens | 1,234 | 2.000 | 1.00 | - | 500 |" in after["train"]
    assert "= 1.50x;" in after["train-alora-runs"] and "| configuration |" not in after["train-alora-runs"]
    assert (tmp_path / "bench" / "train.md").read_text() == out


@pytest.mark.parametrize("smollm2", [False, True])
def test_bench_multitenant_writes_its_table(smollm2, copy, tmp_path, monkeypatch, capsys):
    bench = script_module("bench_multitenant")
    monkeypatch.setattr(bench, "build", lambda label, args: (None, None, list(range(100))))
    monkeypatch.setattr(bench, "run_once", lambda *a: (0.05, 100.0))
    monkeypatch.setattr(bench, "bar_chart", lambda *a, **k: None)
    argv = ["--tenants", "1", "2", "--prompts", "16", "--repeats", "1", "--threads", "0",
            "--methods", "lora r=8", "--out", str(tmp_path / "bench"), "--doc", str(copy)] + ["--smollm2"] * smollm2
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / "bench_multitenant.py"), *argv])
    bench.main()
    out = capsys.readouterr().out
    section = "multitenant-smollm2" if smollm2 else "multitenant"
    after = check_written(copy, [section], shlex.join(["python", "scripts/bench_multitenant.py", *argv]), out)
    assert "| lora r=8 | 2 | 16 | 50 | 1.00 | 100 | 1.00 |" in after[section]
    built = "SmolLM2-135M" if smollm2 else "random-init Llama hidden 512, 8 layers"
    assert f"Multi-tenant generation, {built}" in after[section]
    assert (tmp_path / "bench" / f"{section}.md").read_text() == out


def fake_curve(final: float, seconds: float) -> list[dict]:
    """Two evaluations, at steps 240 and 480 (of synth_sentiment's 480), reaching `final`."""
    return [{"step": 240, "seconds": seconds / 2, "metric": final - 10, "dev_loss": 0.5},
            {"step": 480, "seconds": seconds, "metric": final, "dev_loss": 0.4}]


def fake_quality_runs(bench, monkeypatch, seen=None):
    """bench_quality's backbone, budget matching, zero-shot run and training runs faked: run
    `job` (task, label, seed, lr) reaches 90 + seed (lora) or 70 + seed (others), tests at
    that, and has dev loss 10 x lr (the sweep picks the lowest rate)."""
    quality = sys.modules["quality"]
    info = {"args": {"hidden": 32, "layers": 1, "probes": 4}, "parameters": 12345, "tokens": 2048,
            "train_seconds": 6.0, "heldout_loss": {"all": 1.2345}, "heldout_loss_unit": "token",
            "skill_accuracy": {"lookup": 50.0, "copy": 25.0, "story": 0.0}}
    monkeypatch.setattr(bench, "ensure_backbone", lambda args, scratch: ("/nowhere", info))
    monkeypatch.setattr(bench, "count", lambda label, k, overrides: 55296)
    monkeypatch.setattr(bench, "match_budget", lambda label, budget, overrides: (4, 55296))
    monkeypatch.setattr(bench, "zero_shot", lambda plan, task: {
        "test_accuracy": 0.5, "primary_metric": "test_accuracy", "wall_seconds": 1.0, "predictions": ["x"]})

    def run_all(plan, jobs, runs_root):
        for job in jobs:
            if seen is not None:
                seen.append((plan, job))
            final = (90.0 if job[1] == "lora" else 70.0) + job[2]
            yield job, {"test_accuracy": final, "primary_metric": "test_accuracy", "dev_loss": job[3] * 10,
                        "train_seconds": 20.0, "wall_seconds": 25.0, "lr": job[3], "curve": fake_curve(final, 20.0)}

    monkeypatch.setattr(quality.benchmark, "run_all", run_all)
    monkeypatch.setattr(quality.lr, "run_all", run_all)


def test_bench_quality_writes_the_backbone_and_results(copy, tmp_path, monkeypatch, capsys):
    bench = script_module("bench_quality")
    seen = []
    fake_quality_runs(bench, monkeypatch, seen)
    argv = ["--tasks", "synth_sentiment", "--methods", "lora,para", "--seeds", "0,1", "--out", str(tmp_path / "q"),
            "--doc", str(copy)]
    bench.main(argv)
    out = capsys.readouterr().out
    table = out[out.index("Backbone: "):]
    after = check_written(copy, ["quality-backbone", "quality-curves"],
                          shlex.join(["python", "scripts/bench_quality.py", *argv]), table)
    assert "| 1.234 | 50% | 25% | 0% |" in after["quality-backbone"]
    assert "| held-out LM loss | facts | copying | two-step stories |" in after["quality-backbone"]
    curves = after["quality-curves"]
    assert "**synth_sentiment** (dev accuracy)" in curves
    assert not re.search(r"(?m)^#", curves)  # no headings of its own inside the page's
    # lora's seed-mean curve ends at 90.5: the threshold is 81.45, which it reaches at its last evaluation.
    assert "| lora | r=4 | 55,296 | 0.01 | 90.5 | 90.5 (480) | 480 | 20 | +10.0 | 90.5 ± 0.7 | 90.0 / 91.0 | 20 |" in curves
    assert "| para | bottleneck=4 | 55,296 | 0.01 | 70.5 | 70.5 (480) | not reached | - | +10.0 | 70.5 ± 0.7 |" in curves
    assert "| backbone, no adapter (zero-shot) | - | 0 | - | - | - | - | - | - | 0.5 | - | - |" in curves
    assert "Threshold: 90% of the best final accuracy, 81.5." in curves
    assert "synth_sentiment 480 (evaluated every 30)" in curves
    # The plot, one per task, beside the table and linked relative to the page.
    png = tmp_path / "q" / "quality_synth_sentiment.png"
    assert png.read_bytes().startswith(b"\x89PNG")
    assert (copy.parent / "plots" / png.name).read_bytes() == png.read_bytes()  # committed beside the page
    assert f"](plots/{png.name})" in curves
    assert (tmp_path / "q" / "quality_curves.md").read_text() + "\n" == table  # print's newline
    # Every method on every seed at its picked rate, on the task's steps, evaluated 16 times.
    plan = seen[0][0]
    assert [job for _, job in seen] == [("synth_sentiment", m, s, 0.01) for m in ("lora", "para") for s in (0, 1)]
    assert plan.steps == {"synth_sentiment": 480} and plan.eval_every == {"synth_sentiment": 30} and plan.generate


def test_bench_quality_sweep_writes_the_learning_rates(copy, tmp_path, monkeypatch, capsys):
    bench = script_module("bench_quality")
    seen = []
    fake_quality_runs(bench, monkeypatch, seen)
    picks = tmp_path / "picks.json"
    argv = ["--sweep-lr", "1e-3,1e-2", "--sweep-steps", "40", "--tasks", "synth_qa", "--methods", "lora", "--out",
            str(tmp_path / "q"), "--picks", str(picks), "--doc", str(copy)]
    bench.main(argv)
    out = capsys.readouterr().out
    after = check_written(copy, ["quality-lr"], shlex.join(["python", "scripts/bench_quality.py", *argv]), out)
    assert "| lora | 0.010 | 0.100 | 0.001 |" in after["quality-lr"]
    assert "lowest geometric-mean dev loss of lr 0.001, 0.01 after synth_qa 40 steps, seed 0, batch 16" in \
        after["quality-lr"]
    assert json.loads(picks.read_text())["tiny_pretrained"]["lora"]["lr"] == 1e-3
    assert all(plan.steps == {"synth_qa": 40} and not plan.generate for plan, _ in seen)


def test_bench_quality_smoke_writes_a_throwaway_copy(tmp_path):
    bench = script_module("bench_quality")
    args = bench.parse_args(["--smoke"])
    doc = bench.doc_path(args, tmp_path)
    assert doc.parent == tmp_path and doc.read_bytes() == PAGE.read_bytes()
    assert bench.doc_path(bench.parse_args([]), tmp_path) == PAGE
    assert bench.doc_path(bench.parse_args(["--no-doc"]), tmp_path) is None
    assert bench.doc_path(bench.parse_args(["--smoke", "--doc", "x.md"]), tmp_path) == Path("x.md")


def test_bench_quality_smollm2_writes_its_table(copy, tmp_path, monkeypatch, capsys):
    """The SmolLM2 comparison, its runs faked: the chat-rendered task files are written, every run's
    test predictions are scored again with synth_qa's own metric, the zero-shot model is a row."""
    bench = script_module("bench_quality_smollm2")
    quality = sys.modules["quality"]
    folder = tmp_path / "smollm2_135m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    answers = [e.references[0] for e in quality.chat_data.native_task("synth_qa").examples("test")[:100]]
    monkeypatch.setattr(bench, "count", lambda label, k, overrides: 1_000)
    monkeypatch.setattr(bench, "match_budget", lambda label, budget, overrides: (2, 1_000))
    monkeypatch.setattr(bench, "zero_shot", lambda plan, task: {
        "test_exact_match": 0.0, "primary_metric": "test_exact_match", "wall_seconds": 1.0,
        "predictions": [f"The answer is {a}." for a in answers]})
    seen = []

    def run_all(plan, jobs, runs_root):
        for job in jobs:
            seen.append((plan, job))
            run_dir = tmp_path / "runs" / job[1]
            run_dir.mkdir(parents=True)
            right = 50 if job[1] == "lora" else 25  # the first `right` answers exactly, the rest wrong
            predictions = answers[:right] + ["no"] * (100 - right)
            (run_dir / "predictions.jsonl").write_text("".join(json.dumps({"prediction": p}) + "\n" for p in predictions))
            yield job, {"test_exact_match": float(right), "primary_metric": "test_exact_match", "dev_loss": 1.0,
                        "train_seconds": 60.0, "wall_seconds": 70.0, "lr": job[3], "run_dir": str(run_dir),
                        "curve": fake_curve(float(right), 60.0)}

    monkeypatch.setattr(quality.benchmark, "run_all", run_all)
    argv = ["--folder", str(folder), "--tasks", "synth_qa", "--methods", "lora,iapt", "--lr", "lora=1e-3",
            "--lr", "iapt=1e-2", "--out", str(tmp_path / "q"), "--doc", str(copy)]
    bench.main(argv)
    out = capsys.readouterr().out
    table = out[out.index("SmolLM2-135M-Instruct"):]
    after = check_written(copy, ["quality-smollm2"], shlex.join(["python", "scripts/bench_quality_smollm2.py", *argv]),
                          table)["quality-smollm2"]
    assert "| test EM (reply) | test EM (task) | test F1 (task) | per seed | train s |" in after
    # The zero-shot sentences: no exact match, F1 credit for the answer inside them.
    assert re.search(r"\| backbone, no adapter \(zero-shot\) \| - \| 0 \| - \| - \| - \| - \| - \| - \| 0.0 \| 0.0 \| "
                     r"[1-9]\d\.\d \| - \| - \|", after), after
    assert "| lora | r=2 | 1,000 | 0.001 | 50.0 | 50.0 (480) | 480 | 60 | +10.0 | 50.0 | 50.0 | 50.0 | 50.0 | 60 |" in after
    assert "| iapt | bottleneck=2 | 1,000 | 0.01 | 25.0 | 25.0 (480) | not reached | - | +10.0 | 25.0 | 25.0 | 25.0 |" in after
    assert (tmp_path / "q" / "quality_smollm2_synth_qa.png").exists()
    plan = seen[0][0]
    assert plan.model_overrides == ("model=smollm2_135m", f"model.name_or_path={folder.resolve()}")
    overrides = dict(o.split("=", 1) for o in plan.task_overrides["synth_qa"])
    assert overrides["task"] == "chat" and overrides["task.train_on"] == "last_assistant"
    assert plan.steps == {"synth_qa": bench.TASK_STEPS["synth_qa"]} and plan.batch == 8 and plan.alora_rounds == 1
    assert [job for _, job in seen] == [("synth_qa", "lora", 0, 1e-3), ("synth_qa", "iapt", 0, 1e-2)]


def test_bench_quality_smollm2_needs_a_rate_for_every_method(tmp_path, monkeypatch):
    bench = script_module("bench_quality_smollm2")
    folder = tmp_path / "smollm2_135m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    picks = tmp_path / "picks.json"
    picks.write_text('{"smollm2_135m": {"lora": {"lr": 0.001, "how": "x"}}}')
    monkeypatch.setattr(bench, "count", lambda *a: pytest.fail("sized the methods without their rates"))
    with pytest.raises(SystemExit, match="no learning rate for para on smollm2_135m"):
        bench.main(["--folder", str(folder), "--methods", "lora,para", "--picks", str(picks), "--no-doc"])


def test_bench_smollm2_writes_its_table(copy, tmp_path, monkeypatch, capsys):
    bench = script_module("bench_smollm2")
    folder = tmp_path / "smollm2_135m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")

    seen = set()

    def run_child(name, threads, args):  # the first round is slowed down: the fastest process counts
        slow = (name, threads) not in seen
        seen.add((name, threads))
        return {"name": name, "threads": threads, "load_seconds": 1.0 + threads, "seconds": 2.0 / threads + slow,
                "peak_rss_mib": 1500.0, "trainable": 0 if name.startswith("backbone") else 1234}

    monkeypatch.setattr(bench, "run_child", run_child)
    argv = ["--folder", str(folder), "--steps", "2", "--warmup", "1", "--repeats", "2", "--methods", "backbone (frozen, fwd+bwd)",
            "lora r=8, all linears", "--out", str(tmp_path / "bench"), "--doc", str(copy)]
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / "bench_smollm2.py"), *argv])
    bench.main()
    out = capsys.readouterr().out
    after = check_written(copy, ["smollm2"], shlex.join(["python", "scripts/bench_smollm2.py", *argv]), out)
    assert "| lora r=8, all linears | 1,234 | 2.00 | 256 | 1.00 | 512 | 1,500 |" in after["smollm2"]
    assert "median 2.5 s (2.0-3.0 s over 8 processes)" in after["smollm2"]
    assert "the fastest of 2 such processes" in after["smollm2"]
    assert (tmp_path / "bench" / "smollm2.md").read_text() == out


def test_bench_smollm2_names_the_command_when_the_model_is_missing(tmp_path, monkeypatch, capsys):
    bench = script_module("bench_smollm2")
    monkeypatch.setattr(bench, "run_child", lambda *a: pytest.fail("measured without a model"))
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--folder", str(tmp_path / "absent"), "--no-doc"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "make smollm2" in err[0]


def test_bench_packing_writes_its_table(copy, monkeypatch, capsys):
    bench = script_module("bench_packing")
    monkeypatch.setattr(bench, "instruction_set", lambda n, max_length, vocab: [{"input_ids": [1] * k} for k in (50, 118, 250)])
    speed = {"padded": 1.0, "group_by_length": 2.0, "packing": 2.5}

    def measure(method, mode, features, args):
        if method == "iapt" and mode == "packing":
            raise TypeError("not yet")
        return {"tokens": 1000 * speed[mode], "seconds": 1.0, "padding": 0.6 if mode == "padded" else 0.05}

    monkeypatch.setattr(bench, "measure", measure)
    argv = ["--steps", "1", "--warmup", "0", "--methods", "lora,iapt", "--doc", str(copy)]
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / "bench_packing.py"), *argv])
    bench.main()
    out = capsys.readouterr()
    after = check_written(copy, ["packing"], shlex.join(["python", "scripts/bench_packing.py", *argv]), out.out)
    assert "| lora | 1,000 | 2,000 (2.00x) | 2,500 (2.50x) | 60% / 5% / 5% |" in after["packing"]
    assert "| iapt | 1,000 | 2,000 (2.00x) | not supported | 60% / 5% / - |" in after["packing"]
    assert "Not measured: iapt packing: TypeError: not yet." in after["packing"]
    assert "length median 118, 90th percentile 250, max 250" in after["packing"]


def test_bench_gpu_writes_its_section_under_its_own_machine(copy, tmp_path, monkeypatch, capsys):
    # A lent GPU machine: the section names it; the page's machine line (the CPU tables') stays.
    import torch

    bench = script_module("bench_gpu")
    gpu_line = "The machine: **16 CPU cores, GPU 1 x NVIDIA H100 80GB HBM3** (AMD EPYC; Linux x86_64)."
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bd, "machine_markdown", lambda: gpu_line)
    monkeypatch.setattr(bench, "peak_flops", lambda device: 1e12)
    monkeypatch.setattr(bench, "free", lambda device: None)
    monkeypatch.setattr(bench, "instruction_set", lambda n, max_length, vocab: [])

    def measure_step(shape, name, args):
        if name.startswith("iapt"):
            raise RuntimeError("CUDA out of\n memory")
        seconds = 0.2 if name.startswith("backbone") else 0.25
        return {"seconds": seconds, "tokens": 2048, "flops": 1e11, "peak_gib": 12.5, "trainable": 1234}

    monkeypatch.setattr(bench, "measure_step", measure_step)
    monkeypatch.setattr(bench, "measure_packing", lambda shape, method, packed, features, args:
                        {"tokens": 3000 if packed else 1000, "seconds": 1.0})
    argv = ["--shapes", "SmolLM2-135M", "--out", str(tmp_path / "bench"), "--doc", str(copy)]
    bench.main(argv)
    out = capsys.readouterr().out
    before, after = bd.sections(PAGE.read_text(encoding="utf-8"), PAGE), bd.sections(copy.read_text(encoding="utf-8"), copy)
    assert {n for n in after if after[n] != before[n]} == {"gpu"}
    command = shlex.join(["python", "scripts/bench_gpu.py", *argv])
    today = datetime.date.today().isoformat()
    assert after["gpu"].startswith(f"\nMeasured {today} by `{command}` on **16 CPU cores, GPU 1 x NVIDIA H100 80GB "
                                   "HBM3** (AMD EPYC; Linux x86_64).\n\n")
    assert "| lora r=8 | 1,234 | 0.2500 | 8,192 | 1.25 | 1.00 | 40% | 12.5 |" in after["gpu"]
    assert "| iapt bottleneck 64 | - | failed | - | - | - | - | - |" in after["gpu"]
    assert "Failed: SmolLM2-135M, iapt bottleneck 64: RuntimeError: CUDA out of memory." in after["gpu"]
    assert "| para | 1,000 | 3,000 | 3.00x |" in after["gpu"]
    assert (tmp_path / "bench" / "gpu.md").read_text() == out


def test_bench_gpu_measures_for_real_on_the_smoke_shape(capsys):
    # The GPU run's code on CPUs (fp32, the tiny shape): a step and packed steps, every method's
    # adapter through the same calls; without CUDA and --smoke it refuses in one line.
    bench = script_module("bench_gpu")
    args = bench.parse_args(["--smoke"])
    assert (args.device.type, args.dtype, args.no_doc, args.shapes) == ("cpu", bench.torch.float32, True, ["tiny"])
    step = bench.safely(bench.measure_step, args, "tiny", "iapt bottleneck 64")
    assert step["seconds"] > 0 and step["trainable"] > 0 and step["tokens"] == 2 * 64
    features = bench.instruction_set(32, 64, 512)
    packed = bench.safely(bench.measure_packing, args, "tiny", "para", True, features)
    padded = bench.safely(bench.measure_packing, args, "tiny", "para", False, features)
    assert packed["tokens"] == padded["tokens"] > 0  # the same examples, padding not counted
    if not bench.torch.cuda.is_available():
        with pytest.raises(SystemExit) as exit_:
            bench.parse_args([])
        assert exit_.value.code == 2 and "no CUDA device here" in capsys.readouterr().err
