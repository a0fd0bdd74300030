"""The embedded default (`make run`): LoRA on the tiny model learns the toy task to a clearly
non-trivial score, from an untrained backbone that scores nothing."""

from __future__ import annotations

import pytest

from conftest import compose_config
from peftrun.generate import generate
from peftrun.models import build_model, load_tokenizer
from peftrun.tasks import build_task
from peftrun.train.loop import train


@pytest.mark.slow
def test_default_run_learns_the_toy_task(tmp_path):
    cfg = compose_config("trainer.progress=false")
    tokenizer = load_tokenizer(cfg.model)
    task = build_task(cfg.task)
    test = task.examples("test")
    untrained = generate(build_model(cfg.model, tokenizer), tokenizer, None, [e.prompt for e in test],
                         max_new_tokens=cfg.task.max_new_tokens)
    assert task.score(untrained, test)["exact_match"] < 5

    summary = train(cfg, tmp_path)
    assert summary["test_exact_match"] >= 80
