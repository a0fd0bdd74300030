"""Commands around a run: `peftrun-export` (PEFT and merged), `peftrun-eval` on a saved adapter
and on `peftrun-generate`'s output, chat requests to `peftrun-generate`, `trainer.init_from`,
`trainer.resume_from`, and templates typed on the command line (docs/commands.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import call_main, compose_config, tiny_model, toy_batch
from peftrun.errors import ConfigError
from peftrun.generate import generate
from peftrun.methods import build_method, load_adapter, save_adapter

RUN_OVERRIDES = ("task.num_train=64", "task.num_dev=8", "task.num_test=8")


def make_run(folder: Path, method: str = "lora", *overrides: str) -> Path:
    """A run folder as `peftrun` leaves it (config.yaml, adapter/), with a random adapter far
    enough from its init to change the outputs."""
    cfg = compose_config(f"method={method}", *overrides)
    model, _ = tiny_model()
    torch.manual_seed(1)
    adapter = build_method(cfg.method).attach(model)
    with torch.no_grad():
        for name, p in adapter.trainable_parameters():
            p.copy_(torch.ones_like(p)) if name.endswith(".gate") else p.add_(torch.randn_like(p) * 0.3)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    save_adapter(adapter, folder / "adapter", {"base_model": cfg.model.name})
    return folder


call = call_main


def assert_refused(result, prog: str, key: str, words: str = "") -> None:
    code, out, err = result
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith(f"{prog}: error: {key}: ") and err.count("\n") == 1, err
    assert words in err, err


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# ------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("method", ["lora", "tied_lora", "alora"])
def test_peft_export_loads_in_peft_with_equal_logits(method, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from peftrun.export import main

    run = make_run(tmp_path / "run", method)
    code, out, err = call(main, [run, "--peft", tmp_path / "exports" / "peft"], capsys)
    assert code == 0, err
    assert out.startswith("peftrun-export: wrote ")
    folder = tmp_path / "exports" / "peft"
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert not list((tmp_path / "exports").glob(".tmp-*"))

    model, tokenizer = tiny_model()
    load_adapter(run / "adapter", model)
    batch = toy_batch(tokenizer)
    loaded = peft.PeftModel.from_pretrained(tiny_model()[0], folder)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=0)
    # Exporting again replaces the earlier export.
    assert call(main, [run, "--peft", folder], capsys)[0] == 0


def test_merged_export_reloads_with_transformers(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftrun.export import main

    run = make_run(tmp_path / "run")
    code, _, err = call(main, [run, "--merged", tmp_path / "merged"], capsys)
    assert code == 0, err
    model, tokenizer = tiny_model()
    load_adapter(run / "adapter", model)
    batch = toy_batch(tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), atol=1e-4, rtol=0)  # merged: rounding
    text = "max 3815="
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")(text)["input_ids"] == tokenizer(text)["input_ids"]


@pytest.mark.parametrize("case, key, words", [
    ("para peft", "peft", "method para has no PEFT format"),
    ("iapt merged", "merged", "method iapt is not linear"),
    ("folder with other files", "peft", "holds other files"),
    ("the run folder", "merged", "would replace the run folder"),
    ("missing run", "adapter", "does not exist"),
])
def test_export_refusals_are_one_line_and_write_nothing(case, key, words, tmp_path, capsys):
    from peftrun.export import main

    method = {"para peft": "para", "iapt merged": "iapt"}.get(case, "lora")
    run = make_run(tmp_path / "run", method)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    argv = {
        "para peft": [run, "--peft", tmp_path / "out"],
        "iapt merged": [run, "--merged", tmp_path / "out"],
        "folder with other files": [run, "--peft", tmp_path / "busy"],
        "the run folder": [run, "--merged", run],
        "missing run": [tmp_path / "nope", "--peft", tmp_path / "out"],
    }[case]
    before = listing(tmp_path)
    assert_refused(call(main, argv, capsys), "peftrun-export", key, words)
    assert listing(tmp_path) == before


# ------------------------------------------------------------------------------ chat requests
def chat_run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "chat_run", "lora", "task=chat", f"task.train_file={tmp_path / 'chat.jsonl'}",
                    "task.max_length=128")


def test_generate_speaks_chat_as_training_renders_it(tmp_path, capsys):
    from peftrun.serve import main
    from peftrun.tasks import ChatTask, bind_tokenizer
    from peftrun.tasks.chat_format import render, resolve_template

    run = chat_run(tmp_path)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    requests = [{"messages": conversation, "id": "a", "target": "4"}, {"prompt": "2+2?"},
                {"conversations": [{"from": "human", "value": "Sky color?"}]}]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    code, out, err = call(main, [run, "--prompts-file", tmp_path / "requests.jsonl", "--max-new-tokens", 4], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[0] == {"messages": conversation, "adapter": "default", "completion": rows[0]["completion"],
                       "id": "a", "target": "4"}
    assert rows[1]["prompt"] == "2+2?" and rows[2]["conversations"] == requests[2]["conversations"]

    model, tokenizer = tiny_model()
    adapter = load_adapter(run / "adapter", model)
    template = resolve_template(None, tokenizer)
    texts = [render(tokenizer, template, conversation, True),
             render(tokenizer, template, [{"role": "user", "content": "2+2?"}], True),
             render(tokenizer, template, [{"role": "user", "content": "Sky color?"}], True)]
    assert [r["completion"] for r in rows] == generate(model, tokenizer, adapter, texts, max_new_tokens=4)

    # The loop's test prompts are the same text: the conversation before the reply, rendered.
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": conversation + [
        {"role": "assistant", "content": str(i)}]}) + "\n" for i in range(4)))
    cfg = OmegaConf.load(run / "config.yaml").task
    task = ChatTask(OmegaConf.merge(compose_config("task=chat").task, cfg))
    task.validate()
    bind_tokenizer(task, tokenizer)
    assert {e.prompt for e in task.examples("test")} == {texts[0]}
    # peftrun-eval on a chat file renders its prompts the same way.
    from peftrun.evaluate import main as eval_main

    code, _, err = call(eval_main, [run, "--task-file", tmp_path / "chat.jsonl", "--output", tmp_path / "evals",
                                    "--max-new-tokens", 2], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "evals" / "predictions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [texts[0]] * 4 and [r["target"] for r in rows] == ["0", "1", "2", "3"]


@pytest.mark.parametrize("case, words", [
    ("ends with a reply", "ends with an assistant message"),
    ("unknown role", "with role 'robot'"),
    ("conversation to a toy run", "not task=chat"),
])
def test_chat_requests_are_refused_before_weights_load(case, words, tmp_path, capsys, monkeypatch):
    import peftrun.serve as serve

    run = make_run(tmp_path / "toy") if case.endswith("toy run") else chat_run(tmp_path)
    line = {"ends with a reply": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            "unknown role": {"messages": [{"role": "robot", "content": "hi"}]},
            "conversation to a toy run": {"messages": [{"role": "user", "content": "hi"}]}}[case]
    (tmp_path / "r.jsonl").write_text(json.dumps(line) + "\n")
    monkeypatch.setattr(serve, "load_tenants", lambda *a, **k: pytest.fail("weights loaded"))
    assert_refused(call(serve.main, [run, "--prompts-file", tmp_path / "r.jsonl"], capsys), "peftrun-generate",
                   "prompts-file", words)


# -------------------------------------------------------------------------------------- eval
def test_generate_output_is_eval_input(tmp_path, capsys):
    from peftrun.evaluate import main as eval_main
    from peftrun.serve import main as generate_main

    run = make_run(tmp_path / "run")
    prompts = ["max 3815=", "min 42=", "max 5="]
    targets = ["8", "2", "5"]
    (tmp_path / "requests.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in zip(prompts, targets)))
    code, _, err = call(generate_main, [run, "--prompts-file", tmp_path / "requests.jsonl", "--output",
                                        tmp_path / "completions.jsonl", "--max-new-tokens", 3], capsys)
    assert code == 0, err
    completions = [json.loads(line)["completion"] for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    expected = 100 * sum(c.strip() == t for c, t in zip(completions, targets)) / 3

    code, out, err = call(eval_main, [run, "--predictions", tmp_path / "completions.jsonl"], capsys)
    assert code == 0, err
    assert json.loads(out)["exact_match"] == pytest.approx(expected)
    # Targets from a file of their own, line by line.
    (tmp_path / "bare.jsonl").write_text("".join(json.dumps({"completion": c}) + "\n" for c in completions))
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps({"references": [t]}) + "\n" for t in targets))
    code, out, err = call(eval_main, [run, "--predictions", tmp_path / "bare.jsonl", "--references",
                                      tmp_path / "refs.jsonl"], capsys)
    assert code == 0, err
    assert json.loads(out)["exact_match"] == pytest.approx(expected)

    (tmp_path / "short.jsonl").write_text(json.dumps({"target": "8"}) + "\n")
    assert_refused(call(eval_main, [run, "--predictions", tmp_path / "bare.jsonl", "--references",
                                    tmp_path / "short.jsonl"], capsys), "peftrun-eval", "references", "has 1 rows")
    assert_refused(call(eval_main, [run, "--predictions", tmp_path / "bare.jsonl"], capsys), "peftrun-eval",
                   "predictions", "--references")


def test_eval_a_saved_adapter_on_a_task_file_writes_elsewhere(tmp_path, capsys):
    from peftrun.evaluate import evaluate, main

    records = [{"prompt": f"max {d}=", "target": max(d)} for d in ("3815", "42", "907", "5")]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:3]))
    run = make_run(tmp_path / "run", "lora", "task=jsonl", f"task.train_file={tmp_path / 'train.jsonl'}",
                   "task.max_new_tokens=3")
    before = listing(run)
    out_dir = tmp_path / "evals" / "test"
    code, out, err = call(main, [run, "--task-file", tmp_path / "test.jsonl", "--output", out_dir], capsys)
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics == json.loads((out_dir / "metrics.json").read_text())
    assert listing(run) == before  # the run folder is untouched
    rows = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in records[:3]]
    model, tokenizer = tiny_model()
    adapter = load_adapter(run / "adapter", model)
    assert [r["prediction"] for r in rows] == generate(model, tokenizer, adapter, [r["prompt"] for r in rows],
                                                       max_new_tokens=3)
    assert OmegaConf.load(out_dir / "config.yaml").task.test_file == str(tmp_path / "test.jsonl")
    assert evaluate(out_dir) == metrics  # the output folder rescores like a run folder

    # Another task option, with overrides; an earlier evaluation's folder is replaced.
    code, out, err = call(main, [run, "task=toy", "--output", out_dir, "task.num_test=5", "task.max_eval_samples=null",
                                 "--max-new-tokens", 2], capsys)
    assert code == 0, err
    assert len((out_dir / "predictions.jsonl").read_text().splitlines()) == 5
    assert json.loads(out)["primary_metric"] == "exact_match"


@pytest.mark.parametrize("case, key, words", [
    ("inside the run", "output", "inside the run folder"),
    ("task file of a toy run", "task-file", "task=toy reads no test file"),
    ("not a task key", "overrides", "only task=NAME and task.KEY=VALUE"),
    ("unknown task key", "task.nope", "unknown key"),
    ("overrides without output", "overrides", "add --output DIR"),
])
def test_eval_refusals_are_one_line(case, key, words, tmp_path, capsys):
    from peftrun.evaluate import main

    run = make_run(tmp_path / "run")
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "target": "b"}\n')
    argv = {
        "inside the run": [run, "--output", run / "evals"],
        "task file of a toy run": [run, "--task-file", tmp_path / "t.jsonl", "--output", tmp_path / "o"],
        "not a task key": [run, "method.r=2", "--output", tmp_path / "o"],
        "unknown task key": [run, "task.nope=1", "--output", tmp_path / "o"],
        "overrides without output": [run, "task.num_test=3"],
    }[case]
    assert_refused(call(main, argv, capsys), "peftrun-eval", key, words)
    assert not (tmp_path / "o").exists() and not (run / "evals").exists()


# ------------------------------------------------------------------------ init_from, resume_from
def test_init_from_loads_the_adapter_before_training_and_checks_shapes(tmp_path):
    from peftrun.train.loop import Trainer
    from peftrun.validate import validate

    run = make_run(tmp_path / "run")
    cfg = compose_config(*RUN_OVERRIDES, f"trainer.init_from={run}", "trainer.progress=false")
    trainer = Trainer(cfg, tmp_path / "next", validate(cfg))
    try:
        trainer.setup_processes()
        trainer.setup_data()
        trainer.setup_model()
    finally:
        trainer.close()
    saved = load_adapter(run / "adapter", tiny_model()[0]).state_dict()
    got = trainer.adapter.state_dict()
    assert saved.keys() == got.keys() and all(torch.equal(saved[k], got[k]) for k in saved)

    for overrides, words in [(("method.r=4",), "lora_A.weight is [8, 128] there and [4, 128] here"),
                             (("method=para",), "holds a lora adapter and this run trains para"),
                             ((f"trainer.init_from={tmp_path / 'none'}",), "does not exist")]:
        with pytest.raises(ConfigError) as e:
            validate(compose_config(*RUN_OVERRIDES, f"trainer.init_from={run}", *overrides))
        assert e.value.key == "trainer.init_from" and words in e.value.message, e.value.message


TRAIN = (*RUN_OVERRIDES, "trainer.max_steps=4", "trainer.save_every=2", "trainer.save_total_limit=0",
         "trainer.eval_every=0", "trainer.micro_batch_size=8", "trainer.eval_batch_size=8", "trainer.progress=false")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_resume_from_a_chosen_checkpoint(tmp_path):
    from peftrun.train.resume_point import check_resumable
    from peftrun.train.loop import train
    from peftrun.validate import validate

    first = tmp_path / "first"
    train(compose_config(*TRAIN), first)
    step2 = first / "checkpoints" / "step-00000002"
    final = weights(first / "adapter")

    # Into another folder: it continues from step 2 to the adapter the first run ended with.
    fork = tmp_path / "fork"
    cfg = compose_config(*TRAIN, f"trainer.resume_from={step2}")
    validate(cfg)
    assert check_resumable(fork, cfg) == step2
    train(cfg, fork)
    assert all(torch.equal(final[k], v) for k, v in weights(fork / "adapter").items())
    assert json.loads((fork / "resumed_from.json").read_text()) == {"checkpoint": str(step2), "step": 2}

    # Back in its own folder: later checkpoints are set aside; once the run has saved newer ones,
    # the same command resumes from those.
    train(cfg, first)
    names = sorted(p.name for p in (first / "checkpoints").iterdir())
    assert names == ["abandoned-step-00000004", "step-00000002", "step-00000004"]
    assert check_resumable(first, cfg) == first / "checkpoints" / "step-00000004"
    assert all(torch.equal(final[k], v) for k, v in weights(first / "adapter").items())

    # Refused in one line: a run folder, an incomplete checkpoint, another config.
    step4 = first / "checkpoints" / "step-00000004"
    (step4 / "trainer_state.json").write_text("{}")
    for folder, overrides, words in [(first, (), "is a run folder"),
                                     (step4, (), "is not a complete checkpoint"),
                                     (step2, ("trainer.lr=0.5",), "another config (trainer.lr: 0.003 -> 0.5)")]:
        with pytest.raises(ConfigError) as e:
            validate(compose_config(*TRAIN, *overrides, f"trainer.resume_from={folder}"))
        assert e.value.key == "trainer.resume_from" and words in e.value.message, e.value.message


def test_a_path_holding_equals_is_one_value():
    from peftrun.cli import quote_paths

    argv = ["trainer.init_from=outputs/method.r=4,trainer.lr=0.1", "trainer.lr=0.1", "trainer.resume_from=a/b"]
    assert quote_paths(argv) == ["trainer.init_from='outputs/method.r=4,trainer.lr=0.1'", *argv[1:]]
    assert compose_config(*quote_paths(argv)).trainer.init_from == "outputs/method.r=4,trainer.lr=0.1"


def test_the_trainer_keys_are_in_the_schema_and_the_yaml():
    import dataclasses

    from peftrun.config import TrainerConfig

    yaml = OmegaConf.load(Path(__file__).resolve().parent.parent / "peftrun" / "conf" / "trainer" / "default.yaml")
    assert set(yaml) - {"defaults"} <= {f.name for f in dataclasses.fields(TrainerConfig)}
    assert yaml.init_from is None and yaml.resume_from is None
    assert (compose_config().trainer.init_from, compose_config().trainer.resume_from) == (None, None)


# ----------------------------------------------------------------------------------- templates
def test_a_typed_backslash_n_in_a_template_is_a_newline(tmp_path, monkeypatch):
    """The README's jsonl example, on the tiny model, with a `\\n` typed in Hydra's quotes."""
    from peftrun.validate import validate

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(
        "".join(json.dumps({"question": f"max {d}?", "answer": max(d)}) + "\n" for d in ("381", "42", "907")))
    cfg = compose_config("model=tiny", "task=jsonl", "task.train_file=data/train.jsonl",
                         "task.prompt_template='Question: {question}\\nAnswer:'", "task.target_template=' {answer}'",
                         "trainer.micro_batch_size=1")
    assert cfg.task.prompt_template == "Question: {question}\\nAnswer:"  # Hydra keeps the backslash
    example = validate(cfg).task.examples("train")[0]
    assert "\nAnswer:" in example.prompt and example.target.startswith(" ")
    from peftrun.tasks.template import render_template

    assert render_template("a\\\\nb\\tc\\d", {}) == "a\\nb\tc\\d"


def test_the_commands_are_console_scripts():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts") if e.name.startswith("peftrun")}
    assert {"peftrun-export": "peftrun.export:main", "peftrun-eval": "peftrun.evaluate:main",
            "peftrun-generate": "peftrun.serve:main"}.items() <= scripts.items()
    assert Path(sys.executable).with_name("peftrun-export").exists()
