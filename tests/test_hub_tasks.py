"""The papers' tasks on small fixtures in each dataset's own schema (written here, not copied
from the datasets): local files -> fields -> template -> tokenize/collate -> metric. Nothing
touches the network: conftest sets HF_HUB_OFFLINE and every task reads task.data_files."""

from __future__ import annotations

import json
import os

import pytest

from conftest import compose_config
from peftrun.data import collate_train, tokenize_examples
from peftrun.errors import ConfigError
from peftrun.models import offline_tokenizer
from peftrun.tasks import TASKS, build_task


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# --------------------------------------------------------------------- one fixture per schema
def squad(i):
    ctx = f"The tower {i} stands in Paris near the river."
    return {"id": f"q{i}", "title": "Towers", "context": ctx, "question": f"Where is tower {i}?",
            "answers": {"text": ["Paris", "in Paris"], "answer_start": [19, 16]}}


def gsm8k(i):
    return {"question": f"Tom has {i} apples and buys 2 more. How many?",
            "answer": f"He has {i} + 2 = <<{i}+2={i + 2}>>{i + 2} apples.\n#### {i + 2}"}


def dialogsum(i):
    return {"id": f"d{i}", "dialogue": f"#Person1#: Hi, table for {i}?\n#Person2#: Sure.",
            "summary": f"Person1 books a table for {i}.", "topic": "restaurant"}


def hellaswag(i):
    return {"ind": i, "activity_label": "Baking", "ctx_a": "A man mixes flour.",
            "ctx_b": "he", "ctx": "A man mixes flour. he",
            "endings": ["pours it in a pan.", "flies away.", "sings.", "sleeps."],
            "source_id": "x", "split": "train", "split_type": "indomain", "label": str(i % 4)}


def siqa(i):
    return {"context": f"Sam gave Alex {i} books.", "question": "How would Alex feel?",
            "answerA": "grateful", "answerB": "angry", "answerC": "bored", "label": str(i % 3 + 1)}


def copa(i):
    return {"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
            "choice2": "He got a hole in his sock.", "question": ["cause", "effect"][i % 2],
            "idx": i, "label": i % 2}


def sst2(i):
    return {"sentence": f"a {'wonderful' if i % 2 else 'dull'} film number {i}",
            "label": i % 2, "idx": i}


def rte(i):
    return {"sentence1": f"Ann bought {i} cars.", "sentence2": "Ann bought cars.",
            "label": i % 2, "idx": i}


def qnli(i):
    return {"question": f"Who wrote book {i}?", "sentence": f"Book {i} was written by Bo.",
            "label": i % 2, "idx": i}


def boolq(i):
    return {"question": f"is {i} even", "answer": i % 2 == 0,
            "passage": f"Even numbers are divisible by two; {i} is a number."}


def record(i):
    return {"passage": f"Lyon beat Nice {i}-0.\n@highlight\nLyon won",
            "query": "@placeholder won the match.", "entities": ["Lyon", "Nice", "Lyon"],
            "entity_spans": {"text": ["Lyon", "Nice"], "start": [0, 10], "end": [4, 14]},
            "answers": ["Lyon"], "idx": {"passage": i, "query": 0}}


def iwslt2017(i):
    return {"translation": {"en": f"I see {i} cats.", "de": f"Ich sehe {i} Katzen."}}


def e2e_nlg(i):
    return {"meaning_representation": f"name[Pub {i // 2}], food[Thai]",
            "human_reference": f"Pub {i // 2} serves Thai food{'.' if i % 2 else ' !'}"}


def alpaca(i):
    return {"instruction": f"Add one to {i}.", "input": "" if i % 2 else "show your work",
            "output": str(i + 1)}


FIXTURES = {"squad": squad, "gsm8k": gsm8k, "dialogsum": dialogsum, "hellaswag": hellaswag,
            "siqa": siqa, "copa": copa, "sst2": sst2, "rte": rte, "qnli": qnli, "boolq": boolq,
            "record": record, "iwslt2017": iwslt2017, "e2e_nlg": e2e_nlg, "alpaca": alpaca}
DEV_SPLIT = {"gsm8k": "test", "alpaca": None}  # the source split each yaml reads as dev


def local_task(name, tmp_path, n_train=12, n_dev=8, *overrides):
    files = {"train": write_jsonl(tmp_path / "train.jsonl", [FIXTURES[name](i) for i in range(n_train)])}
    dev = DEV_SPLIT.get(name, "validation")
    if dev:
        files[dev] = write_jsonl(tmp_path / "dev.jsonl",
                                 [FIXTURES[name](100 + i) for i in range(n_dev)])
    spec = "{" + ",".join(f"{k}:{v}" for k, v in files.items()) + "}"
    cfg = compose_config(f"task={name}", f"task.data_files={spec}", *overrides)
    return build_task(cfg.task), cfg


def test_every_paper_task_has_a_fixture_and_a_config():
    from conftest import CONF

    assert set(FIXTURES) <= set(TASKS)
    assert set(FIXTURES) <= {p.stem for p in (CONF / "task").glob("*.yaml")}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_task_from_local_files_to_metric(name, tmp_path):
    task, cfg = local_task(name, tmp_path)
    task.validate()
    train, dev, test = (task.examples(s) for s in ("train", "dev", "test"))
    assert train and dev and test
    assert not {e.id for e in dev} & {e.id for e in test}
    for ex in train[:3]:
        assert "{" not in ex.prompt.replace("{{", "") or name == "alpaca"
        assert ex.target.strip() and ex.references
    features, report = tokenize_examples(train, offline_tokenizer(), cfg.task.max_length)
    assert report.kept == len(train) and report.dropped == 0
    batch = collate_train(features, 0)
    assert batch["input_ids"].shape == batch["labels"].shape
    assert (batch["labels"] != -100).any() and (batch["prompt_mask"] == 1).any()
    # Predicting every target scores full marks on the primary metric; garbage scores less.
    scores = task.score([" " + e.target for e in test], test)
    assert scores[task.primary_metric] == pytest.approx(100.0)
    assert task.score(["zzz qqq"] * len(test), test)[task.primary_metric] < 100.0


def test_squad_renders_the_template_and_keeps_every_answer(tmp_path):
    task, _ = local_task("squad", tmp_path)
    ex = task.examples("train")[0]
    assert ex.prompt.startswith("Context: The tower") and ex.prompt.endswith("\nAnswer:")
    assert ex.target == " Paris" and ex.references == ["Paris", "in Paris"]
    assert task.score(["in paris!", "Lyon"], task.examples("dev")[:2]) == {
        "exact_match": 50.0, "f1": 50.0, "em_f1": 50.0}


def test_unlabelled_records_are_skipped(tmp_path):
    records = [sst2(i) for i in range(6)] + [{"sentence": "x", "label": -1, "idx": 99}]
    files = {"train": write_jsonl(tmp_path / "t.jsonl", records),
             "validation": write_jsonl(tmp_path / "v.jsonl", [sst2(i) for i in range(4)])}
    cfg = compose_config("task=sst2", f"task.data_files={{train:{files['train']},validation:{files['validation']}}}")
    assert len(build_task(cfg.task).examples("train")) == 6


def test_choice_prompts_list_letters_and_target_is_the_letter(tmp_path):
    task, _ = local_task("siqa", tmp_path)
    ex = task.examples("train")[1]  # label "2"
    assert "A. grateful\nB. angry\nC. bored" in ex.prompt and ex.target == " B"
    task, _ = local_task("copa", tmp_path, 12, 8, "task.target_template=' {answer_text}'")
    assert task.examples("train")[0].target == " He dropped a hammer on his foot."


def test_e2e_groups_references_of_one_input(tmp_path):
    task, _ = local_task("e2e_nlg", tmp_path, 12, 8, "task.split_recipe=original")
    dev = task.examples("dev")
    assert len(dev) == 4 and all(len(e.references) == 2 for e in dev)
    assert len(task.examples("train")) == 12  # every reference is a training target


def test_iwslt_language_pair_picks_the_hub_config_and_fields(tmp_path):
    cfg = compose_config("task=iwslt2017", "task.source_lang=de", "task.target_lang=en")
    assert cfg.task.hub_config == "iwslt2017-de-en"
    task, _ = local_task("iwslt2017", tmp_path, 12, 8, "task.source_lang=de", "task.target_lang=en")
    ex = task.examples("train")[0]
    assert ex.prompt.startswith("Translate from German to English:\nIch sehe 0 Katzen.")
    assert ex.target == " I see 0 cats."
    with pytest.raises(ConfigError, match="task.target_lang"):
        build_task(compose_config("task=iwslt2017", "task.target_lang=xx").task)


# ----------------------------------------------------------------------------- errors
def test_missing_local_file_is_a_config_error(tmp_path):
    cfg = compose_config("task=squad", f"task.data_files={tmp_path}/nope.jsonl")
    with pytest.raises(ConfigError, match="task.data_files.*does not exist"):
        build_task(cfg.task).validate()


def test_wrong_schema_names_what_the_task_needs(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "text": "a"}] * 4)
    cfg = compose_config("task=squad", f"task.data_files={path}")
    with pytest.raises(ConfigError, match="needs context, question, answers.text"):
        build_task(cfg.task).validate()


def test_unknown_template_field_lists_the_fields(tmp_path):
    task, _ = local_task("boolq", tmp_path, 12, 8, "task.prompt_template='{nope}'")
    with pytest.raises(ConfigError, match=r"task.prompt_template.*\{passage\}"):
        task.validate()


def test_missing_split_is_named(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [sst2(i) for i in range(4)])
    cfg = compose_config("task=sst2", f"task.data_files={{validation:{path}}}")
    with pytest.raises(ConfigError, match="task.train_split.*no split 'train'"):
        build_task(cfg.task).validate()


def test_hub_failure_names_the_task_and_local_files(monkeypatch):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    task = build_task(compose_config("task=squad", "task.hub_id=nobody/no-such-dataset-p7").task)
    task.validate()  # offline: no network in validate, checked lazily
    with pytest.raises(ConfigError) as err:
        task.examples("train")
    text = str(err.value)
    assert text.startswith("task.hub_id:") and "task squad" in text and "task.data_files=" in text
    assert "\n" not in text


# ------------------------------------------------------------------------ split recipe
def test_paper_recipe_halves_a_small_dev_set_seeded(tmp_path):
    task, _ = local_task("sst2", tmp_path, 20, 10)
    dev, test = task.examples("dev"), task.examples("test")
    assert len(dev) == 5 and len(test) == 5 and len(task.examples("train")) == 20
    again, _ = local_task("sst2", tmp_path, 20, 10)
    assert [e.id for e in again.examples("dev")] == [e.id for e in dev]
    other, _ = local_task("sst2", tmp_path, 20, 10, "task.seed=7")
    assert [e.id for e in other.examples("dev")] != [e.id for e in dev]


def test_paper_recipe_on_a_large_train_set_moves_1k_to_dev():
    from peftrun.tasks.splits import make_splits

    splits = make_splits(list(range(12_000)), list(range(-50, 0)), None, "paper", 42)
    assert len(splits["dev"]) == 1000 and len(splits["train"]) == 11_000
    assert splits["test"] == list(range(-50, 0))
    assert not set(splits["dev"]) & set(splits["train"])


def test_original_recipe_and_held_out_dev(tmp_path):
    task, _ = local_task("sst2", tmp_path, 20, 10, "task.split_recipe=original")
    assert len(task.examples("dev")) == 10 and task.examples("test") == task.examples("dev")
    task, _ = local_task("alpaca", tmp_path, 30, 0)  # train only: dev held out, then halved
    assert len(task.examples("train")) == 27 and len(task.examples("dev")) == 1
    assert len(task.examples("test")) == 2


def test_max_samples_cap_after_the_split(tmp_path):
    task, _ = local_task("sst2", tmp_path, 20, 10, "task.max_train_samples=3",
                         "task.max_eval_samples=2")
    assert [len(task.examples(s)) for s in ("train", "dev", "test")] == [3, 2, 2]


@pytest.mark.parametrize("error,reason", [
    (type("GatedRepoError", (Exception,), {})("Access to dataset x is restricted (gated)"), "gated"),
    (type("RepositoryNotFoundError", (Exception,), {})("404 Client Error"), "no such dataset"),
    (ConnectionError("Failed to resolve 'huggingface.co'"), "cannot be reached"),
])
def test_hub_errors_say_why_and_how_to_use_local_files(error, reason, monkeypatch):
    import huggingface_hub

    from peftrun.tasks.hub import check_hub

    def refuse(self, *args, **kwargs):
        raise error

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", refuse)  # no network either way
    with pytest.raises(ConfigError) as err:
        check_hub("gsm8k", "openai/gsm8k", "main", None, "test")
    text = str(err.value)
    assert reason in text and "task gsm8k" in text
    assert "task.data_files={train:train.jsonl,test:dev.jsonl}" in text


def test_a_local_split_the_task_does_not_read_is_refused(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [gsm8k(i) for i in range(4)])
    dev = write_jsonl(tmp_path / "d.jsonl", [gsm8k(i) for i in range(4)])
    cfg = compose_config("task=gsm8k", f"task.data_files={{train:{train},validation:{dev}}}")
    with pytest.raises(ConfigError, match="'validation' is not read by task gsm8k.*task.dev_split=validation"):
        build_task(cfg.task).validate()
