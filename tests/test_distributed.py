"""Token-normalized accumulation: the same global batch gives the same training whether it is
split into micro-batches or over processes. Targets of different lengths (sort vs max) make a
mean of per-batch means differ from the token mean, so these tests would catch it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, compose_config, needs_torchrun, run_torchrun
from peftrun.validate import validate
from peftrun.errors import ConfigError
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
        assert abs(x - y) <= atol


def test_micro_batches_equal_one_batch(tmp_path):
    train(compose_config(*COMMON, "trainer.micro_batch_size=16", "trainer.log_every=1"), tmp_path / "one")
    train(compose_config(*COMMON, "trainer.micro_batch_size=4", "trainer.grad_accum=4", "trainer.log_every=1"),
          tmp_path / "accum")
    assert_same_training(tmp_path / "one", tmp_path / "accum")


def torchrun(*args: str) -> None:
    run = run_torchrun(*args)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.slow
@needs_torchrun
def test_two_processes_equal_one(tmp_path):
    """2 processes x batch 8 (gloo on CPU) train what 1 process x batch 16 trains."""
    args = [*COMMON, "trainer.log_every=1"]
    torchrun("-m", "peftrun", *args, "trainer.micro_batch_size=8", "trainer.num_processes=2",
             f"hydra.run.dir={tmp_path / 'two'}")
    train(compose_config(*args, "trainer.micro_batch_size=16"), tmp_path / "one")
    assert_same_training(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
@needs_torchrun
def test_fsdp_shards_the_backbone_trains_as_one_process_and_resumes(tmp_path):
    """trainer.strategy=fsdp on 2 processes: each holds half of the frozen backbone, trains what
    1 process x batch 16 trains (17 dev/test examples: processes get unequal shares and must
    still run the same forwards), and a run resumed from its step-10 checkpoint (sharded
    optimizer state gathered, saved, scattered back) ends with the same adapter."""
    args = [*COMMON, "trainer.log_every=1", "trainer.eval_every=4", "trainer.save_every=5",
            "task.num_dev=17", "task.num_test=17"]
    sharded = [*args, "trainer.micro_batch_size=8", "trainer.strategy=fsdp"]
    torchrun(str(ROOT / "tests" / "ddp_run.py"), "lora", str(tmp_path / "two"), *sharded)
    for rank in (0, 1):
        sizes = json.loads((tmp_path / "two" / f"shard{rank}.json").read_text())
        assert sizes["held"] <= sizes["total"] // 2 + 1024, sizes  # about half (odd sizes round up)
    train(compose_config(*args, "trainer.micro_batch_size=16"), tmp_path / "one")
    assert_same_training(tmp_path / "one", tmp_path / "two")

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    for leftover in ("checkpoints/step-00000012", "adapter", "summary.json"):
        shutil.rmtree(resumed / leftover, ignore_errors=True)
        (resumed / leftover).unlink(missing_ok=True)
    torchrun(str(ROOT / "tests" / "ddp_run.py"), "lora", str(resumed), *sharded)
    assert_same_training(tmp_path / "two", resumed, atol=0)


@pytest.mark.parametrize("overrides,reason", [
    (["trainer.strategy=zero3"], "choose ddp or fsdp"),
    (["method=tied_lora"], "one tensor read by every layer"),
    (["method=alora"], "optimizer moments"),
    (["model.quantization=nf4"], "bitsandbytes-quantized"),
])
def test_fsdp_refuses_what_it_cannot_shard(overrides, reason):
    with pytest.raises(ConfigError, match=reason) as err:
        validate(compose_config("trainer.strategy=fsdp", *overrides))
    assert err.value.key == "trainer.strategy"
