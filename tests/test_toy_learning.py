"""The embedded default (`make run`): LoRA on the tiny model learns the toy task to a clearly
non-trivial score, from an untrained backbone that scores nothing."""

from __future__ import annotations

import pytest

from conftest import compose_config, untrained_exact_match
from peftrun.train.loop import train


@pytest.mark.slow
def test_default_run_learns_the_toy_task(tmp_path):
    cfg = compose_config("trainer.progress=false")
    assert untrained_exact_match(cfg) < 5

    summary = train(cfg, tmp_path)
    assert summary["test_exact_match"] >= 80
