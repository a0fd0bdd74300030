"""task=chat: layouts, rendering through a chat template, labels on assistant replies, the prompt
mask, truncation by whole turns, test prompts, bad data (one line, exit 2, or a counted skip)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from conftest import compose_config, run_cli
from peftrun.config import ChatTaskConfig
from peftrun.data import IGNORE_INDEX, encode_prompts, tokenize_examples
from peftrun.errors import ConfigError
from peftrun.models import offline_tokenizer
from peftrun.tasks import bind_tokenizer, build_task
from peftrun.tasks.chat import ChatTask
from peftrun.tasks.chat_format import DEFAULT_TEMPLATE

# SmolLM2-Instruct's template (ChatML with a default system message): carried here, nothing downloads.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SYSTEM = {"role": "system", "content": "Be brief."}


def msg(role, content):
    return {"role": role, "content": content}


TWO_TURNS = {"messages": [SYSTEM, msg("user", "2+2?"), msg("assistant", "4"),
                          msg("user", "and 3+3?"), msg("assistant", "6")]}
SHAREGPT = {"conversations": [{"from": "human", "value": "sky?"}, {"from": "gpt", "value": "blue"}]}


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return offline_tokenizer()


def chat_task(tmp_path, rows, tok=None, dev=None, **kw):
    """A bound chat task over `rows` (train) and `dev` rows (default: the same)."""
    train = write(tmp_path / "train.jsonl", rows)
    devf = write(tmp_path / "dev.jsonl", dev if dev is not None else rows)
    task = ChatTask(OmegaConf.structured(ChatTaskConfig(train_file=str(train), dev_file=str(devf), **kw)))
    task.validate()
    if tok is not None:
        bind_tokenizer(task, tok)
    return task


def trained_text(tok, feature):
    return tok.decode([i for i, label in zip(feature["input_ids"], feature["labels"]) if label != IGNORE_INDEX])


# ------------------------------------------------------------------------------ layouts and rendering
def test_layouts_and_role_names(tmp_path, tok):
    rows = [TWO_TURNS, SHAREGPT,
            {"dialog": [{"speaker": "customer", "text": "hi"}, {"speaker": "agent", "text": "hello"}]}]
    task = chat_task(tmp_path, rows[:2], tok)
    assert [ex.target for ex in task.examples("train")] == ["6", "blue"]
    custom = chat_task(tmp_path, rows[2:], tok, messages_field="dialog", role_field="speaker",
                       content_field="text", roles={"customer": "user", "agent": "assistant"})
    ex = custom.examples("train")[0]
    assert ex.prompt == "<|im_start|>user\nhi</s>\n<|im_start|>assistant\n" and ex.target == "hello"


@pytest.mark.parametrize("train_on,replies", [("all_assistant", ["4<|im_end|>", "6<|im_end|>"]),
                                              ("last_assistant", ["6<|im_end|>"])])
def test_labels_cover_the_replies_and_their_end_of_turn(tmp_path, tok, train_on, replies):
    task = chat_task(tmp_path, [TWO_TURNS], tok, chat_template=SMOLLM2, train_on=train_on)
    (ex,) = task.examples("train")
    full = tok.apply_chat_template(TWO_TURNS["messages"], chat_template=SMOLLM2, tokenize=False)
    assert "".join(t for t, _ in ex.segments) == full  # the segments are the rendered conversation
    assert [t for t, trained in ex.segments if trained] == replies
    (feat,), report = tokenize_examples([ex], tok, 256)
    labelled = [tok.decode([i]) for i, lab in zip(feat["input_ids"], feat["labels"]) if lab != IGNORE_INDEX]
    assert "".join(labelled) == "".join(replies)
    # The prompt mask: every token before the first trained reply (the system message, user turn
    # and the assistant header); the test prompt is the conversation before the last reply.
    first = next(i for i, lab in enumerate(feat["labels"]) if lab != IGNORE_INDEX)
    assert feat["prompt_mask"] == [1] * first + [0] * (len(feat["input_ids"]) - first)
    assert tok.decode(feat["input_ids"][:first], skip_special_tokens=True).endswith(
        "2+2?<|im_end|>\n<|im_start|>assistant\n" if train_on == "all_assistant" else "3+3?<|im_end|>\n<|im_start|>assistant\n")
    assert ex.prompt == tok.apply_chat_template(TWO_TURNS["messages"][:-1], chat_template=SMOLLM2,
                                                tokenize=False, add_generation_prompt=True)
    assert ex.target == "6" and report.kept == 1


def test_default_template_closes_replies_with_eos_and_generation_sees_the_training_prefix(tmp_path, tok):
    assert tok.chat_template is None
    task = chat_task(tmp_path, [TWO_TURNS], tok, train_on="last_assistant")
    assert task.template == DEFAULT_TEMPLATE
    (ex,) = task.examples("test")
    (feat,), _ = tokenize_examples([ex], tok, 256)
    assert trained_text(tok, feat) == "6</s>" and feat["labels"][-2] == tok.eos_token_id  # learns to stop
    first = feat["prompt_mask"].index(0)
    prompt_ids = encode_prompts([ex.prompt], tok, 256)["input_ids"][0].tolist()
    assert prompt_ids == feat["input_ids"][:first]  # one BOS, the same ids as in training


def test_a_template_that_writes_bos_gets_no_second_one(tmp_path, tok):
    template = "{{ bos_token }}" + DEFAULT_TEMPLATE
    (ex,) = chat_task(tmp_path, [TWO_TURNS], tok, chat_template=template).examples("test")
    (feat,), _ = tokenize_examples([ex], tok, 256)
    assert feat["input_ids"][:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<")]
    prompt_ids = encode_prompts([ex.prompt], tok, 256)["input_ids"][0].tolist()
    assert prompt_ids == feat["input_ids"][:len(prompt_ids)] and prompt_ids.count(tok.bos_token_id) == 1


def test_generate_prompts_and_the_token_cache(tmp_path, tok, monkeypatch):
    from peftrun.tasks.chat_format import chat_prompt
    from peftrun.token_cache import tokenize_cached

    assert chat_prompt({"chat_template": None}, tok, "hi") == "<|im_start|>user\nhi</s>\n<|im_start|>assistant\n"
    monkeypatch.setenv("PEFTRUN_CACHE", str(tmp_path / "cache"))
    long = {"messages": [SYSTEM, *[msg(r, "x" * 40) for r in ("user", "assistant") * 3]]}
    examples = chat_task(tmp_path, [long, TWO_TURNS], tok, max_length=120).examples("train")
    first = tokenize_cached(examples, tok, 120, min_examples=1)
    again = tokenize_cached(examples, tok, 120, min_examples=1)
    assert (first[2], again[2]) == (False, True) and first[0] == again[0]
    assert again[1].shortened == 1 and str(again[1]) == str(first[1])


def test_template_from_a_file_and_system_message_kept(tmp_path, tok):
    path = tmp_path / "chatml.jinja"
    path.write_text(SMOLLM2)
    (ex,) = chat_task(tmp_path, [SHAREGPT], tok, chat_template=str(path)).examples("train")
    assert ex.prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_long_conversations_lose_whole_turns_from_the_left(tmp_path, tok):
    turns = [m for i in range(6) for m in (msg("user", f"question {i}?"), msg("assistant", f"answer {i}"))]
    long = {"messages": [SYSTEM, *turns]}
    huge_last = {"messages": [SYSTEM, msg("user", "x" * 300), msg("assistant", "y")]}
    task = chat_task(tmp_path, [long, huge_last], tok, max_length=160)
    short, too_long = task.examples("train")
    assert short.turns_dropped > 0
    text = "".join(t for t, _ in short.segments)
    assert text.startswith("<|im_start|>system\nBe brief.")  # the system message stays
    assert "question 0?" not in text and "answer 5</s>" in text
    assert all(t.endswith("</s>") for t, trained in short.segments if trained)  # no reply is cut
    features, report = tokenize_examples([short, too_long], tok, 160)
    assert len(features) == 1 and len(features[0]["input_ids"]) <= 160
    assert (report.kept, report.dropped, report.shortened) == (1, 1, 1)
    assert "1 conversations shortened by whole turns from the left" in str(report)


def test_dev_is_held_out_and_test_is_dev(tmp_path, tok):
    rows = [{"messages": [msg("user", f"q{i}"), msg("assistant", f"a{i}")]} for i in range(20)]
    f = write(tmp_path / "c.jsonl", rows)
    task = ChatTask(OmegaConf.structured(ChatTaskConfig(train_file=str(f), max_train_samples=5)))
    task.validate()
    with pytest.raises(RuntimeError, match="bind_tokenizer"):
        task.examples("train")
    bind_tokenizer(task, tok)
    train, dev, test = (task.examples(s) for s in ("train", "dev", "test"))
    assert len(train) == 5 and len(dev) == 2 and test == dev
    assert not {e.id for e in train} & {e.id for e in dev}


def test_json_list_and_parquet_files(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "c.json").write_text(json.dumps([TWO_TURNS, SHAREGPT]))
    pq.write_table(pa.Table.from_pylist([TWO_TURNS, TWO_TURNS]), tmp_path / "c.parquet")
    for name in ("c.json", "c.parquet"):
        path = str(tmp_path / name)
        task = ChatTask(OmegaConf.structured(ChatTaskConfig(train_file=path, dev_file=path)))
        task.validate()
        bind_tokenizer(task, tok)
        assert [e.target for e in task.examples("dev")][:1] == ["6"]


def test_hub_dataset_splits(tmp_path, tok, monkeypatch):
    import peftrun.tasks.hub as hub

    rows = [{"messages": [msg("user", f"q{i}"), msg("assistant", f"a{i}")]} for i in range(4)]
    monkeypatch.setattr(hub, "load_records", lambda *a, **k: {"train": rows, "test": rows[:1]})
    task = ChatTask(OmegaConf.structured(ChatTaskConfig(hub_id="me/chats", dev_split="test")))
    task.validate()
    bind_tokenizer(task, tok)
    assert len(task.examples("train")) == 4 and [e.target for e in task.examples("test")] == ["a0"]
    bad = ChatTask(OmegaConf.structured(ChatTaskConfig(hub_id="me/chats", dev_split="validation")))
    with pytest.raises(ConfigError, match="has no split 'validation'; it has train, test"):
        bad.validate()

    def unreachable(*a, **k):
        raise hub.hub_error("chat", "me/chats", None, ConnectionError("offline"), None)

    monkeypatch.setattr(hub, "load_records", unreachable)
    offline = ChatTask(OmegaConf.structured(ChatTaskConfig(hub_id="me/chats")))
    with pytest.raises(ConfigError, match=r"cannot be reached \(offline\?\): give local files instead, "
                                          r"e.g. task.train_file=chat.jsonl$"):
        offline.validate()


def test_score():
    task = ChatTask(OmegaConf.structured(ChatTaskConfig(train_file="x.jsonl", metric="rougeL")))
    from peftrun.tasks.base import Example

    scores = task.score(["Paris", "the cat sat"], [Example("p", "Paris"), Example("p", "the cat sat down")])
    assert task.primary_metric == "rougeL" and scores["exact_match"] == 50.0 and 50 < scores["rougeL"] < 100


# ------------------------------------------------------------------------------ bad data
GOOD = {"messages": [msg("user", "hi"), msg("assistant", "hello")]}
RAISES = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}{{ m['content'] }}{% endfor %}"

# (id, record on line 2, extra task options, config key, texts the one line must hold)
BAD_DATA = [
    ("no_messages_field", {"text": "hi"}, {}, "task.train_file",
     ['has no "messages" (or "conversations") field (fields there: text)', "task.messages_field"]),
    ("unknown_role", {"messages": [msg("narrator", "once"), msg("assistant", "x")]}, {}, "task.train_file",
     ["message 1 with role 'narrator'", "'task.roles={narrator: user}'"]),
    ("no_assistant_turn", {"messages": [msg("user", "hi")]}, {}, "task.train_file",
     ["no assistant message to train on", "at least one assistant reply"]),
    ("content_not_a_string", {"messages": [msg("user", "hi"), msg("assistant", ["x"])]}, {}, "task.train_file",
     ['message 2 whose "content" is a list, not a string', "as a string"]),
    ("message_not_an_object", {"messages": ["hi", msg("assistant", "x")]}, {}, "task.train_file",
     ["message 1 as a string", "role and a content"]),
    ("not_json", "{oops", {}, "task.train_file", ["is not valid JSON", "one JSON object per line"]),
    ("template_fails_to_render", {"messages": [SYSTEM, msg("user", "hi"), msg("assistant", "x")]},
     {"task.chat_template": RAISES}, "task.train_file",
     ["fails to render with the chat template", "no system messages", "task.chat_template"]),
    ("template_syntax", GOOD, {"task.chat_template": "{% for m in messages %}{{ m.content }"},
     "task.chat_template", ["does not parse (line 1", "Jinja syntax"]),
    ("bad_role_mapping", GOOD, {"task.roles": {"bot": "robot"}}, "task.roles", ["maps 'bot' to 'robot'"]),
    ("bad_train_on", GOOD, {"task.train_on": "every"}, "task.train_on", ["all_assistant, last_assistant"]),
]


def compose_chat(tmp_path, record, extra):
    train = write(tmp_path / "train.jsonl", [GOOD, record, GOOD])
    overrides = ["task=chat", f"task.train_file={train}", "task.max_length=256", "trainer.micro_batch_size=1"]
    cfg = compose_config(*overrides)
    for key, value in extra.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg, train


@pytest.mark.parametrize("case,record,extra,key,texts", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_chat_data_is_one_line_naming_file_line_and_fix(tmp_path, case, record, extra, key, texts):
    from peftrun.validate import validate

    cfg, train = compose_chat(tmp_path, record, extra)
    with pytest.raises(ConfigError) as e:
        validate(cfg)  # what the command line runs before any weights load
    assert e.value.key == key, e.value
    assert "\n" not in str(e.value)
    if key == "task.train_file":
        assert f"line 2 of {train}" in e.value.message, e.value.message
        if case != "not_json":
            assert "task.skip_invalid=true" in e.value.message
    for text in texts:
        assert text in e.value.message, e.value.message


@pytest.mark.parametrize("case,record,extra", [c[:3] for c in BAD_DATA if c[3] == "task.train_file" and c[0] != "not_json"],
                         ids=[c[0] for c in BAD_DATA if c[3] == "task.train_file" and c[0] != "not_json"])
def test_skip_invalid_counts_and_skips(tmp_path, capsys, case, record, extra):
    from peftrun.validate import validate

    cfg, train = compose_chat(tmp_path, record, {**extra, "task.skip_invalid": True, "task.dev_file": str(tmp_path / "d.jsonl")})
    write(tmp_path / "d.jsonl", [GOOD])
    prepared = validate(cfg)
    assert len(prepared.task.examples("train")) == 2
    assert f"skipped 1 invalid record(s) of task.train_file (task.skip_invalid=true); the first: line 2 of {train}" \
        in capsys.readouterr().err


@pytest.mark.slow
def test_cli_refuses_bad_chat_data_before_any_weights(tmp_path):
    write(tmp_path / "chat.jsonl", [GOOD, {"messages": [msg("user", "hi"), msg("bot", "x")]}])
    out = run_cli("task=chat", "task.train_file=chat.jsonl", "task.max_length=256", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    line = out.stderr.strip()
    assert "\n" not in line and line.startswith("peftrun: error: task.train_file: line 2 of "), line
    assert "'task.roles={bot: user}'" in line
    assert not (tmp_path / "outputs").exists()
