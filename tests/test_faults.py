"""Fault injection (issue 31, "nothing lost"): Ctrl-C at a chosen step, NaN in the loss, the
gradients or the adapter, truncated and missing checkpoint files, a planted pickle payload, and
two runs on one folder. Each ends in one line and a state the next run can use: nothing trained is
lost past the last checkpoint, nothing non-finite or foreign is ever loaded or saved.

Most faults are injected in-process into tiny 12-step runs (about a second each); a few go
through a real `peftrun` process (marked slow) to check the exit code and the single line.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, compose_config, run_cli
from peftrun.errors import ConfigError, RunError
from peftrun.train import loop as loop_module
from peftrun.train.checkpoint import checkpoint_dirs, write_manifest
from peftrun.train.resume_point import check_resumable
from peftrun.train.loop import train
from peftrun.train.runlock import LOCK_FILE, acquire_run_lock, holds_run_lock, release_run_lock

SMALL = ("trainer.max_steps=12", "trainer.save_every=4", "trainer.eval_every=0", "trainer.progress=false",
         "trainer.micro_batch_size=8", "task.num_train=128", "task.num_dev=16", "task.num_test=8",
         "trainer.log_every=1")


def small_cfg(*extra: str):
    return compose_config(*SMALL, *extra)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    x, y = adapter_tensors(a), adapter_tensors(b)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def assert_nothing_nonfinite(run_dir: Path) -> None:
    """Every tensor saved anywhere in the run folder is finite."""
    files = list(run_dir.rglob("*.safetensors"))
    for path in files:
        for name, t in load_file(str(path)).items():
            assert not t.is_floating_point() or torch.isfinite(t).all(), f"{path}: {name} is not finite"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must end up equal to."""
    run_dir = tmp_path_factory.mktemp("reference")
    return run_dir, train(small_cfg(), run_dir)


class At:
    """Calls `action(state)` at the end of step `step` (after that step's checkpoint)."""

    def __init__(self, step: int, action, hook: str = "on_step_end"):
        self.step, self.action = step, action
        setattr(self, hook, self._fire)

    def _fire(self, state):
        if state.step == self.step:
            self.action(state)


def kill(state):
    raise KeyboardInterrupt  # a process killed here: what it saved is all there is


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A run killed after step 8, holding complete checkpoints step-4 and step-8."""
    run_dir = tmp_path_factory.mktemp("killed")
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(), run_dir, extra_callbacks=[At(8, kill)])
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-00000004", "step-00000008"]
    return run_dir


# ============================================================================ Ctrl-C
def test_first_ctrl_c_finishes_the_step_checkpoints_and_exits_130(reference, tmp_path, capsys):
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exit_info:
        train(small_cfg(), tmp_path, extra_callbacks=[At(5, lambda s: os.kill(os.getpid(), signal.SIGINT))])
    assert exit_info.value.code == 130
    # The signal came at the end of step 5: step 6 finished, was checkpointed, and the run stopped.
    assert [p.name for p in checkpoint_dirs(tmp_path)][-1] == "step-00000006"
    assert not (tmp_path / "adapter").exists()
    assert signal.getsignal(signal.SIGINT) == handler_before
    assert not holds_run_lock(tmp_path) and not (tmp_path / LOCK_FILE).exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SIGINT" in err[0] and "resume" in err[0] and "step-00000006" in err[0], err

    train(small_cfg(), tmp_path)  # the same command again resumes to the uninterrupted adapter
    assert_same_adapter(reference[0] / "adapter", tmp_path / "adapter")


def test_second_ctrl_c_aborts_at_once(tmp_path):
    def twice(state):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(), tmp_path, extra_callbacks=[At(5, twice)])
    # Aborted in step 5's callbacks: no step 6, no checkpoint beyond the periodic one.
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000004"]
    assert not holds_run_lock(tmp_path)


def wait_for_steps(run_dir: Path, proc: subprocess.Popen, steps: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count('"train"') >= steps):
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "the run did not start in time"
        time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_in_a_real_run_one_line_130_then_a_second_aborts(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "peftrun", *SMALL, "trainer.max_steps=100000", "trainer.save_every=0",
            f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(run_dir, proc, 3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "run the same command again to resume" in lines[0], err
    saved = checkpoint_dirs(run_dir)
    assert len(saved) == 1 and not (run_dir / "adapter").exists()

    # Two Ctrl-C, the second while the step is still being finished, abort at once: one line, no
    # traceback, no checkpoint. The step (256 micro-batches) takes about 1 s on a fast CPU, and
    # the signals go 50 ms apart right after a step ends: the second cannot miss the step.
    run_dir = tmp_path / "aborted"
    args = [*args[:-1], "task.num_train=2048", "trainer.grad_accum=256", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(run_dir, proc, 2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)  # (two signals at one instant arrive as one)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftrun: interrupted"), err
    assert checkpoint_dirs(run_dir) == []


def test_ctrl_c_after_the_run_exits_130_without_a_traceback():
    """A Ctrl-C that lands once the run is over, as the interpreter shuts down (a quick first
    Ctrl-C's stop done, a second one late), ends the process at once: 130, no traceback from the
    exit hooks still to run."""
    script = """if True:
        import atexit, os, signal, sys, time
        from peftrun import cli
        atexit.register(print, "exit hooks ran")  # the libraries' hooks run after main, like this one
        sys.argv = ["peftrun", "method=no_such_method"]
        try:
            cli.main()
        finally:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    """
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and "exit hooks ran" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("peftrun: error:"), proc.stderr  # the run's own line


# ============================================================================ non-finite
def poisoned_loss(monkeypatch, at_steps: set[int]):
    """The training loss of the given steps (1-based) turns NaN."""
    real = loop_module.labelled_loss_sum
    calls = {"n": 0}

    def loss(model, batch, kept):
        value = real(model, batch, kept)
        if model.training:
            calls["n"] += 1
            if calls["n"] in at_steps:
                return value * float("nan")
        return value

    monkeypatch.setattr(loop_module, "labelled_loss_sum", loss)


def test_nan_loss_stops_the_run_and_saves_no_nan(tmp_path, monkeypatch):
    poisoned_loss(monkeypatch, {7})
    with pytest.raises(RunError) as err:
        train(small_cfg(), tmp_path)
    assert err.value.key == "trainer.lr" and "step 7" in str(err.value) and "nan" in str(err.value)
    assert "\n" not in str(err.value)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000004"]  # the last finite one stays
    assert not (tmp_path / "adapter").exists()
    assert_nothing_nonfinite(tmp_path)


def test_nonfinite_gradient_stops_the_run(tmp_path):
    def poison_next_gradient(state):
        _, p = state.run.adapter.trainable_parameters()[0]
        handle = p.register_hook(lambda g: (handle.remove(), g * float("inf"))[1])

    with pytest.raises(RunError) as err:
        train(small_cfg(), tmp_path, extra_callbacks=[At(5, poison_next_gradient)])
    assert "step 6" in str(err.value) and "gradient norm" in str(err.value)
    assert not (tmp_path / "adapter").exists()
    assert_nothing_nonfinite(tmp_path)


def test_bounded_skips_of_nonfinite_steps(reference, tmp_path, monkeypatch):
    poisoned_loss(monkeypatch, {3, 9})
    summary = train(small_cfg("trainer.max_nonfinite_skips=2"), tmp_path / "skipped")
    assert summary["steps"] == 12
    events = [json.loads(line) for line in (tmp_path / "skipped" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "nonfinite_skip"] == [3, 9]
    assert_nothing_nonfinite(tmp_path / "skipped")

    poisoned_loss(monkeypatch, {2, 4, 6})  # a third one is one too many
    with pytest.raises(RunError, match="step 6"):
        train(small_cfg("trainer.max_nonfinite_skips=2"), tmp_path / "stopped")
    assert_nothing_nonfinite(tmp_path / "stopped")


def test_a_nonfinite_adapter_is_never_written(tmp_path):
    """NaN that slips past the step (here: written into the adapter after its evaluation) is
    caught where tensors are saved: best/ keeps the finite adapter, no checkpoint is written."""
    def poison(state):
        with torch.no_grad():
            state.run.adapter.trainable_parameters()[0][1].fill_(float("nan"))

    with pytest.raises(RunError, match="not saved"):
        train(small_cfg("trainer.eval_every=4"), tmp_path, extra_callbacks=[At(4, poison, "on_evaluate")])
    assert (tmp_path / "best" / "adapter_model.safetensors").exists()
    assert checkpoint_dirs(tmp_path) == [] and not (tmp_path / "adapter").exists()
    assert_nothing_nonfinite(tmp_path)


def test_a_diverging_learning_rate_stops_the_run(tmp_path):
    with pytest.raises(RunError) as err:
        train(small_cfg("trainer.lr=1e30"), tmp_path)
    assert "diverged at step" in str(err.value) and "trainer.lr" in str(err.value)
    assert_nothing_nonfinite(tmp_path)


@pytest.mark.slow
def test_a_diverging_run_ends_in_one_line_exit_1(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(*SMALL, "trainer.lr=1e30", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftrun: error: trainer.lr: training diverged at step"), lines
    assert not (run_dir / "adapter").exists()
    assert_nothing_nonfinite(run_dir)


# ============================================================================ incomplete checkpoints
def corrupt(folder: Path, how: str) -> None:
    if how == "truncated-adapter":
        path = folder / "adapter" / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty-optimizer":
        (folder / "optimizer.safetensors").write_bytes(b"")
    elif how == "missing-progress":
        (folder / "trainer_state.json").unlink()
    elif how == "missing-manifest":
        (folder / "manifest.json").unlink()
    elif how == "flipped-byte":
        path = folder / "optimizer.json"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif how == "truncated-manifest":
        path = folder / "manifest.json"
        path.write_bytes(path.read_bytes()[:40])
    else:
        raise ValueError(how)


CORRUPTIONS = ["truncated-adapter", "empty-optimizer", "missing-progress", "missing-manifest", "flipped-byte",
               "truncated-manifest"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_bad_newest_checkpoint_is_set_aside(killed_run, tmp_path, how, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(killed_run, run_dir)
    corrupt(run_dir / "checkpoints" / "step-00000008", how)
    assert check_resumable(run_dir, small_cfg()) == run_dir / "checkpoints" / "step-00000004"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peftrun: warning: checkpoint step-00000008 is incomplete"), err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["bad-step-00000008", "step-00000004"]


def test_no_complete_checkpoint_is_one_line_and_nothing_moves(killed_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(killed_run, run_dir)
    corrupt(run_dir / "checkpoints" / "step-00000008", "missing-progress")
    corrupt(run_dir / "checkpoints" / "step-00000004", "truncated-adapter")
    with pytest.raises(ConfigError) as err:
        train(small_cfg(), run_dir)
    assert err.value.key == "hydra.run.dir" and "no complete checkpoint" in str(err.value)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]


class Payload:
    """Unpickling this creates the folder `marker`: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_resume_after_a_truncated_checkpoint_reads_no_pickle(reference, killed_run, tmp_path, capsys):
    """The newest checkpoint is truncated; the one before carries a pickle payload (listed in its
    manifest, so it is "complete"). The run resumes from it to the uninterrupted adapter and the
    payload never runs: nothing in a checkpoint is unpickled."""
    run_dir = tmp_path / "run"
    shutil.copytree(killed_run, run_dir)
    corrupt(run_dir / "checkpoints" / "step-00000008", "truncated-adapter")
    marker = tmp_path / "payload_ran"
    older = run_dir / "checkpoints" / "step-00000004"
    for name in ("optimizer.pt", "scheduler.pt", "rng-0.pt"):
        (older / name).write_bytes(pickle.dumps(Payload(marker)))
    write_manifest(older)
    train(small_cfg(), run_dir)
    assert not marker.exists(), "a pickle in the checkpoint was loaded"
    assert_same_adapter(reference[0] / "adapter", run_dir / "adapter")
    assert "set aside" in capsys.readouterr().err


def test_a_pickle_checkpoint_is_refused_unloaded(killed_run, tmp_path):
    """A checkpoint in the old pickle format (or one dressed up as it) is refused in one line,
    never unpickled, even with weights_only=False nowhere in reach."""
    run_dir = tmp_path / "run"
    shutil.copytree(killed_run, run_dir)
    marker = tmp_path / "payload_ran"
    newest = run_dir / "checkpoints" / "step-00000008"
    for name in ("optimizer.json", "optimizer.safetensors", "manifest.json"):
        (newest / name).unlink()
    torch.save({"state": Payload(marker)}, newest / "optimizer.pt")
    with pytest.raises(ConfigError) as err:
        train(small_cfg(), run_dir)
    assert err.value.key == "hydra.run.dir" and "pickle" in str(err.value)
    assert not marker.exists()


def test_a_pickle_in_place_of_safetensors_does_not_load(killed_run, tmp_path):
    """Someone swaps the optimizer tensors for a pickle and rewrites the manifest to match: the
    file is read as safetensors (which it is not) and refused; the payload never runs."""
    run_dir = tmp_path / "run"
    shutil.copytree(killed_run, run_dir)
    marker = tmp_path / "payload_ran"
    newest = run_dir / "checkpoints" / "step-00000008"
    (newest / "optimizer.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    write_manifest(newest)
    with pytest.raises(ConfigError) as err:
        train(small_cfg(), run_dir)
    assert err.value.key == "hydra.run.dir" and "does not load" in str(err.value)
    assert not marker.exists()


# ============================================================================ two runs, one folder
HOLD = ("import sys, time; from pathlib import Path; from peftrun.train.runlock import acquire_run_lock; "
        "acquire_run_lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)")


@pytest.fixture
def holder(tmp_path):
    """Another process holding the run folder tmp/run (as a live run does)."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield run_dir, proc
    proc.kill()
    proc.wait()


def test_a_second_run_on_a_locked_folder_is_refused(holder):
    run_dir, proc = holder
    (run_dir / "checkpoints" / ".tmp-step-00000004").mkdir(parents=True)  # the live run's, half written
    with pytest.raises(ConfigError) as err:
        train(small_cfg(), run_dir)
    assert err.value.key == "hydra.run.dir" and f"pid {proc.pid}" in str(err.value)
    # Nothing of the live run was touched, nothing written.
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == \
        [LOCK_FILE, "checkpoints", "checkpoints/.tmp-step-00000004"]

    proc.kill()  # the holder dies: the kernel releases its lock
    proc.wait()
    acquire_run_lock(run_dir)
    assert (run_dir / LOCK_FILE).read_text().strip() == str(os.getpid())
    release_run_lock(run_dir)
    assert not (run_dir / LOCK_FILE).exists()


@pytest.mark.slow
def test_a_second_peftrun_on_a_locked_folder_exits_2_naming_the_pid(holder, tmp_path):
    run_dir, proc = holder
    result = run_cli(*SMALL, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftrun: error: hydra.run.dir:") and f"pid {proc.pid}" in lines[0]
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]
