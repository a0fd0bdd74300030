"""Token-normalized accumulation: the same global batch gives the same training whether it is
split into micro-batches or over processes. Targets of different lengths (sort vs max) make a
mean of per-batch means differ from the token mean, so these tests would catch it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, compose_config
from peftrun.train.loop import train

COMMON = (
    "trainer.max_steps=12", "trainer.progress=false", "trainer.eval_every=0", "trainer.save_every=0",
    "task.ops=[max,sort,sum]", "task.num_train=256", "task.num_dev=16", "task.num_test=16",
)


def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if json.loads(x)["event"] == "train"]


def assert_same_training(a, b, atol=1e-5):
    for key, tensor in adapter(a).items():
        torch.testing.assert_close(adapter(b)[key], tensor, atol=atol, rtol=0)
    for x, y in zip(losses(a), losses(b), strict=True):
        assert abs(x - y) < atol


def test_micro_batches_equal_one_batch(tmp_path):
    train(compose_config(*COMMON, "trainer.micro_batch_size=16", "trainer.log_every=1"), tmp_path / "one")
    train(compose_config(*COMMON, "trainer.micro_batch_size=4", "trainer.grad_accum=4", "trainer.log_every=1"),
          tmp_path / "accum")
    assert_same_training(tmp_path / "one", tmp_path / "accum")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_two_processes_equal_one(tmp_path):
    """2 processes x batch 8 (gloo on CPU) train what 1 process x batch 16 trains."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = [*COMMON, "trainer.log_every=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "-m", "peftrun", *args, "trainer.micro_batch_size=8",
         "trainer.num_processes=2", f"hydra.run.dir={tmp_path / 'two'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    train(compose_config(*args, "trainer.micro_batch_size=16"), tmp_path / "one")
    assert_same_training(tmp_path / "one", tmp_path / "two")
