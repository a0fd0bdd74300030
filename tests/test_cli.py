"""The `peftrun` command line, end to end: help, --cfg, a run and its folder, a sweep, resuming,
and bad input (exit 2, one line naming the key, nothing written).

Every run passes hydra.run.dir / hydra.sweep.dir under a temporary folder and runs from a
temporary working directory, so nothing is written into the repository.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import run_cli

# A small run: 20 steps, an evaluation and a checkpoint every 10, a few dev/test prompts.
SMALL = (
    "trainer.max_steps=20", "trainer.eval_every=10", "trainer.save_every=10", "trainer.progress=false",
    "task.num_train=256", "task.num_dev=32", "task.num_test=32",
)
# Smaller still, for the sweep's two jobs.
TINY = (
    "trainer.max_steps=4", "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress=false",
    "task.num_train=64", "task.num_dev=16", "task.num_test=16",
)
RANK = 6  # not the default (8), so that config.yaml provably holds what was passed


def files_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_error_line(result, key: str) -> str:
    """Exit 2, stderr exactly one non-empty `peftrun: error: <key>: ...` line, no traceback."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 2, output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr is not one line:\n{result.stderr}"
    line = lines[0]
    assert line.startswith(f"peftrun: error: {key}:"), line
    assert line.removeprefix(f"peftrun: error: {key}:").strip(), line
    return line


# --------------------------------------------------------------------------- help and --cfg
def test_help_lists_groups_and_options(tmp_path):
    r = run_cli("--help", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for word in ("model", "task", "method", "trainer", "tiny", "toy", "lora"):
        assert word in r.stdout
    # the "Groups" section: one `group: option, option, ...` line per group
    groups = dict(m.groups() for m in re.finditer(r"^(model|task|method|trainer): (\S.*)$", r.stdout, re.M))
    assert set(groups) == {"model", "task", "method", "trainer"}, r.stdout
    assert "tiny" in groups["model"] and "toy" in groups["task"] and "lora" in groups["method"]
    assert list(tmp_path.iterdir()) == []


def test_cfg_job_prints_the_config_and_creates_no_folder(tmp_path):
    r = run_cli("--cfg", "job", "method.r=4", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    cfg = OmegaConf.create(r.stdout)
    assert "method:" in r.stdout and "name: lora" in r.stdout
    assert cfg.method.name == "lora" and cfg.method.r == 4 and cfg.model.name == "tiny"
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- a run
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One small run, shared by the tests that inspect, resume and misuse its folder."""
    base = tmp_path_factory.mktemp("e2e")
    run_dir = base / "run"
    args = (*SMALL, f"method.r={RANK}", f"hydra.run.dir={run_dir}")
    result = run_cli(*args, cwd=base)
    adapter = (run_dir / "adapter" / "adapter_model.safetensors")
    return {"args": args, "run_dir": run_dir, "cwd": base, "result": result,
            "adapter_bytes": adapter.read_bytes() if adapter.exists() else None}


@pytest.mark.slow
def test_run_writes_a_complete_folder(finished_run):
    r, run_dir = finished_run["result"], finished_run["run_dir"]
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr

    text = (run_dir / "config.yaml").read_text()
    assert "${" not in text  # resolved
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.method.r == RANK and cfg.method.name == "lora" and cfg.trainer.max_steps == 20

    assert (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    adapter_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert isinstance(adapter_cfg, dict)

    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    kinds = {e["event"] for e in events}
    assert {"train", "eval", "test"} <= kinds, kinds

    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines() if line.strip()]
    assert len(predictions) == 32
    assert {"prompt", "target", "prediction"} <= set(predictions[0])

    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0 <= summary["test_exact_match"] <= 100
    assert summary["tokens_per_second"] > 0
    assert summary["steps"] == 20

    assert "peftrun summary" in r.stdout and "exact match" in r.stdout
    assert [p.name for p in finished_run["cwd"].iterdir()] == ["run"]  # nothing outside the run folder


@pytest.mark.slow
def test_rerunning_a_finished_command_resumes_and_keeps_the_adapter(finished_run):
    assert finished_run["result"].returncode == 0
    run_dir = finished_run["run_dir"]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    r = run_cli(*finished_run["args"], cwd=finished_run["cwd"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resume" in r.stdout.lower()
    assert "Traceback" not in r.stdout + r.stderr
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == finished_run["adapter_bytes"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == checkpoints
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 20


@pytest.mark.slow
def test_folder_with_checkpoints_of_another_config_is_refused(finished_run):
    assert finished_run["result"].returncode == 0
    run_dir = finished_run["run_dir"]
    before = files_bytes(run_dir / "checkpoints")
    config_before = (run_dir / "config.yaml").read_bytes()
    assert before

    args = [a for a in finished_run["args"] if not a.startswith("method.r=")] + ["method.r=4"]
    r = run_cli(*args, cwd=finished_run["cwd"])
    line = assert_one_error_line(r, "hydra.run.dir")
    assert "method.r" in line
    assert files_bytes(run_dir / "checkpoints") == before
    assert (run_dir / "config.yaml").read_bytes() == config_before


# --------------------------------------------------------------------------- a sweep
@pytest.mark.slow
def test_multirun_sweep_writes_one_folder_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli("-m", "trainer.lr=1e-3,3e-3", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    configs = sorted(sweep.glob("*/config.yaml"))  # (checkpoints hold their own copies)
    assert len(configs) == 2, [str(c) for c in configs]
    assert len({c.parent for c in configs}) == 2
    lrs = sorted(OmegaConf.load(c).trainer.lr for c in configs)
    assert lrs == pytest.approx([1e-3, 3e-3])
    for c in configs:
        job = c.parent
        assert (job / "adapter" / "adapter_model.safetensors").exists()
        assert (job / "summary.json").exists()
        # each job's folder is named after its own overrides (Hydra writes the swept value
        # back as a float: trainer.lr=0.001)
        lr = OmegaConf.load(c).trainer.lr
        assert re.search(r"(^|,)trainer\.lr=([^,]+)", job.name), job.name
        assert float(re.search(r"(^|,)trainer\.lr=([^,]+)", job.name).group(2)) == pytest.approx(lr)
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()


# --------------------------------------------------------------------------- bad input
# (id, overrides ({tmp} is the case's folder), the key the error line must name)
BAD_INPUT = [
    ("unknown-option", ["method=nope"], "method"),
    ("unknown-key", ["method.nope=1"], "method.nope"),
    ("wrong-type", ["method.r=abc"], "method.r"),
    ("rank-zero", ["method.r=0"], "method.r"),
    ("no-target-matches", ["method.targets=[nothing]"], "method.targets"),
    ("jsonl-missing-file", ["task=jsonl", "task.train_file={tmp}/missing.jsonl"], "task.train_file"),
    ("jsonl-field-missing", ["task=jsonl", "task.train_file={tmp}/records.jsonl"], "task.prompt_template"),
    ("fp16-without-gpu", ["trainer.precision=fp16"], "trainer.precision"),
    ("unknown-quantization", ["model.quantization=nf5"], "model.quantization"),
    ("batch-too-large", ["trainer.micro_batch_size=4096", "task.num_train=100"], "trainer.micro_batch_size"),
    ("num-processes-mismatch", ["trainer.num_processes=2"], "trainer.num_processes"),
    ("fsdp-tied-tensors", ["method=tied_lora", "trainer.strategy=fsdp"], "trainer.strategy"),
]


def _bad_input_case(folder: Path, overrides: list[str]):
    folder.mkdir(parents=True)
    # records without the default template's `prompt` field
    (folder / "records.jsonl").write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(4)))
    args = [o.format(tmp=folder) for o in overrides]
    run_dir = folder / "run"
    result = run_cli(*args, "trainer.progress=false", f"hydra.run.dir={run_dir}", cwd=folder)
    return result, run_dir, folder


@pytest.fixture(scope="module", autouse=True)
def bad_input_results(request, tmp_path_factory):
    """The selected bad-input cases, started with the module's first test and run one at a time
    in the background, beside the other tests' runs (each case is mostly start-up time)."""
    selected = [item.callspec.params["case_id"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_bad_input_exits_2_with_one_line"
                and item.module is request.module]
    base = tmp_path_factory.mktemp("bad_input")
    table = {case_id: overrides for case_id, overrides, _ in BAD_INPUT}
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield {case_id: pool.submit(_bad_input_case, base / case_id, table[case_id]) for case_id in selected}


@pytest.mark.slow
@pytest.mark.parametrize("case_id,key", [pytest.param(case_id, key, id=case_id) for case_id, _, key in BAD_INPUT])
def test_bad_input_exits_2_with_one_line(bad_input_results, case_id, key):
    result, run_dir, folder = bad_input_results[case_id].result()
    assert_one_error_line(result, key)
    assert not run_dir.exists(), f"{run_dir} holds {sorted(p.name for p in run_dir.rglob('*'))}"
    assert sorted(p.name for p in folder.iterdir()) == ["records.jsonl"]  # nothing written beside it
