"""Sweeps through submitit (the SLURM launcher's code path, run locally): one job per sweep
point in a fixed folder, and several tasks per job forming one data-parallel run."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

from conftest import compose_config, run_cli  # noqa: E402
from peftrun.train.loop import train  # noqa: E402

SMALL = ("trainer.max_steps=10", "trainer.progress=false", "trainer.eval_every=0", "trainer.save_every=0",
         "task.num_train=128", "task.num_dev=16", "task.num_test=16")


def job_folders(sweep_dir):
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.slow
def test_local_submitit_sweep_runs_one_job_per_point(tmp_path):
    r = run_cli("-m", "hydra/launcher=local", f"hydra.sweep.dir={tmp_path}", "trainer.lr=1e-3,3e-3", *SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    jobs = job_folders(tmp_path)
    assert len(jobs) == 2
    lrs = sorted(OmegaConf.load(j / "config.yaml").trainer.lr for j in jobs)
    assert lrs == [1e-3, 3e-3]
    for job in jobs:
        assert (job / "adapter" / "adapter_model.safetensors").exists()
        assert "test_exact_match" in json.loads((job / "summary.json").read_text())
    # The sweep's table, written in the submitting process from the job folders on disk.
    table = (tmp_path / "sweep_summary.csv").read_text().splitlines()
    assert table[0].startswith("job,trainer.lr,status,") and len(table) == 3
    assert all(",ok," in line for line in table[1:]), table


@pytest.mark.slow
def test_two_tasks_per_job_train_like_one_process(tmp_path):
    """tasks_per_node=2 (one task per GPU on a cluster; gloo here) with batch 8 each trains the
    adapter one process trains with batch 16: peftrun exported the distributed environment."""
    sweep = tmp_path / "sweep"
    r = run_cli("-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={sweep}",
                "trainer.num_processes=2", "trainer.micro_batch_size=8", *SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    (job,) = job_folders(sweep)
    train(compose_config(*SMALL, "trainer.micro_batch_size=16"), tmp_path / "one")
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    two = load_file(str(job / "adapter" / "adapter_model.safetensors"))
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0)
