"""ALoRA: gated ranks, AB-LoRA importance, the reallocation rule, the schedule, resume, export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, compose_config, needs_torchrun, run_torchrun, tiny_model, toy_batch
from peftrun.errors import ConfigError
from peftrun.methods import build_method
from peftrun.methods.alora import reallocate
from peftrun.train.loop import train
from peftrun.loss import token_loss_sum


def attach(*overrides: str):
    cfg = compose_config("method=alora", "method.r_init=2", "method.max_rank=4", *overrides)
    model, tokenizer = tiny_model()
    torch.manual_seed(0)
    return cfg, model, tokenizer, build_method(cfg.method).attach(model)


def ce(model, batch) -> float:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(token_loss_sum(logits, batch["labels"]) / (batch["labels"][:, 1:] != -100).sum())


def perturb(adapter, scale=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in adapter.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# --------------------------------------------------------------------------- gates
def test_closed_slots_do_nothing_and_get_no_gradient():
    _, model, tokenizer, adapter = attach()
    perturb(adapter)
    batch = toy_batch(tokenizer)
    layer = next(iter(adapter.layers.values()))
    assert layer.lora_gate["default"].tolist() == [1, 1, 0, 0]
    before = ce(model, batch)
    with torch.no_grad():
        layer.lora_B["default"][:, 2:] += 5.0  # closed slots: no effect whatever their values
    assert ce(model, batch) == before
    model.train()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_loss_sum(out, batch["labels"]).backward()
    assert layer.lora_A["default"].grad[2:].abs().max() == 0
    assert layer.lora_B["default"].grad[:, 2:].abs().max() == 0
    assert layer.lora_A["default"].grad[:2].abs().max() > 0
    assert not layer.lora_gate["default"].requires_grad


# --------------------------------------------------------------------------- importance
@pytest.mark.parametrize("per_forward", [1, 7, 64])
def test_stacked_importance_equals_the_definition(per_forward):
    _, _, tokenizer, adapter = attach()
    perturb(adapter)
    batch = toy_batch(tokenizer, n=8)
    expected = adapter.importance_naive(batch)
    got = adapter.importance(batch, ablations_per_forward=per_forward)
    assert got.keys() == expected.keys()
    assert max(abs(got[r] - expected[r]) for r in got) <= 1e-5
    assert len({round(v, 6) for v in got.values()}) > 1, "scores differ between ranks"


def trained_alora(steps: int = 60, lr: float = 3e-3):
    """An ALoRA adapter (7 of 8 slots open, no rounds) trained a little on the toy task."""
    cfg = compose_config("method=alora", "method.rounds=0", "method.r_init=7", "method.max_rank=8")
    model, tokenizer = tiny_model()
    torch.manual_seed(0)
    adapter = build_method(cfg.method).attach(model)
    optimizer = torch.optim.AdamW([p for _, p in adapter.trainable_parameters()], lr=lr)
    batch = toy_batch(tokenizer, n=32)
    model.train()
    for _ in range(steps):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        (token_loss_sum(out, batch["labels"]) / (batch["labels"][:, 1:] != -100).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return cfg, adapter, batch


def open_planted(adapter, module: str, b_column: torch.Tensor, a_row: torch.Tensor) -> None:
    layer = adapter.layers[module]
    with torch.no_grad():
        layer.lora_A["default"][7] = a_row
        layer.lora_B["default"][:, 7] = b_column
        layer.lora_gate["default"][7] = 1.0


def test_planted_harmful_ranks_are_pruned_first():
    """A rank that undoes a trained one four times over (A row copied, B column * -4) hurts:
    without it the adapter is at its best, alone it is worse than the backbone. The first
    round's n_A lowest scores are exactly the planted ranks."""
    cfg, adapter, batch = trained_alora()
    planted = ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj"]
    for m in planted:
        layer = adapter.layers[m]
        open_planted(adapter, m, -4 * layer.lora_B["default"][:, 0].detach(), layer.lora_A["default"][0].detach())
    scores = adapter.importance(batch)
    pruned, grow = reallocate(scores, adapter.allocation(), n=3, max_rank=cfg.method.max_rank)
    assert set(pruned) == {(m, 7) for m in planted}
    assert sum(grow.values()) == 3 and not set(grow) & set(planted)


def test_useless_rank_scores_the_adapter_against_the_backbone():
    """By the definition, a rank that does nothing scores CE(all) - CE(backbone): it neither
    hurts when removed nor helps alone."""
    _, adapter, batch = trained_alora()
    m = "model.layers.1.mlp.up_proj"
    open_planted(adapter, m, torch.zeros(adapter.layers[m].out_features), adapter.layers[m].lora_A["default"][0].detach())
    scores = adapter.importance(batch)
    adapter.model.eval()
    with adapter.disabled():
        backbone = ce(adapter.model, batch)
    assert abs(scores[(m, 7)] - (ce(adapter.model, batch) - backbone)) < 1e-5
    assert scores[(m, 7)] < 0  # the trained adapter helps


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (torch.tensor(v, dtype=torch.float64).argsort().argsort().double() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_taylor_estimate_ranks_like_the_exact_score():
    """The first-order estimate on a trained adapter orders the ranks as the exact score does
    (0.92 here when written), and is exact where the loss is linear in a gate: a rank that does
    nothing (B column zero) gets the same score as the definition's, CE(all) - CE(backbone)."""
    _, adapter, batch = trained_alora()
    m = "model.layers.1.mlp.up_proj"
    open_planted(adapter, m, torch.zeros(adapter.layers[m].out_features), adapter.layers[m].lora_A["default"][0].detach())
    exact = adapter.importance(batch)
    taylor = adapter.importance(batch, estimator="taylor")
    assert taylor.keys() == exact.keys()
    ranks = sorted(exact)
    assert spearman([exact[r] for r in ranks], [taylor[r] for r in ranks]) > 0.6
    assert abs(taylor[(m, 7)] - exact[(m, 7)]) < 1e-5
    assert all(layer.ablation_gate is None for layer in adapter.layers.values())


def test_misspelled_score_estimator_is_refused():
    cfg = compose_config("method=alora", "method.score_estimator=taylr")
    with pytest.raises(ConfigError, match="exact, taylor") as err:
        build_method(cfg.method).check_config()
    assert err.value.key == "method.score_estimator"


def test_taylor_estimator_trains_end_to_end(tmp_path):
    train(compose_config(*SCHEDULE, "method.score_estimator=taylor", "trainer.save_every=0"), tmp_path)
    rounds = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["event"] == "alora_round"]
    assert [r["step"] for r in rounds] == [10, 15, 20]
    assert all(len(r["pruned"]) == 7 for r in rounds)
    assert json.loads((tmp_path / "alora_allocation.json").read_text())["final"] == rounds[-1]["allocation"]


# --------------------------------------------------------------------------- reallocation rule
def test_reallocate_evenly_then_by_mean_importance():
    alloc = {"a": 2, "b": 2, "c": 2, "d": 2}
    scores = {("a", 0): -5.0, ("a", 1): 1.0, ("b", 0): 2.0, ("b", 1): 3.0,
              ("c", 0): 0.5, ("c", 1): 0.6, ("d", 0): 9.0, ("d", 1): 8.0}
    pruned, grow = reallocate(scores, alloc, n=1, max_rank=4)
    assert pruned == [("a", 0)]
    assert grow == {"d": 1}  # one new rank: to the module of highest mean importance
    pruned, grow = reallocate(scores, alloc, n=5, max_rank=4)
    assert pruned == [("a", 0), ("c", 0), ("c", 1), ("a", 1), ("b", 0)]
    assert grow == {"d": 2}  # only d lost none; capped at max_rank 4: the budget shrinks by 3


def test_reallocate_spreads_evenly_and_shrinks_when_every_module_lost():
    alloc = {"a": 2, "b": 2, "c": 2}
    scores = {("a", 0): -1.0, ("a", 1): -0.9, ("b", 0): 1.0, ("b", 1): 2.0, ("c", 0): 3.0, ("c", 1): 4.0}
    pruned, grow = reallocate(scores, alloc, n=2, max_rank=8)
    assert grow == {"c": 1, "b": 1}
    everyone = {("a", 0): -1.0, ("b", 0): -2.0, ("c", 0): -3.0, ("a", 1): 5.0, ("b", 1): 5.0, ("c", 1): 5.0}
    pruned, grow = reallocate(everyone, alloc, n=3, max_rank=8)
    assert len(pruned) == 3 and grow == {}


# --------------------------------------------------------------------------- the schedule in a run
SCHEDULE = ("method=alora", "method.r_init=4", "method.max_rank=6", "method.warmup_steps=10",
            "method.interval_steps=5", "method.rounds=3", "method.dev_batch_size=16", "trainer.max_steps=30",
            "trainer.save_every=10", "trainer.eval_every=0", "trainer.progress=false", "task.num_train=256",
            "task.num_dev=32", "task.num_test=16")


@pytest.fixture(scope="module")
def scheduled_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("alora")
    return run_dir, train(compose_config(*SCHEDULE), run_dir)


def test_rounds_run_on_schedule_within_budget(scheduled_run):
    run_dir, _ = scheduled_run
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["event"] == "alora_round"]
    assert [r["step"] for r in rounds] == [10, 15, 20]
    initial = 14 * 4
    for r in rounds:
        assert r["open_ranks"] <= initial
        assert len(r["pruned"]) == 7  # n_A: seven module kinds per Llama block
        assert all(v <= 6 for v in r["allocation"].values())
    assert (run_dir / "alora_allocation.png").stat().st_size > 1000
    saved = json.loads((run_dir / "alora_allocation.json").read_text())
    assert saved["final"] == rounds[-1]["allocation"]


def test_resume_in_the_middle_of_the_schedule(scheduled_run, tmp_path):
    reference_dir, _ = scheduled_run

    class Kill:
        def on_step_end(self, state):
            if state.step == 17:  # after round 2 (step 15), before round 3; checkpoint at 10
                raise KeyboardInterrupt

    cfg = compose_config(*SCHEDULE)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, extra_callbacks=[Kill()])
    train(cfg, tmp_path)
    expected = load_file(str(reference_dir / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys() and any(k.endswith("lora_gate") for k in got)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_export_sliced_to_open_ranks_loads_in_peft(scheduled_run, tmp_path):
    peft = pytest.importorskip("peft")
    from peftrun.export import export_peft
    from peftrun.methods import load_adapter

    run_dir, _ = scheduled_run
    model, tokenizer = tiny_model()
    adapter = load_adapter(run_dir / "adapter", model)
    assert len(set(adapter.allocation().values())) > 1, "the rounds made ranks differ between modules"
    export_peft(adapter, "tiny", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {m: r for m, r in adapter.allocation().items() if r}
    batch = toy_batch(tokenizer)
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    fresh, _ = tiny_model()
    theirs_model = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "peft"))
    with torch.no_grad():
        theirs = theirs_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    adapter.merge()
    with torch.no_grad():
        merged = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(merged, ours, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- refused schedules
def test_warmup_beyond_the_run_is_refused(tmp_path):
    cfg = compose_config("method=alora", "method.warmup_steps=500", "trainer.max_steps=100",
                         "trainer.progress=false", "task.num_train=256")
    with pytest.raises(ConfigError, match="warm-up ends at step 500 but the run has 100 steps") as err:
        train(cfg, tmp_path)
    assert err.value.key == "method.warmup_epochs"
    assert not (tmp_path / "checkpoints").exists()


def test_more_ranks_per_round_than_open_ranks_is_refused():
    from peftrun.models import load_tokenizer, meta_model

    cfg = compose_config("method=alora", "method.r_init=1", "method.ranks_per_round=14")
    method = build_method(cfg.method)
    with pytest.raises(ConfigError) as err:
        method.check_model(meta_model(cfg.model, load_tokenizer(cfg.model)))
    assert err.value.key == "method.ranks_per_round"


@pytest.mark.slow
@needs_torchrun
@pytest.mark.parametrize("estimator", ["exact", "taylor"])
def test_two_processes_take_the_same_decisions(tmp_path, estimator):
    """2 processes (gloo on CPU) split the scoring (exact) or take the main process's (taylor) and
    must close and open the same ranks: their gates and tensors are equal after the rounds, and
    equal to the saved adapter."""
    args = [f"method.score_estimator={estimator}", "method.r_init=4", "method.max_rank=6", "method.warmup_steps=4", "method.interval_steps=3",
            "method.rounds=2", "method.dev_batch_size=16", "trainer.max_steps=10", "trainer.micro_batch_size=8",
            "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress=false", "task.num_train=128",
            "task.num_dev=16", "task.num_test=8"]
    run = run_torchrun(str(ROOT / "tests" / "ddp_run.py"), "alora", str(tmp_path), *args)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / f"rank{k}.safetensors")) for k in (0, 1))
    init = load_file(str(tmp_path / "init0.safetensors"))
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    gates = [k for k in saved if k.endswith("lora_gate")]
    assert gates and any(not torch.equal(saved[k], init[k]) for k in gates), "the rounds moved ranks"
    for key in saved:
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.equal(rank0[key], saved[key]), key
