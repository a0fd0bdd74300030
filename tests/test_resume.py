"""A run killed after k steps and started again in its folder ends with the same adapter, the
same metrics and the same log as a run that was never interrupted."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_config
from peftrun.train.checkpoint import checkpoint_dirs
from peftrun.train.loop import train

OVERRIDES = (
    "trainer.max_steps=30", "trainer.save_every=10", "trainer.eval_every=10",
    "trainer.early_stopping_patience=5", "trainer.progress=false", "trainer.micro_batch_size=8",
    "trainer.grad_accum=2", "method.dropout=0.1", "task.num_train=256", "task.num_dev=32",
    "task.num_test=32",
)


class Kill:
    """Stops the run at the end of a step, after that step's checkpoint (if any) was written."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_step_end(self, state):
        if state.step == self.at_step:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    summary = train(compose_config(*OVERRIDES), run_dir)
    return run_dir, summary


@pytest.mark.parametrize("kill_at", [15, 20])
def test_resume_matches_uninterrupted(uninterrupted, tmp_path, kill_at):
    reference_dir, reference = uninterrupted
    cfg = compose_config(*OVERRIDES)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, extra_callbacks=[Kill(kill_at)])
    assert [p.name for p in checkpoint_dirs(tmp_path)][-1] == f"step-{kill_at // 10 * 10:08d}"

    summary = train(cfg, tmp_path)

    expected = load_file(str(reference_dir / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    for key in ("train_loss", "dev_loss", "test_exact_match", "steps"):
        assert summary[key] == reference[key]
    assert (tmp_path / "metrics.jsonl").read_text() == (reference_dir / "metrics.jsonl").read_text()


def test_checkpoints_are_pruned_and_complete(uninterrupted):
    run_dir, _ = uninterrupted
    names = [p.name for p in checkpoint_dirs(run_dir)]
    assert names == ["step-00000020", "step-00000030"]  # save_total_limit=2
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    for ckpt in checkpoint_dirs(run_dir):
        assert {"adapter", "optimizer.pt", "scheduler.pt", "trainer_state.json", "config.yaml", "rng-0.pt"} <= {
            p.name for p in ckpt.iterdir()
        }


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_adapter(tmp_path):
    """A real kill (SIGKILL, no chance to clean up) in the middle of a CLI run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT, run_cli

    args = [*OVERRIDES, "trainer.max_steps=150", "trainer.save_every=5", "trainer.eval_every=0",
            "trainer.early_stopping_patience=0"]
    reference = run_cli(*args, f"hydra.run.dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr

    killed_dir = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "peftrun", *args, f"hydra.run.dir={killed_dir}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed_dir / "checkpoints" / "step-00000010").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "adapter").exists(), "killed before the end"

    resumed = run_cli(*args, f"hydra.run.dir={killed_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert "resume" in resumed.stdout
    expected = load_file(str(tmp_path / "reference" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(killed_dir / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not list((killed_dir / "checkpoints").glob(".tmp-*"))


class Signal:
    """Sends the process a signal in the middle of a step (as a scheduler would)."""

    def __init__(self, at_step: int, signum: int):
        self.at_step, self.signum = at_step, signum

    def on_step_end(self, state):
        if state.step == self.at_step:
            import os

            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_signal_checkpoints_exits_and_resumes(uninterrupted, tmp_path, signame):
    import signal

    reference_dir, reference = uninterrupted
    cfg = compose_config(*OVERRIDES)
    signum = getattr(signal, signame)
    handler_before = signal.getsignal(signum)
    with pytest.raises(SystemExit) as exit_info:
        train(cfg, tmp_path, extra_callbacks=[Signal(13, signum)])
    assert exit_info.value.code == 128 + signum
    # The signal arrived during step 13: the run stopped after step 14 with a checkpoint there
    # (periodic ones are every 10 steps), and wrote no final adapter.
    assert [p.name for p in checkpoint_dirs(tmp_path)][-1] == "step-00000014"
    assert not (tmp_path / "adapter").exists()
    assert signal.getsignal(signum) == handler_before, "the previous handler is back"

    summary = train(cfg, tmp_path)
    expected = load_file(str(reference_dir / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert summary["test_exact_match"] == reference["test_exact_match"]
