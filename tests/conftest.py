"""Shared fixtures: configs composed from the shipped peftrun/conf/, tiny models, a toy batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "peftrun" / "conf"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# `make test` runs one pytest worker per core (pytest-xdist): one torch thread per process, here
# and in the runs tests start, or the workers' OpenMP teams fight over the cores. Tiny models gain
# nothing from a second thread anyway.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"
torch.set_num_threads(1)


def compose_config(*overrides: str):
    """The config `peftrun <overrides>` would run with."""
    import peftrun.cli  # noqa: F401  (schemas and resolvers)

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def tiny_model(name: str = "tiny"):
    from peftrun.models import build_model, load_tokenizer

    cfg = compose_config(f"model={name}")
    tokenizer = load_tokenizer(cfg.model)
    return build_model(cfg.model, tokenizer), tokenizer


def toy_batch(tokenizer, n: int = 8):
    from peftrun.data import collate_train, tokenize_examples
    from peftrun.tasks import build_task

    cfg = compose_config()
    examples = build_task(cfg.task).examples("train")[:n]
    features, _ = tokenize_examples(examples, tokenizer, cfg.task.max_length)
    return collate_train(features, tokenizer.pad_token_id)


def assert_close_in_fp32(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    """`actual` equals `expected` up to float32 rounding of another order of summation: within
    1e-4 relatively and 1e-5 of `expected`'s largest magnitude (a fixed atol, such as 1e-6 on
    gradients of scale 1, fails on near-zero elements on some CPUs and not on others)."""
    atol = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol, msg=msg)


def untrained_exact_match(cfg) -> float:
    """Test exact match of `cfg`'s backbone with no adapter: the floor a method must beat."""
    from peftrun.generate import generate
    from peftrun.models import build_model, load_tokenizer
    from peftrun.tasks import build_task

    tokenizer = load_tokenizer(cfg.model)
    task = build_task(cfg.task)
    test = task.examples("test")
    predictions = generate(build_model(cfg.model, tokenizer), tokenizer, None, [e.prompt for e in test],
                           max_new_tokens=cfg.task.max_new_tokens)
    return task.score(predictions, test)["exact_match"]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`peftrun ARGS` in a subprocess (progress bar off)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "peftrun", *args],
        cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


TORCHRUN = Path(sys.executable).with_name("torchrun")
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="no torchrun")


def run_torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS`: two CPU processes over gloo, one OpenMP
    thread each (set above). `--standalone` takes a free rendezvous port, so runs started by
    parallel test workers do not collide on torchrun's default one."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def call_main(main, argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a console script's `main(argv)` run in-process."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
