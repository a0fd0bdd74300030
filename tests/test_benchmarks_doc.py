"""docs/benchmarks.md is written by the bench scripts (scripts/benchmarks_doc.py): the writer
replaces one marked section and nothing else, and every section a script writes is marked on the
page. The scripts' own runs are faked here (their measurements take minutes): what is checked is
that each one writes, into a copy of the page, the table it prints."""

from __future__ import annotations

import ast
import datetime
import importlib
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
BENCH_SCRIPTS = ("bench_train", "bench_alora", "bench_multitenant", "bench_quality", "bench_smollm2")


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


def test_bench_alora_writes_its_table(copy, monkeypatch, capsys):
    bench = script_module("bench_alora")

    class Adapter:
        def live_ranks(self):
            return [0, 1, 2]

        def importance_naive(self, batch):
            return {0: 1.0, 1: 2.0, 2: 3.0}

        def importance(self, batch, ablations_per_forward):
            return {0: 1.0, 1: 2.0, 2: 3.0 + 1e-7}

    monkeypatch.setattr(bench, "setup", lambda model, dev_batch: (Adapter(), None))
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / "bench_alora.py"), "--repeats", "1", "--doc", str(copy)])
    bench.main()
    out = capsys.readouterr()
    assert out.out.startswith("| tiny, 3 open ranks, dev batch 32 | seconds per round |\n|---|---:|\n")
    assert "bench_alora.py: wrote alora-scoring, machine into" in out.err
    check_written(copy, ["alora-scoring"], shlex.join(["python", "scripts/bench_alora.py", "--repeats", "1", "--doc",
                                                       str(copy)]), out.out)

    # --no-doc: the page is left alone.
    before = copy.read_bytes()
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / "bench_alora.py"), "--no-doc", "--doc", str(copy)])
    bench.main()
    assert copy.read_bytes() == before and "wrote" not in capsys.readouterr().err


def test_bench_alora_refuses_a_page_without_markers_before_measuring(tmp_path, monkeypatch, capsys):
    bench = script_module("bench_alora")
    doc = page(tmp_path)
    monkeypatch.setattr(bench, "setup", lambda *a: pytest.fail("measured before checking the page"))
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
        return {"name": name, "seconds": 0.1 + 0.01 * len(name), "peak_rss_mib": 500.0, "trainable": 1234}

    monkeypatch.setattr(bench, "run_child", run_child)
    monkeypatch.setattr(bench, "bar_chart", lambda *a, **k: None)
    argv = ["--steps", "2", "--warmup", "1", "--out", str(tmp_path / "bench"), "--doc", str(copy)]
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / "bench_train.py"), *argv])
    bench.main()
    out = capsys.readouterr().out
    command = shlex.join(["python", "scripts/bench_train.py", *argv])
    after = check_written(copy, ["train", "train-alora-runs"], command, out)
    assert "median of 2 steps after 1 warm-up steps" in after["train"]
    assert "= 1.50x;" in after["train-alora-runs"] and "| configuration |" not in after["train-alora-runs"]
    assert (tmp_path / "bench" / "train.md").read_text() == out


def test_bench_multitenant_writes_its_table(copy, tmp_path, monkeypatch, capsys):
    bench = script_module("bench_multitenant")
    monkeypatch.setattr(bench, "build", lambda label, args: (None, None, list(range(100))))
    monkeypatch.setattr(bench, "run_once", lambda *a: (0.05, 100.0))
    monkeypatch.setattr(bench, "bar_chart", lambda *a, **k: None)
    argv = ["--tenants", "1", "2", "--prompts", "16", "--repeats", "1", "--threads", "0",
            "--methods", "lora r=8", "--out", str(tmp_path / "bench"), "--doc", str(copy)]
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / "bench_multitenant.py"), *argv])
    bench.main()
    out = capsys.readouterr().out
    after = check_written(copy, ["multitenant"], shlex.join(["python", "scripts/bench_multitenant.py", *argv]), out)
    assert "| lora r=8 | 2 | 16 | 50 | 1.00 | 100 | 1.00 |" in after["multitenant"]


def fake_quality_runs(bench, monkeypatch):
    info = {"args": {"hidden": 32, "layers": 1, "probes": 4}, "parameters": 12345, "tokens": 2048,
            "train_seconds": 6.0, "heldout_loss": {"all": 1.2345}, "heldout_loss_unit": "token",
            "skill_accuracy": {"lookup": 50.0, "copy": 25.0, "story": 0.0}}
    monkeypatch.setattr(bench, "ensure_backbone", lambda args, scratch: ("/nowhere", info))
    monkeypatch.setattr(bench, "count", lambda label, k, overrides: 55296)
    monkeypatch.setattr(bench, "match_budget", lambda label, budget, overrides: (4, 55296))
    monkeypatch.setattr(bench, "zero_shot", lambda args, task, overrides: {
        "test_accuracy": 0.5, "primary_metric": "test_accuracy", "wall_seconds": 1.0, "examples": ["x"]})

    def run_all(args, jobs, sizes, runs_root, overrides):
        for job in jobs:
            yield job, {"test_accuracy": 90.0 + job[2], "dev_loss": job[3] * 10, "train_seconds": 2.0,
                        "wall_seconds": 2.5}

    monkeypatch.setattr(bench, "run_all", run_all)
    monkeypatch.setattr(bench, "plot", lambda *a: (Path(a[-1]) / "quality.png").write_bytes(b""))


def test_bench_quality_writes_the_backbone_and_results(copy, tmp_path, monkeypatch, capsys):
    bench = script_module("bench_quality")
    fake_quality_runs(bench, monkeypatch)
    argv = ["--tasks", "synth_sentiment", "--methods", "lora,para", "--seeds", "0,1", "--out", str(tmp_path / "q"),
            "--doc", str(copy)]
    bench.main(argv)
    out = capsys.readouterr().out
    after = check_written(copy, ["quality-backbone", "quality"],
                          shlex.join(["python", "scripts/bench_quality.py", *argv]), out.split("# Quality", 1)[1])
    assert "| 1.234 | 50% | 25% | 0% |" in after["quality-backbone"]
    assert "| held-out LM loss | facts | copying | two-step stories |" in after["quality-backbone"]
    assert "**synth_sentiment**" in after["quality"] and "## synth_sentiment" in out
    assert not re.search(r"(?m)^#", after["quality"])  # no headings of its own inside the page's
    assert "| lora | r=4 | 55,296 | 90.5 ± 0.7 | 90.0 / 91.0 | 2 | 2 |" in after["quality"]


def test_bench_quality_sweep_writes_the_learning_rates(copy, tmp_path, monkeypatch, capsys):
    bench = script_module("bench_quality")
    fake_quality_runs(bench, monkeypatch)
    argv = ["--sweep-lr", "1e-3,1e-2", "--tasks", "synth_qa", "--methods", "lora", "--out", str(tmp_path / "q"),
            "--doc", str(copy)]
    bench.main(argv)
    out = capsys.readouterr().out
    after = check_written(copy, ["quality-lr"], shlex.join(["python", "scripts/bench_quality.py", *argv]), out)
    assert "| lora | 0.010 | 0.100 | 0.001 |" in after["quality-lr"]
    steps = bench.TASK_STEPS["synth_qa"]
    assert f"\nLearning rates for bench_quality.py: best dev loss after synth_qa {steps} steps, seed 0.\n\n| method |" \
        in after["quality-lr"]


def test_bench_quality_smoke_writes_a_throwaway_copy(tmp_path):
    bench = script_module("bench_quality")
    args = bench.parse_args(["--smoke"])
    doc = bench.doc_path(args, tmp_path)
    assert doc.parent == tmp_path and doc.read_bytes() == PAGE.read_bytes()
    assert bench.doc_path(bench.parse_args([]), tmp_path) == PAGE
    assert bench.doc_path(bench.parse_args(["--no-doc"]), tmp_path) is None
    assert bench.doc_path(bench.parse_args(["--smoke", "--doc", "x.md"]), tmp_path) == Path("x.md")


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
