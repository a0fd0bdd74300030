"""The quality benchmarks' pieces (scripts/quality/): learning curves and their summary, the
report tables, the learning-rate picks, the runs' timing callback and thread count, and the
synthetic tasks rendered as chat conversations for scripts/bench_quality_smollm2.py. The
benchmarks themselves: tests/test_synthetic.py (a --smoke run) and tests/test_benchmarks_doc.py
(the page they write)."""

from __future__ import annotations

import importlib
import json
import math
import sys
import types

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
curves = importlib.import_module("quality.curves")
report = importlib.import_module("quality.report")
lr = importlib.import_module("quality.lr")
runs = importlib.import_module("quality.runs")
methods = importlib.import_module("quality.methods")
chat_data = importlib.import_module("quality.chat_data")
sys.path.remove(str(ROOT / "scripts"))


def curve(*points):
    """(step, seconds, metric) triples -> a curve."""
    return [{"step": s, "seconds": t, "metric": m, "dev_loss": 1.0 / (1 + s)} for s, t, m in points]


# ------------------------------------------------------------------------------------ curves
def test_summary_final_best_and_the_time_to_90_percent_of_the_best_final():
    fast = curve((100, 10.0, 60.0), (200, 20.0, 95.0), (300, 30.0, 92.0), (400, 40.0, 90.0))
    slow = curve((100, 5.0, 10.0), (200, 10.0, 40.0), (300, 15.0, 85.0), (400, 20.0, 100.0))
    flat = curve((100, 1.0, 0.0), (200, 2.0, 0.0), (300, 3.0, None), (400, 4.0, 0.0))
    threshold, s = curves.summarize({"fast": fast, "slow": slow, "flat": flat})
    assert threshold == pytest.approx(90.0)  # 90% of slow's final 100 (the best final, not the best point)
    assert (s["fast"].final, s["fast"].best, s["fast"].best_step) == (90.0, 95.0, 200)
    assert (s["fast"].reach_step, s["fast"].reach_seconds) == (200, 20.0)
    assert (s["slow"].final, s["slow"].best, s["slow"].best_step) == (100.0, 100.0, 400)
    assert (s["slow"].reach_step, s["slow"].reach_seconds) == (400, 20.0)  # later in steps, as soon in time
    assert s["flat"].reach_step is None and s["flat"].reach_seconds is None and s["flat"].final == 0.0
    # Last quarter: the final value minus the last one at or before 3/4 of the steps (step 300).
    assert s["fast"].late_gain == pytest.approx(-2.0) and s["slow"].late_gain == pytest.approx(15.0)
    # Another fraction moves the threshold.
    threshold, s = curves.summarize({"fast": fast, "slow": slow}, fraction=0.5)
    assert threshold == 50.0 and s["fast"].reach_step == 100 and s["slow"].reach_step == 300


def test_summary_of_curves_that_learned_nothing_or_have_no_metric():
    threshold, s = curves.summarize({"a": curve((10, 1.0, 0.0), (20, 2.0, 0.0)), "b": curve((10, 1.0, None))})
    assert threshold is None  # nothing to reach
    assert s["a"].reach_step is None and s["a"].final == 0.0 and s["a"].best == 0.0
    assert s["b"].final is None and s["b"].best is None and s["b"].late_gain is None
    assert curves.summarize({}) == (None, {})


def test_first_reaching_and_late_gain():
    c = curve((10, 1.0, 20.0), (20, 2.0, None), (30, 3.0, 80.0), (40, 4.0, 70.0))
    assert curves.first_reaching(c, 75.0)["step"] == 30
    assert curves.first_reaching(c, 80.0)["step"] == 30  # at least the threshold
    assert curves.first_reaching(c, 81.0) is None
    assert curves.late_gain(c) == pytest.approx(70.0 - 80.0)  # cut at step 30
    assert curves.late_gain(curve((10, 1.0, 5.0))) is None
    # No evaluation at or before the cut: from the first one.
    assert curves.late_gain(curve((90, 1.0, 5.0), (100, 2.0, 7.0))) == pytest.approx(2.0)


def test_mean_curve_over_seeds_keeps_common_steps_and_the_range():
    a = curve((10, 1.0, 40.0), (20, 2.0, 60.0), (30, 3.0, 90.0))
    b = curve((10, 3.0, 50.0), (30, 5.0, None))  # a shorter run, a missing metric
    m = curves.mean_curve([a, b])
    assert [p["step"] for p in m] == [10, 30]
    assert m[0]["metric"] == 45.0 and (m[0]["low"], m[0]["high"]) == (40.0, 50.0) and m[0]["seconds"] == 2.0
    assert m[1]["metric"] == 90.0 and (m[1]["low"], m[1]["high"]) == (90.0, 90.0) and m[1]["seconds"] == 4.0
    assert curves.mean_curve([]) == []


def test_load_curve_joins_the_evaluations_with_the_timings(tmp_path):
    records = [{"event": "train", "step": 5, "loss": 2.0},
               {"event": "eval", "step": 10, "dev_loss": 1.5, "dev_exact_match": 20.0},
               {"event": "eval", "step": 20, "dev_loss": 1.0, "dev_exact_match": 40.0},
               {"event": "eval", "step": 20, "dev_loss": 0.9, "dev_exact_match": 45.0}]  # rewritten by a resume
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"event": "ev')
    (tmp_path / "timing.jsonl").write_text(json.dumps({"step": 10, "train_seconds": 3.0, "eval_seconds": 1.0}) + "\n")
    assert curves.load_curve(tmp_path, "exact_match") == [
        {"step": 10, "seconds": 3.0, "metric": 20.0, "dev_loss": 1.5},
        {"step": 20, "seconds": None, "metric": 45.0, "dev_loss": 0.9}]
    assert curves.load_curve(tmp_path / "absent", "exact_match") == []


def test_timing_log_leaves_the_evaluations_out(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(runs, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    log = runs.TimingLog(tmp_path / "timing.jsonl")
    state = types.SimpleNamespace(step=0, train_seconds=0.0)
    log.on_train_start(state)
    # 10 s of training, then an evaluation of 4 s; the trainer's clock runs on through it.
    clock[0], state.step, state.train_seconds = 114.0, 50, 10.0
    log.on_evaluate(state)
    clock[0], state.step, state.train_seconds = 130.0, 100, 26.0  # 12 s more training, 4 s more evaluating
    log.on_evaluate(state)
    rows = curves.read_events(tmp_path / "timing.jsonl")
    assert [(r["step"], r["train_seconds"], r["eval_seconds"]) for r in rows] == [(50, 10.0, 4.0), (100, 22.0, 4.0)]
    # A resume from step 50 keeps the timings up to there and counts on from them.
    resumed = runs.TimingLog(tmp_path / "timing.jsonl")
    clock[0] = 200.0
    resumed.on_train_start(types.SimpleNamespace(step=50, train_seconds=14.0))
    assert [r["step"] for r in curves.read_events(tmp_path / "timing.jsonl")] == [50]
    assert resumed.eval_seconds == 4.0


# ----------------------------------------------------------------------------------- report
def summary(metric_curve, test, lr_=1e-2, seconds=30.0):
    return {"curve": metric_curve, "test_accuracy": test, "lr": lr_, "train_seconds": seconds}


def test_task_table_rows():
    task_runs = {
        "lora": [summary(curve((50, 5.0, 80.0), (100, 10.0, 90.0)), 91.0),
                 summary(curve((50, 6.0, 82.0), (100, 12.0, 92.0)), 93.0)],
        "iapt": [summary(curve((50, 4.0, 20.0), (100, 8.0, 60.0)), 55.0, lr_=3e-3, seconds=20.0)],
        "para": [],  # every seed failed
    }
    sizes = {"lora": (4, 55296), "iapt": (12, 54000), "para": (8, 56000)}
    lines = report.task_table("synth_sentiment", task_runs, sizes, {"test_accuracy": 33.3},
                              [("test accuracy", "test_accuracy")], "accuracy")
    assert lines[0] == ("| method | knob | trainable | lr | final accuracy | best (step) | steps to 90% | "
                        "train s to 90% | last-quarter gain | test accuracy | per seed | train s |")
    assert lines[1].count("|") == lines[0].count("|")
    assert lines[2] == "| backbone, no adapter (zero-shot) | - | 0 | - | - | - | - | - | - | 33.3 | - | - |"
    # lora's mean curve: 81 then 91, so the threshold is 81.9, reached at step 100 after 11 s.
    assert lines[3] == "| lora | r=4 | 55,296 | 0.01 | 91.0 | 91.0 (100) | 100 | 11 | +10.0 | 92.0 ± 1.4 | 91.0 / 93.0 | 30 |"
    assert lines[4] == "| iapt | bottleneck=12 | 54,000 | 0.003 | 60.0 | 60.0 (100) | not reached | - | +40.0 | 55.0 | 55.0 | 20 |"
    assert lines[5].startswith("| para | bottleneck=8 | 56,000 | - | failed: see below |")
    assert all(line.count("|") == lines[0].count("|") for line in lines[2:6])
    assert lines[-1] == "Threshold: 90% of the best final accuracy, 81.9."


def test_failures_and_spread():
    assert report.failures([]) == []
    lines = report.failures([(("synth_qa", "iapt", 1, 1e-2), "RuntimeError: nan")])
    assert "- synth_qa, iapt, seed 1, lr 0.01: RuntimeError: nan" in lines
    assert report.spread([]) == "-" and report.spread([3.0]) == "3.0" and report.spread([1.0, 3.0]) == "2.0 ± 1.4"


def test_pick_lr_takes_the_lowest_geometric_mean_and_skips_diverged_runs():
    dev = {("a", "lora", 1e-3): 1.0, ("b", "lora", 1e-3): 0.04,  # geometric mean 0.2
           ("a", "lora", 1e-2): 0.3, ("b", "lora", 1e-2): 0.3,  # arithmetic mean lower, geometric higher
           ("a", "lora", 1e-1): 0.01, ("b", "lora", 1e-1): math.inf}  # diverged on one task
    assert report.pick_lr(dev, ["a", "b"], "lora", [1e-3, 1e-2, 1e-1]) == 1e-3
    lines = report.lr_table(dev, ["a", "b"], ["lora"], [1e-3, 1e-2, 1e-1], {"lora": 1e-3})
    assert lines[2] == "| lora | 1.000 / 0.040 | 0.300 / 0.300 | 0.010 / inf | 0.001 |"


def test_learning_rate_picks_file(tmp_path):
    path = tmp_path / "picks.json"
    assert lr.load_picks("tiny", path) == {}
    lr.save_picks("tiny", {"lora": 1e-2, "iapt": 3e-3}, "swept", path)
    lr.save_picks("tiny", {"lora": 3e-2}, "again", path)  # the other methods keep theirs
    lr.save_picks("other", {"lora": 1e-4}, "x", path)
    assert lr.load_picks("tiny", path) == {"iapt": {"lr": 3e-3, "how": "swept"}, "lora": {"lr": 3e-2, "how": "again"}}
    assert lr.learning_rates("tiny", ["lora", "iapt"], {"iapt": 1e-3}, path) == {"lora": 3e-2, "iapt": 1e-3}
    with pytest.raises(SystemExit, match="no learning rate for para on tiny.*--sweep-lr.*--lr METHOD=LR"):
        lr.learning_rates("tiny", ["lora", "para"], {}, path)
    assert lr.learning_rates("tiny", ["lora", "para"], {}, path, fallback=1e-4) == {"lora": 3e-2, "para": 1e-4}
    # The committed picks cover the small backbone's default methods.
    committed = lr.load_picks("tiny_pretrained")
    assert set(methods.DEFAULT_METHODS) <= set(committed)


# ------------------------------------------------------------------------------- methods, runs
def test_method_overrides_and_the_alora_schedule():
    assert methods.method_overrides("alora", 4) == ["method=alora", "method.r_init=4", "method.max_rank=8",
                                                    "method.alpha=8"]
    assert methods.method_overrides("tied_lora tl6 r=8", 8) == ["method=tied_lora", "method.r=8", "method.preset=tl6"]
    assert methods.folder_name("tied_lora tl6 r=8") == "tied_lora_tl6_r8"
    assert methods.alora_schedule(1000) == ["method.warmup_steps=400", "method.interval_steps=100", "method.rounds=3",
                                            "method.dev_batch_size=16"]
    assert methods.alora_schedule(4, max_rounds=1, dev_batch=4)[2] == "method.rounds=1"
    assert set(methods.DEFAULT_METHODS) <= set(methods.METHODS) and set(methods.MARKERS) == set(methods.METHODS)


def test_budget_matching_picks_the_nearest_count():
    model = ["model=tiny"]
    budget = methods.count("lora", 4, model)
    k, n = methods.match_budget("para", budget, model)
    neighbours = [k + d for d in (-1, 1) if k + d in methods.METHODS["para"][2]]
    assert abs(math.log(n / budget)) <= min(abs(math.log(methods.count("para", j, model) / budget)) for j in neighbours)
    assert methods.match_budget("lora", budget, model) == (4, budget)
    assert methods.match_budget("tied_lora tl6 r=8", budget, model)[0] == 8  # not matched: the paper's rank


def plan(**kw):
    kw = {"sizes": {"lora": (4, 0), "alora": (2, 0)}, **kw}
    return runs.Plan(model_overrides=("model=tiny",), task_overrides={"toy": ("task=toy",)}, steps={"toy": 8},
                     eval_every={"toy": 4}, **kw)


def test_run_config_sets_the_protocol():
    cfg = runs.run_config(plan(batch=4), ("toy", "lora", 3, 2e-3))
    t = cfg.trainer
    assert (t.max_steps, t.lr, t.seed, t.micro_batch_size, t.scheduler, t.warmup_ratio) == (8, 2e-3, 3, 4, "linear", 0.06)
    assert (t.eval_every, t.generate_every, t.load_best_at_end, t.num_beams) == (4, 4, True, 1)
    assert cfg.method.name == "lora" and cfg.method.r == 4
    assert runs.run_config(plan(generate=False), ("toy", "lora", 0, 1e-3)).trainer.generate_every == 0
    alora = runs.run_config(plan(alora_rounds=1, alora_dev_batch=4), ("toy", "alora", 0, 1e-3)).method
    assert (alora.r_init, alora.max_rank, alora.rounds, alora.dev_batch_size) == (2, 4, 1, 4)


def test_runs_in_process_take_one_thread_each_and_restore_the_count(monkeypatch, tmp_path):
    # The thread count moves float rounding, so `--workers 1` must run as the workers do.
    import peftrun.train.loop

    monkeypatch.setattr(peftrun.train.loop, "train", lambda cfg, run_dir, callbacks: {
        "threads": torch.get_num_threads(), "primary_metric": "test_exact_match", "seed": cfg.trainer.seed})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        done = list(runs.run_all(plan(workers=1), [("toy", "lora", 0, 1e-2), ("toy", "lora", 1, 1e-2)], tmp_path))
        assert [(s["threads"], s["seed"], s["curve"]) for _, s in done] == [(1, 0, []), (1, 1, [])]
        assert done[1][1]["run_dir"] == str(tmp_path / "toy" / "lora" / "seed1-lr0.01")
        assert torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(before)


def test_a_failed_run_is_reported_not_raised(monkeypatch, tmp_path):
    import peftrun.train.loop

    def diverge(cfg, run_dir, callbacks):
        print("step 1: loss nan")
        raise FloatingPointError("loss is\n nan")

    monkeypatch.setattr(peftrun.train.loop, "train", diverge)
    job = ("toy", "lora", 0, 1.0)
    s = runs.run_one(plan(), job, runs.run_folder(tmp_path, job))
    assert s["lr"] == 1.0 and s["error"].startswith("FloatingPointError: loss is nan (log: ")
    assert "step 1: loss nan" in (tmp_path / "toy" / "lora" / "seed0-lr1.log").read_text()


def test_reuse_reads_a_finished_run_instead_of_training_it_again(monkeypatch, tmp_path):
    import peftrun.train.loop

    job = ("toy", "lora", 0, 1e-3)
    run_dir = runs.run_folder(tmp_path, job)
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"primary_metric": "test_exact_match", "test_exact_match": 97.0,
                                                      "train_seconds": 12.0}))
    monkeypatch.setattr(peftrun.train.loop, "train", lambda cfg, run_dir, callbacks: {
        "primary_metric": "test_exact_match", "test_exact_match": 1.0, "train_seconds": 1.0})
    reused = runs.run_one(plan(reuse=True), job, run_dir)
    assert reused["reused"] and reused["test_exact_match"] == 97.0 and reused["run_dir"] == str(run_dir)
    assert runs.run_one(plan(), job, run_dir)["test_exact_match"] == 1.0  # without --reuse it trains


def test_a_refused_config_is_a_failed_run_not_the_end_of_the_benchmark(tmp_path):
    # A size or schedule the config refuses (here a negative rank) fails that run alone.
    job = ("toy", "lora", 0, 1e-3)
    s = runs.run_one(plan(sizes={"lora": (-1, 0)}), job, runs.run_folder(tmp_path, job))
    assert s["error"].startswith("ConfigError: method.r") and s["lr"] == 1e-3


# ------------------------------------------------------------------------- chat-rendered tasks
@pytest.mark.parametrize("task", ["synth_qa", "synth_math"])
def test_synthetic_tasks_render_as_chat_conversations(task, tmp_path):
    native = chat_data.native_task(task)
    paths = chat_data.write_files(task, tmp_path, {"train": 5, "dev": 2, "test": 3})
    assert set(paths) == {"train", "dev", "test"} and paths["train"].parent == tmp_path / task
    for split, n in (("train", 5), ("dev", 2), ("test", 3)):
        rows = [json.loads(line) for line in paths[split].read_text().splitlines()]
        assert len(rows) == n
        for row, example in zip(rows, native.examples(split)):
            system, user, assistant = row["messages"]
            assert (system["role"], user["role"], assistant["role"]) == ("system", "user", "assistant")
            assert system["content"] == chat_data.SYSTEM[task]
            assert user["content"] + "\nAnswer:" == example.prompt  # the cue is the chat template's job now
            assert assistant["content"] == example.target.strip()
    if task == "synth_math":
        assert "####" in chat_data.SYSTEM[task] and " #### " in assistant["content"]
    with pytest.raises(SystemExit, match="the task has 200"):
        chat_data.write_files(task, tmp_path, {"test": 201})


def test_chat_task_overrides_train_the_reply_on_the_files(tmp_path):
    from conftest import compose_config

    paths = chat_data.write_files("synth_qa", tmp_path, {"train": 4, "dev": 2, "test": 2})
    cfg = compose_config("model=tiny", *chat_data.task_overrides("synth_qa", paths, max_length=96)).task
    assert (cfg.name, cfg.train_on, cfg.metric, cfg.max_length) == ("chat", "last_assistant", "exact_match", 96)
    assert cfg.max_new_tokens == chat_data.MAX_NEW_TOKENS["synth_qa"] and cfg.test_file == str(paths["test"])


def test_native_scores_forgive_sentences_and_read_predictions(tmp_path):
    examples = chat_data.native_task("synth_qa").examples("test")[:2]
    answer = examples[0].references[0]
    scores = chat_data.native_scores("synth_qa", [f"The answer is {answer}.", "no idea"], 2)
    assert scores["exact_match"] == 0.0 and 0 < scores["f1"] < 50  # a sentence: F1 credit only
    assert chat_data.native_scores("synth_qa", [answer, examples[1].references[0]], 2)["exact_match"] == 100.0
    math_test = chat_data.native_task("synth_math").examples("test")[:1]
    final = math_test[0].target.rsplit("#### ", 1)[1]
    assert chat_data.native_scores("synth_math", [f"1 + 1 = 2. #### {final}"], 1)["accuracy"] == 100.0
    (tmp_path / "predictions.jsonl").write_text(
        "".join(json.dumps({"prompt": "p", "prediction": p}) + "\n" for p in ("a", "b c")) + "\n")
    assert chat_data.read_predictions(tmp_path) == ["a", "b c"]
