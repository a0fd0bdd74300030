"""A run killed after k steps and started again in its folder ends with the same adapter, the
same metrics and the same log as a run that was never interrupted."""

from __future__ import annotations

import json

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
        names = {p.name for p in ckpt.iterdir()}
        assert {"adapter", "optimizer.json", "optimizer.safetensors", "scheduler.json", "trainer_state.json",
                "config.yaml", "rng-0.json", "rng-0.safetensors", "manifest.json"} <= names
        assert not [n for n in names if n.endswith((".pt", ".pkl", ".bin"))], names  # no pickle


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


class SpoilAfter:
    """Adds noise to the adapter after step `step`'s evaluation, so every later evaluation is
    worse and the best adapter is that step's, not the last."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, state):
        if state.step == self.step:
            with torch.no_grad():
                for _, p in state.run.adapter.trainable_parameters():
                    p.add_(torch.randn_like(p))


def measured_dev_loss(cfg, adapter_dir) -> float:
    """The token-mean dev loss of the adapter saved in `adapter_dir`, measured from scratch."""
    from peftrun.data import collate_train, tokenize_examples
    from peftrun.methods import load_adapter
    from peftrun.models import build_model, load_tokenizer
    from peftrun.tasks import build_task
    from peftrun.loss import label_tokens, token_loss_sum

    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer)
    adapter = load_adapter(adapter_dir, model)
    features, _ = tokenize_examples(build_task(cfg.task).examples("dev"), tokenizer, cfg.task.max_length)
    loss, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(features), cfg.trainer.eval_batch_size):
            batch = collate_train(features[i : i + cfg.trainer.eval_batch_size], tokenizer.pad_token_id)
            adapter.set_prompt_mask(batch["prompt_mask"])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss += float(token_loss_sum(logits, batch["labels"]))
            tokens += label_tokens(batch)
    return loss / tokens


def test_the_best_adapter_is_kept_with_the_dev_loss_measured_on_it(tmp_path):
    # The loop reuses the best evaluation's loss instead of measuring again: it must be the loss
    # of the adapter it saves.
    cfg = compose_config("trainer.max_steps=30", "trainer.eval_every=10", "trainer.save_every=0",
                         "trainer.progress=false", "trainer.micro_batch_size=8", "task.num_train=128",
                         "task.num_dev=32", "task.num_test=8")
    summary = train(cfg, tmp_path, extra_callbacks=[SpoilAfter(10)])
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [10, 20, 30]
    assert min(evals, key=lambda e: e["dev_loss"])["step"] == 10  # spoiled after step 10
    assert summary["dev_loss"] == evals[0]["dev_loss"]
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    best = load_file(str(tmp_path / "best" / "adapter_model.safetensors"))
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in saved)
    assert measured_dev_loss(cfg, tmp_path / "adapter") == pytest.approx(summary["dev_loss"], rel=1e-5)

    # Without the best adapter, the last one's loss is measured.
    cfg.trainer.load_best_at_end = False
    last = train(cfg, tmp_path / "last", extra_callbacks=[SpoilAfter(10)])
    assert last["dev_loss"] > summary["dev_loss"]
    assert measured_dev_loss(cfg, tmp_path / "last" / "adapter") == pytest.approx(last["dev_loss"], rel=1e-5)
