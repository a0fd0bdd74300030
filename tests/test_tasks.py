"""Tasks (toy, jsonl), their registry and error messages, and the answer metrics."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from omegaconf import OmegaConf

from peftrun.config import JsonlTaskConfig, TaskConfig, ToyTaskConfig
from peftrun.errors import ConfigError
from peftrun.tasks import TASKS, Task, build_task
from peftrun.tasks.base import Example
from peftrun.tasks.jsonl import JsonlTask
from peftrun.tasks.metrics import (contains_match, exact_match, mean_score, normalize_answer,
                                   normalize_squad)
from peftrun.tasks.toy import ToyTask, render


# ------------------------------------------------------------------------------------ metrics
def test_normalize_answer():
    assert normalize_answer("  8 ") == "8"
    assert normalize_answer("a \t b\n c") == "a b c"
    assert normalize_answer("The Cat") == "The Cat"  # case kept by the default


def test_normalize_squad():
    assert normalize_squad("The  Cat, sat!") == "cat sat"
    assert normalize_squad("an apple") == "apple"


def test_exact_match_cases():
    assert exact_match(" 8", ["8"]) == 1.0
    assert exact_match("8 ", ["8"]) == 1.0
    assert exact_match("a  b", ["a b"]) == 1.0
    assert exact_match("88", ["8"]) == 0.0
    assert exact_match("paris", ["Paris"]) == 0.0
    assert exact_match("paris", ["Paris"], normalize_squad) == 1.0
    assert exact_match("Lutetia", ["Paris", "Lutetia"]) == 1.0  # any reference
    assert exact_match("x", []) == 0.0


def test_contains_match_cases():
    assert contains_match("the answer is 42.", ["42"]) == 1.0
    assert contains_match("4 2", ["42"]) == 0.0
    assert contains_match("it is big  cat", ["big cat"]) == 1.0  # whitespace normalized
    assert contains_match("nothing", ["x", "thing"]) == 1.0
    assert contains_match("anything", [""]) == 0.0  # empty reference matches only empty
    assert contains_match(" ", [""]) == 1.0


def test_mean_score():
    refs = [["1"], ["2"], ["3", "three"], ["4"]]
    assert mean_score(exact_match, ["1", " 2", "three", "5"], refs) == 75.0
    assert mean_score(exact_match, [], []) == 0.0
    with pytest.raises(ValueError):
        mean_score(exact_match, ["1"], [])


def test_example_references_default_to_target():
    assert Example("p", "t").references == ["t"]
    assert Example("p", "t", ["t", "u"]).references == ["t", "u"]


# ---------------------------------------------------------------------------------------- toy
def toy(**kw):
    return ToyTask(ToyTaskConfig(**kw))


@pytest.mark.parametrize("op,digits,target", [
    ("max", [3, 8, 1, 5], "8"), ("min", [3, 8, 1, 5], "1"), ("first", [3, 8, 1, 5], "3"),
    ("last", [3, 8, 1, 5], "5"), ("sort", [3, 8, 1, 5], "1358"),
    ("reverse", [3, 8, 1, 5], "5183"), ("sum", [3, 8, 1, 5], "17"), ("sum", [0, 0], "0"),
])
def test_toy_ops(op, digits, target):
    ex = render(op, digits)
    assert ex.prompt == f"{op} {''.join(map(str, digits))}="
    assert ex.target == target
    assert render("max", [3, 8, 1, 5]).prompt == "max 3815="


def test_toy_examples_are_correct():
    task = toy(ops=["max", "min", "first", "last", "sort", "sum"], num_train=300)
    for ex in task.examples("train"):
        op, rest = ex.prompt.split(" ")
        assert rest.endswith("=") and len(rest) == 5
        assert ex.target == render(op, [int(c) for c in rest[:-1]]).target


def test_toy_sizes_determinism_disjoint():
    a, b = toy(num_train=500, num_dev=50, num_test=60), toy(num_train=500, num_dev=50, num_test=60)
    splits = {s: [e.prompt for e in a.examples(s)] for s in ("train", "dev", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 500, "dev": 50, "test": 60}
    assert splits == {s: [e.prompt for e in b.examples(s)] for s in splits}
    all_prompts = [p for v in splits.values() for p in v]
    assert len(set(all_prompts)) == len(all_prompts)
    other = toy(num_train=500, num_dev=50, num_test=60, seed=7)
    assert [e.prompt for e in other.examples("test")] != splits["test"]


def test_toy_eval_sets_do_not_move_with_num_train():
    small, big = toy(num_train=10), toy(num_train=1000)
    for s in ("dev", "test"):
        assert [e.prompt for e in small.examples(s)] == [e.prompt for e in big.examples(s)]


def test_toy_whole_space_and_too_many():
    task = toy(ops=["max"], list_length=2, num_train=80, num_dev=10, num_test=10)
    prompts = {e.prompt for s in ("train", "dev", "test") for e in task.examples(s)}
    assert len(prompts) == 100
    with pytest.raises(ConfigError) as e:
        toy(ops=["max"], list_length=2, num_train=91, num_dev=10, num_test=0)
    assert e.value.key == "task.num_train" and "only 100 distinct prompts" in e.value.message


def test_toy_caps():
    task = toy(num_train=100, max_train_samples=7, max_eval_samples=3)
    assert [len(task.examples(s)) for s in ("train", "dev", "test")] == [7, 3, 3]


def test_toy_score():
    task = toy(ops=["max", "min"])
    exs = [render("max", [1, 2]), render("max", [3, 4]), render("min", [5, 6])]
    out = task.score([" 2", "3", "5"], exs)
    assert out["exact_match"] == pytest.approx(200 / 3)
    assert out["exact_match[op=max]"] == 50.0 and out["exact_match[op=min]"] == 100.0
    assert task.primary_metric == "exact_match"


@pytest.mark.parametrize("kw,key,text", [
    ({"ops": ["max", "mode"]}, "task.ops", "unknown op 'mode'"),
    ({"ops": []}, "task.ops", "is empty"),
    ({"ops": ["max", "max"]}, "task.ops", "twice"),
    ({"list_length": 0}, "task.list_length", "1 or more"),
    ({"num_dev": -1}, "task.num_dev", ">= 0"),
    ({"max_train_samples": -1}, "task.max_train_samples", ">= 0"),
])
def test_toy_config_errors(kw, key, text):
    with pytest.raises(ConfigError) as e:
        toy(**kw)
    assert e.value.key == key and text in e.value.message


def test_toy_from_dictconfig():
    cfg = OmegaConf.structured(ToyTaskConfig(ops=["sort"], num_train=5, num_dev=2, num_test=2))
    task = build_task(cfg)
    assert isinstance(task, ToyTask) and isinstance(task, Task)
    task.validate()
    assert len(task.examples("train")) == 5
    with pytest.raises(ValueError):
        task.examples("validation")


# -------------------------------------------------------------------------------------- jsonl
def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


QA = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)]


def jsonl(tmp_path, **kw):
    kw.setdefault("prompt_template", "Q: {question}\nA:")
    kw.setdefault("target_template", " {answer}")
    return JsonlTask(JsonlTaskConfig(**kw))


def test_jsonl_templates_and_splits(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", QA)
    dev = write_jsonl(tmp_path / "dev.jsonl", QA[:3])
    test = write_jsonl(tmp_path / "test.jsonl", [{"question": "x", "answer": "y", "id": 9}])
    task = jsonl(tmp_path, train_file=str(train), dev_file=str(dev), test_file=str(test))
    task.validate()
    tr = task.examples("train")
    assert len(tr) == 20
    assert (tr[0].prompt, tr[0].target, tr[0].references) == ("Q: q0\nA:", " a0", [" a0"])
    assert tr[1].id == "train.jsonl:2"
    assert [e.prompt for e in task.examples("dev")] == ["Q: q0\nA:", "Q: q1\nA:", "Q: q2\nA:"]
    (t,) = task.examples("test")
    assert (t.prompt, t.target, t.id) == ("Q: x\nA:", " y", "9")


def test_jsonl_holds_out_dev_and_test_is_dev(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", QA)
    task = jsonl(tmp_path, train_file=str(train))
    tr, dev, test = (task.examples(s) for s in ("train", "dev", "test"))
    assert len(tr) == 18 and len(dev) == 2 and test == dev
    assert not {e.prompt for e in tr} & {e.prompt for e in dev}
    again = jsonl(tmp_path, train_file=str(train), max_train_samples=5)
    assert [e.prompt for e in again.examples("dev")] == [e.prompt for e in dev]  # fixed seed
    assert len(again.examples("train")) == 5


def test_jsonl_blank_lines_skipped_and_line_numbers_kept(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"prompt": "a", "target": "b"}\n\n{"prompt": "c", "target": "d"}\n\n')
    task = JsonlTask(JsonlTaskConfig(train_file=str(f), dev_file=str(f)))
    assert [e.id for e in task.examples("train")] == ["t.jsonl:1", "t.jsonl:3"]


def test_jsonl_relative_path_resolves_against_cwd(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "train.jsonl", QA)
    monkeypatch.chdir(tmp_path)
    task = jsonl(tmp_path, train_file="train.jsonl")
    monkeypatch.chdir("/")  # resolved at construction, so a later chdir does not matter
    task.validate()
    assert len(task.examples("train")) == 18


def test_jsonl_score(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", QA)
    task = jsonl(tmp_path, train_file=str(train), metric="contains")
    assert task.primary_metric == "contains"
    exs = [Example("p", " Paris"), Example("p", "42", ["42", "forty-two"])]
    out = task.score(["Paris, France", "forty-two"], exs)
    assert out == {"exact_match": 50.0, "contains": 100.0}


def expect_error(task_or_fn, key, *texts):
    with pytest.raises(ConfigError) as e:
        task_or_fn()
    assert e.value.key == key, e.value
    for t in texts:
        assert t in e.value.message, e.value.message
    assert "\n" not in str(e.value).replace("\\n", "")  # one line


def test_jsonl_errors(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", QA)
    missing = tmp_path / "nope.jsonl"
    expect_error(lambda: jsonl(tmp_path), "task.train_file", "is not set")
    expect_error(lambda: jsonl(tmp_path, train_file=str(missing)).validate(),
                 "task.train_file", f"{missing} does not exist")
    expect_error(lambda: jsonl(tmp_path, train_file=str(good), dev_file=str(missing)).validate(),
                 "task.dev_file", "does not exist")
    expect_error(lambda: jsonl(tmp_path, train_file=str(good), test_file=str(tmp_path)).validate(),
                 "task.test_file", "is not a file")
    expect_error(lambda: jsonl(tmp_path, train_file=str(good), metric="bleu"),
                 "task.metric", "unknown metric 'bleu'", "exact_match, contains")


def test_jsonl_malformed_lines(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [QA[0], '{"question": "q1", ', QA[2]])
    expect_error(lambda: jsonl(tmp_path, train_file=str(bad)).validate(),
                 "task.train_file", f"line 2 of {bad} is not valid JSON")
    arr = write_jsonl(tmp_path / "arr.jsonl", [QA[0], [1, 2]])
    expect_error(lambda: jsonl(tmp_path, train_file=str(arr)).examples("train"),
                 "task.train_file", f"line 2 of {arr} is a JSON list, not an object")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    expect_error(lambda: jsonl(tmp_path, train_file=str(empty)).validate(),
                 "task.train_file", "has no records")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    expect_error(lambda: jsonl(tmp_path, train_file=str(binary)).validate(),
                 "task.train_file", "cannot read")
    # A bad line past the records validate() peeks at is still caught when loading.
    late = write_jsonl(tmp_path / "late.jsonl", QA + ["not json"])
    task = jsonl(tmp_path, train_file=str(late))
    task.validate()
    expect_error(lambda: task.examples("dev"), "task.train_file", "line 21 of")


def test_jsonl_template_errors(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", QA)
    expect_error(lambda: jsonl(tmp_path, train_file=str(f), prompt_template="{x} {question}")
                 .validate(), "task.prompt_template",
                 f"field 'x' is missing from line 1 of {f}; fields there: question, answer")
    expect_error(lambda: jsonl(tmp_path, train_file=str(f), target_template="{label}")
                 .validate(), "task.target_template", "field 'label' is missing")
    expect_error(lambda: jsonl(tmp_path, train_file=str(f), prompt_template="{}").validate(),
                 "task.prompt_template", "positional")
    expect_error(lambda: jsonl(tmp_path, train_file=str(f), prompt_template="{question").validate(),
                 "task.prompt_template", "not a valid format string")
    # The field is missing only from a later file: validate() names that file and line.
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"question": "q"}])
    expect_error(lambda: jsonl(tmp_path, train_file=str(f), dev_file=str(dev)).validate(),
                 "task.target_template", f"line 1 of {dev}")


def test_jsonl_single_record_needs_dev_file(tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", QA[:1])
    expect_error(lambda: jsonl(tmp_path, train_file=str(one)).validate(),
                 "task.dev_file", "set task.dev_file")


def test_jsonl_literal_braces(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", QA)
    task = jsonl(tmp_path, train_file=str(f), dev_file=str(f), prompt_template="{{q}} {question}")
    assert task.examples("train")[0].prompt == "{q} q0"


# ----------------------------------------------------------------------------------- registry
def test_registry(tmp_path):
    assert {"toy": ToyTask, "jsonl": JsonlTask}.items() <= TASKS.items()
    assert all(cls.name == name for name, cls in TASKS.items())
    f = write_jsonl(tmp_path / "t.jsonl", QA)
    cfg = OmegaConf.structured(JsonlTaskConfig(train_file=str(f)))
    assert isinstance(build_task(cfg), JsonlTask)
    expect_error(lambda: build_task(replace(ToyTaskConfig(), name="nosuch")),
                 "task.name", "unknown task 'nosuch'", "toy, jsonl, squad")
    expect_error(lambda: build_task(OmegaConf.structured(TaskConfig)), "task.name")
