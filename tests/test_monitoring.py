"""Seeing what a run is doing (issue 32): experiment trackers read back from their files, the
learning curves PNG, console lines with and without a terminal, per-group metric names that
cannot be misread, and a sweep's summary table over its jobs."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import struct
from pathlib import Path

import pytest
from rich.console import Console

from conftest import compose_config, run_cli
from peftrun.errors import ConfigError

SMALL = ("trainer.max_steps=4", "trainer.eval_every=2", "trainer.generate_every=2", "trainer.log_every=1",
         "trainer.save_every=0", "trainer.progress=false", "task.num_train=64", "task.num_dev=8", "task.num_test=8",
         "trainer.micro_batch_size=16")
TRACKERS = [name for name, module in (("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb"))
            if importlib.util.find_spec(module) is not None]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, from its IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ============================================================================ a run with trackers
@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One small run logging to every tracker installed here (offline: no account, no network)."""
    from peftrun.train.loop import train

    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "WANDB_PROJECT"):
            mp.delenv(var, raising=False)
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # restored afterwards; the run sets it itself
        mp.delenv("MLFLOW_ALLOW_FILE_STORE")
        wandb_home = run_dir.parent / "wandb-home"
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_CONSOLE", "off")
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(wandb_home))
        cfg = compose_config(*SMALL, f"trainer.report_to=[{','.join(TRACKERS)}]")
        summary = train(cfg, run_dir)
        if "wandb" in TRACKERS:
            import wandb

            wandb.teardown()  # its service process ends with the run's tracker, not the test session
    return run_dir, summary


def test_per_group_metrics_are_named_for_their_group(tracked_run):
    run_dir, summary = tracked_run
    assert {"test_exact_match", "test_exact_match[op=max]", "test_exact_match[op=min]"} <= set(summary)
    assert not any(k.endswith(("_max", "_min")) for k in summary)
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["test_exact_match[op=max]"] == summary["test_exact_match[op=max]"]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train] == [1, 2, 3, 4]
    assert all(math.isfinite(e["grad_norm"]) and e["grad_norm"] > 0 for e in train)
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4] and all("dev_exact_match[op=max]" in e for e in evals)


def test_curves_png_is_written_at_the_end_of_a_run(tracked_run):
    run_dir, _ = tracked_run
    # loss, learning rate, and the task metric (measured at dev evaluations): 3 panels of 250 px
    assert png_size(run_dir / "curves.png") == (800, 750)


@pytest.mark.skipif("tensorboard" not in TRACKERS, reason="tensorboard is not installed (pip install tensorboard)")
def test_tensorboard_event_files_read_back(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, summary = tracked_run
    logdir = run_dir / "tensorboard" / "peftrun"
    events = EventAccumulator(str(logdir)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second", "dev/loss",
            "dev/exact_match", "dev/exact_match[op=max]", "test/exact_match", "test/dev_loss"} <= tags, tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("dev/loss")] == [2, 4]
    assert events.Scalars("test/exact_match")[-1].value == pytest.approx(summary["test_exact_match"])
    hparams = list(logdir.glob("*/hparams.yml"))  # the resolved config
    assert hparams and "trainer.lr" in hparams[0].read_text()


@pytest.mark.skipif("mlflow" not in TRACKERS, reason="mlflow is not installed (pip install mlflow-skinny)")
def test_mlflow_file_store_reads_back(tracked_run):
    from mlflow.tracking import MlflowClient

    run_dir, summary = tracked_run
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
        (experiment,) = [e for e in client.search_experiments() if e.name == "peftrun"]
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.info.run_name == run_dir.name
        metrics, params = run.data.metrics, run.data.params
        assert {"train/loss", "train/lr", "train/grad_norm", "dev/loss", "dev/exact_match",
                "test/exact_match", "test/exact_match.op:max"} <= set(metrics), metrics
        assert metrics["test/exact_match"] == pytest.approx(summary["test_exact_match"])
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]
        assert float(params["trainer.lr"]) == pytest.approx(3e-3) and params["method.name"] == "lora"


@pytest.mark.skipif("wandb" not in TRACKERS, reason="wandb is not installed (pip install wandb)")
def test_wandb_offline_needs_no_account(tracked_run):
    run_dir, _ = tracked_run
    (record,) = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    data = record.read_bytes()
    for key in (b"train/loss", b"dev/loss", b"test/exact_match", b"trainer.lr"):
        assert key in data, key


def test_report_to_refuses_unknown_and_missing_trackers(monkeypatch):
    from peftrun import validate

    with pytest.raises(ConfigError, match="unknown tracker 'nope'") as err:
        validate.check_trackers(["nope"])
    assert err.value.key == "trainer.report_to"
    monkeypatch.setitem(validate.TRACKERS, "wandb", (("surely_not_a_module_here",), "peftrun[wandb]"))
    with pytest.raises(ConfigError, match=r"wandb is not installed; pip install 'peftrun\[wandb\]'"):
        validate.check_trackers("wandb")  # one name alone is a list of one
    validate.check_trackers([])
    # as the command line composes it
    with pytest.raises(ConfigError, match="not installed"):
        validate.check_trainer(compose_config("trainer.report_to=wandb"))


# ============================================================================ curves, console, names
def test_curves_without_dev_metrics_have_two_panels(tmp_path):
    from peftrun.train.curves import write_curves

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in [
        *({"event": "train", "step": s, "loss": 3.0 / s, "lr": 1e-3 * (1 - s / 10)} for s in range(1, 11)),
        {"event": "eval", "step": 5, "dev_loss": 1.0, "best_dev_loss": 1.0},
        {"event": "test", "step": 10, "exact_match": 50.0},
    ]) + "not json: a line cut by a kill")
    assert png_size(write_curves(log, tmp_path / "curves.png", "exact_match", "lora - run")) == (800, 500)


def fake_state(step: int, **kw):
    from peftrun.train.state import TrainState

    state = TrainState(total_steps=100, steps_per_epoch=50, step=step, train_loss=1.25, grad_norm=0.5,
                       tokens_seen=1000 * step, train_seconds=0.5 * step)
    for key, value in kw.items():
        setattr(state, key, value)
    return state


def drive(progress) -> None:
    progress.on_train_start(fake_state(0))
    for step in range(1, 21):
        progress.on_step_end(fake_state(step))
    progress.on_evaluate(fake_state(20, dev_loss=0.75, best_dev_loss=0.75, best_step=20, is_best=True,
                                    metrics={"exact_match": 50.0, "exact_match[op=max]": 40.0}, metrics_step=20))
    progress.on_evaluate(fake_state(30, dev_loss=0.8, best_dev_loss=0.75, best_step=20, is_best=False,
                                    metrics={"exact_match": 50.0}, metrics_step=20))
    with progress.generation("test", 10) as advance:
        advance(10)
    progress.on_train_end(fake_state(20))


def test_without_a_terminal_a_plain_line_every_log_every_steps():
    from peftrun.train.callbacks import Progress

    out = io.StringIO()
    drive(Progress(True, Console(file=out, force_terminal=False, width=60), every=10))
    lines = out.getvalue().splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["10/100", "20/100"]
    assert "loss 1.2500" in steps[0] and "grad norm 0.5" in steps[0] and "2,000 tokens/s" in steps[0]
    assert steps[0].endswith("0:00:45 left")  # 0.5 s a step, 90 steps to go; one line despite width 60
    evals = [line for line in lines if line.startswith("eval ")]
    assert evals[0] == "eval step 20/100: dev loss 0.7500 (new best); dev exact_match 50.00, exact_match[op=max] 40.00"
    assert evals[1] == "eval step 30/100: dev loss 0.8000 (best 0.7500 at step 20)"  # no stale metrics
    assert lines[-1].startswith("test generation: 10 prompts in ")


def test_on_a_terminal_the_bar_and_the_evaluation_lines():
    from peftrun.train.callbacks import Progress

    out = io.StringIO()
    progress = Progress(True, Console(file=out, force_terminal=True, width=120), every=10)
    progress.interactive = True  # whatever TERM says here
    drive(progress)
    text = out.getvalue()
    assert "eval step 20/100: dev loss 0.7500 (new best)" in text and "exact_match[op=max] 40.00" in text
    assert "step 10/100  loss" not in text  # the bar, not plain lines
    quiet = io.StringIO()
    drive(Progress(False, Console(file=quiet, force_terminal=False), every=10))  # trainer.progress=false
    assert [line.split(":")[0] for line in quiet.getvalue().splitlines()] == ["eval step 20/100", "eval step 30/100"]


def test_the_summary_table_spells_the_group_of_a_metric():
    from peftrun.train.summary import metric_label, summary_table

    assert metric_label("exact_match[op=max]") == "exact match [op=max]"
    out = io.StringIO()
    Console(file=out, width=120).print(summary_table({
        "method": "lora", "trainable_params": 10, "steps": 2, "train_loss": 1.0, "dev_loss": 1.0,
        "test_exact_match": 93.0, "test_exact_match[op=max]": 90.83, "test_exact_match[op=min]": 95.6,
        "tokens_per_second": 1.0, "peak_memory_mb": 1.0, "adapter_dir": "x"}))
    assert "exact match [op=max] (test)" in out.getvalue() and "exact match [op=min] (test)" in out.getvalue()


# ============================================================================ sweeps
def test_sweep_summary_from_job_folders(tmp_path):
    """The table from folders alone: a finished job, a failed one (error.txt), one killed
    (neither) and one that left no folder."""
    from peftrun.train.sweep import job_row, write_sweep_summary

    def job(name, summary=None, error=None):
        folder = tmp_path / name
        folder.mkdir()
        if summary is not None:
            (folder / "summary.json").write_text(json.dumps(summary))
        if error is not None:
            (folder / "error.txt").write_text(error + "\n")
        return folder

    ok = {"steps": 2, "train_loss": 1.5, "dev_loss": 1.25, "test_exact_match": 80.0, "primary_metric": "test_exact_match",
          "test_exact_match[op=max]": 70.0, "tokens_per_second": 100.0, "train_seconds": 2.0}
    jobs = [(0, ["trainer.lr=0.001", "trainer.max_steps=2"], job("a", summary=ok)),
            (1, ["trainer.lr=0.01", "trainer.max_steps=2"], job("b", error="trainer.lr: training diverged at step 1")),
            (2, ["trainer.lr=0.1", "trainer.max_steps=2"], job("c")),
            (3, ["trainer.lr=1.0", "trainer.max_steps=2"], tmp_path / "d"),
            (4, ["trainer.lr=2.0", "trainer.max_steps=2"], job("e"))]
    # e was killed (submitit's log, found by the folder the run printed first)
    logs = tmp_path / ".submitit" / "17"
    logs.mkdir(parents=True)
    (logs / "17_0_log.out").write_text(f"run folder {(tmp_path / 'e').absolute()}\nstep 1/2\n")
    (logs / "17_0_log.err").write_text("slurmstepd: error: *** JOB 17 CANCELLED DUE TO TIME LIMIT ***\n")
    rows = [job_row(tmp_path, *j) for j in jobs]
    md, csv_path, png = write_sweep_summary(tmp_path, rows)
    text = md.read_text()
    assert "| job | trainer.lr | status | steps | train_loss | dev_loss | test_exact_match |" in text
    assert "trainer.max_steps" not in text.split("|---")[0]  # only the overrides that differ
    assert "| 0 | 0.001 | ok | 2 | 1.5000 | 1.2500 | 80.00 | 70.00 |" in text
    assert "- job 1 (`b`): trainer.lr: training diverged at step 1" in text
    assert "- job 2 (`c`): no summary.json or error.txt" in text and "- job 3 (`d`): the job left no folder" in text
    assert "- job 4 (`e`): slurmstepd: error: *** JOB 17 CANCELLED DUE TO TIME LIMIT ***" in text
    table = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert [r["status"] for r in table] == ["ok", "failed", "failed", "failed", "failed"]
    assert table[0]["test_exact_match"] == "80.0" and table[1]["error"].startswith("trainer.lr: training diverged")
    assert png_size(png)[0] > 0


@pytest.mark.slow
def test_a_sweep_ends_with_one_table_over_its_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli("-m", "trainer.lr=1e-3,1e-2,1e30", "trainer.max_steps=2", "trainer.eval_every=0",
                "trainer.save_every=0", "trainer.progress=false", "task.num_train=32", "task.num_dev=8",
                "task.num_test=8", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    # the diverging job fails and says why; the others still run; the sweep exits 1 at the end
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("peftrun: error: 1 of 3 sweep jobs failed")
    rows = list(csv.DictReader(io.StringIO((sweep / "sweep_summary.csv").read_text())))
    assert [(r["trainer.lr"], r["status"]) for r in rows] == [("0.001", "ok"), ("0.01", "ok"), ("1e+30", "failed")]
    assert rows[0]["steps"] == "2" and float(rows[0]["train_loss"]) > 0 and 0 <= float(rows[0]["test_exact_match"]) <= 100
    assert "training diverged at step" in rows[2]["error"]
    assert (sweep / rows[2]["folder"] / "error.txt").read_text().startswith("trainer.lr: training diverged")
    text = (sweep / "sweep_summary.md").read_text()
    assert "| job | trainer.lr | status |" in text and "test_exact_match[op=max]" in text
    assert png_size(sweep / "sweep_summary.png")[0] >= 600
    for row in rows[:2]:
        assert png_size(sweep / row["folder"] / "curves.png") == (800, 500)
