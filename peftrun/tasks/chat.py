"""Conversations (`task=chat`): your own chat data, rendered with the tokenizer's chat template,
the loss on assistant replies.

Layouts (field names configurable: task.messages_field, task.role_field, task.content_field):

    messages (OpenAI, TRL): {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}]}
    ShareGPT:               {"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}]}

Files: .jsonl (one record a line), .json (a list of records, or one a line), .parquet; or a Hub
dataset in the same layout (task.hub_id). `validate()` reads and checks every record (the field,
each role, each content a string, an assistant reply to train) and stops at the first bad one
with one line naming the file, the line and the fix, or counts and skips bad records where
task.skip_invalid=true. It needs no tokenizer.

`use_tokenizer()` renders each conversation prefix by prefix through the template:
render(messages[:k], add_generation_prompt=True) ends where reply k starts and
render(messages[:k + 1]) where it ends, so the reply's text and the template's end-of-turn marker
are known exactly whatever the template (trailing whitespace after the marker is not trained). A
template that rewrites earlier turns as the conversation grows cannot be split this way and is
refused for that record. A conversation longer than task.max_length loses whole turns from the
left (a turn: a user message and what follows it up to the next one; the system message stays)
until it fits; one that does not fit even with its last turn alone is dropped by the
tokenization (counted). A reply is never cut.

An example carries the rendered segments (peftrun.data labels them); its prompt is the
conversation before its last trained reply, rendered with the generation prompt, and its target
that reply's content: the test split generates from it and scores exact_match or rougeL.
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from peftrun.data import tokenize_conversation
from peftrun.errors import ConfigError
from peftrun.tasks.chat_format import (
    MESSAGES_FIELDS, ROLE_NAMES, ROLES, BadRecord, kind_of_value, read_messages, render, resolve_template,
    template_path,
)
from peftrun.tasks.base import SPLITS, Example, check_limits, check_split
from peftrun.tasks.metrics import exact_match, mean_score, rouge_l

TRAIN_ON = ("all_assistant", "last_assistant")
METRICS = ("exact_match", "rougeL")
FORMATS = (".jsonl", ".json", ".parquet")
DEV_FRACTION = 0.1  # held out of train when no dev file or split is given
DEV_SEED = 0
SKIP_HINT = "or set task.skip_invalid=true to skip such records"

@dataclass
class Conversation:
    messages: list[dict[str, str]]  # {"role": system | user | assistant, "content": str}
    where: str  # "line 3 of /data/train.jsonl"
    key: str  # the config key of its source (task.train_file, ...)
    id: str


def note(text: str) -> None:
    """One line on stderr, from the first process only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"chat: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------- reading
def read_file(path: Path, key: str) -> list[tuple[str, str, Any]]:
    """(where, id, record) for every record of a chat data file, in order."""
    if not path.exists():
        raise ConfigError(key, f"{path} does not exist; check the path (relative paths resolve "
                               f"against the directory you run from)")
    if not path.is_file():
        raise ConfigError(key, f"{path} is not a file; point it at a .jsonl, .json or .parquet file")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(key, f"{path.name}: unknown format; use a .jsonl, .json or .parquet file")
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        except Exception as e:
            raise ConfigError(key, f"cannot read {path} as parquet ({' '.join(str(e).split())[:200]}); "
                                   f"write a parquet file with a column of conversations") from None
        out = [(f"row {i} of {path}", f"{path.name}:{i}", r) for i, r in enumerate(rows, start=1)]
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(key, f"cannot read {path} as UTF-8 text ({e})") from None
        out = None
        if suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = None  # JSON lines under a .json name
            if isinstance(data, list):
                out = [(f"record {i} of {path}", f"{path.name}:{i}", r) for i, r in enumerate(data, start=1)]
            elif isinstance(data, dict):
                out = [(f"record 1 of {path}", f"{path.name}:1", data)]
        if out is None:
            out = []
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    out.append((f"line {lineno} of {path}", f"{path.name}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ConfigError(key, f"line {lineno} of {path} is not valid JSON ({e.msg}, column "
                                           f"{e.colno}); write one JSON object per line") from None
    if not out:
        raise ConfigError(key, f"{path} has no records; write one conversation per line")
    return out


# --------------------------------------------------------------------------------- the task
class ChatTask:
    name = "chat"

    def __init__(self, cfg):
        self.cfg = cfg
        check_limits(cfg)
        if cfg.metric not in METRICS:
            raise ConfigError("task.metric", f"unknown metric {cfg.metric!r}; use one of {', '.join(METRICS)}")
        if cfg.train_on not in TRAIN_ON:
            raise ConfigError("task.train_on", f"is {cfg.train_on!r}; use one of {', '.join(TRAIN_ON)}")
        self.primary_metric = cfg.metric
        self.roles = dict(ROLE_NAMES)
        for name, role in dict(cfg.roles or {}).items():
            if role not in ROLES:
                raise ConfigError("task.roles", f"maps {name!r} to {role!r}; map role names to "
                                                f"system, user or assistant")
            self.roles[str(name)] = role
        # Resolved once, at construction, so a later chdir (Hydra's job.chdir) cannot move them.
        self.files = {split: Path(p).expanduser().absolute() if p else None
                      for split, p in (("train", cfg.train_file), ("dev", cfg.dev_file),
                                       ("test", cfg.test_file))}
        self.template_file = template_path(cfg.chat_template)
        if self.files["train"] is None and not cfg.hub_id:
            raise ConfigError("task.train_file", "is not set; give a .jsonl, .json or .parquet file "
                                                 "of conversations, e.g. task.train_file=chat.jsonl "
                                                 "(or a Hub dataset: task.hub_id=...)")
        if self.files["train"] is not None and cfg.hub_id:
            raise ConfigError("task.hub_id", "is set together with task.train_file; read local "
                                             "files or a Hub dataset, not both (task.hub_id=null)")
        self._conversations: dict[str, list[Conversation]] | None = None
        self._splits: dict[str, list[Example]] | None = None
        self.skipped: dict[str, list[str]] = {}  # source key -> "where: reason" of each skipped record

    # ------------------------------------------------------------------ checks, no tokenizer
    def validate(self) -> None:
        """Every record of every split is a conversation to train; the template file exists."""
        if self.template_file is not None and not self.template_file.is_file():
            raise ConfigError("task.chat_template", f"{self.cfg.chat_template!r} is neither a Jinja "
                                                    f"template (it has no {{{{ or {{%) nor a file; "
                                                    f"give the template text or a path to a file")
        self._read()

    def parse(self, record: Any) -> list[dict[str, str]]:
        """The record's messages as {"role", "content"} with roles mapped; BadRecord if it is
        not a conversation with an assistant reply."""
        cfg = self.cfg
        if not isinstance(record, Mapping):
            raise BadRecord(f"is {kind_of_value(record)}, not an object; write one JSON object per conversation")
        field = cfg.messages_field or next((f for f in MESSAGES_FIELDS if f in record), None)
        if field not in record:
            wanted = f'"{cfg.messages_field}"' if cfg.messages_field else '"messages" (or "conversations")'
            fields = ", ".join(map(str, record)) or "none"
            raise BadRecord(f"has no {wanted} field (fields there: {fields}); write "
                            f'{{"messages": [{{"role": "user", "content": "..."}}, ...]}} or name '
                            f"the field with task.messages_field")
        out = read_messages(record[field], field, cfg.role_field, cfg.content_field, self.roles)
        if not any(m["role"] == "assistant" for m in out):
            raise BadRecord("has no assistant message to train on; give each conversation at least "
                            "one assistant reply")
        return out

    def _invalid(self, key: str, where: str, reason: str) -> None:
        if not self.cfg.skip_invalid:
            raise ConfigError(key, f"{where} {reason} ({SKIP_HINT})")
        self.skipped.setdefault(key, []).append(f"{where}: {reason}")

    def _sources(self) -> dict[str, tuple[str, list[tuple[str, str, Any]]]]:
        """{split: (config key, [(where, id, record)])} of the splits given."""
        cfg = self.cfg
        if not cfg.hub_id:
            return {split: (f"task.{split}_file", read_file(path, f"task.{split}_file"))
                    for split, path in self.files.items() if path is not None}
        from peftrun.tasks.hub import load_records, local_hint

        try:
            loaded = load_records(self.name, cfg.hub_id, cfg.hub_config, cfg.revision, {}, cfg.dev_split)
        except ConfigError as e:  # its hint names task.data_files, which chat does not read
            raise ConfigError(e.key, e.message.replace(local_hint(self.name, cfg.dev_split),
                                                       "give local files instead, e.g. "
                                                       "task.train_file=chat.jsonl")) from None
        out = {}
        for split, name in (("train", cfg.train_split), ("dev", cfg.dev_split), ("test", cfg.test_split)):
            if name is None:
                continue
            if name not in loaded:
                raise ConfigError(f"task.{split}_split", f"{cfg.hub_id} has no split {name!r}; it has "
                                                         f"{', '.join(loaded)}")
            out[split] = ("task.hub_id", [(f"row {i} of split {name} of {cfg.hub_id}", f"{name}:{i}", r)
                                          for i, r in enumerate(loaded[name], start=1)])
        return out

    def _read(self) -> None:
        if self._conversations is not None:
            return
        parsed: dict[str, list[Conversation]] = {}
        for split, (key, rows) in self._sources().items():
            conversations = []
            for where, ident, record in rows:
                try:
                    messages = self.parse(record)
                except BadRecord as e:
                    self._invalid(key, where, str(e))
                    continue
                own_id = record.get("id") if isinstance(record, Mapping) else None
                conversations.append(Conversation(messages, where, key, str(own_id) if own_id is not None else ident))
            if not conversations:
                raise ConfigError(key, f"no valid conversation in the {split} data ({len(rows)} "
                                       f"skipped); fix the records")
            parsed[split] = conversations
        train = parsed["train"]
        if "dev" not in parsed:
            if len(train) < 2:
                raise ConfigError("task.dev_file", "is not set and the train data has a single "
                                                   "conversation, too few to hold out a dev set; "
                                                   "set task.dev_file")
            # Held out before max_train_samples, so the dev set does not depend on it.
            held = set(random.Random(DEV_SEED).sample(range(len(train)), max(1, round(DEV_FRACTION * len(train)))))
            parsed["dev"] = [c for i, c in enumerate(train) if i in held]
            parsed["train"] = [c for i, c in enumerate(train) if i not in held]
        parsed.setdefault("test", parsed["dev"])
        self._conversations = parsed
        self._report_skipped()

    def _report_skipped(self) -> None:
        for key, reasons in self.skipped.items():
            note(f"skipped {len(reasons)} invalid record(s) of {key} (task.skip_invalid=true); "
                 f"the first: {reasons[0]}")
        self.skipped = {}

    # ------------------------------------------------------------------ rendering
    def use_tokenizer(self, tokenizer) -> None:
        """Render every conversation the run uses (after max_train_samples / max_eval_samples)
        with the chat template, shortened to task.max_length by whole turns where needed."""
        self._read()
        self.tokenizer = tokenizer
        self.template = resolve_template(self.cfg.chat_template, tokenizer)
        # Tokens never outnumber UTF-8 bytes (plus what the tokenizer adds), so a short text
        # fits without tokenizing it.
        self._added = len(tokenizer("", add_special_tokens=True)["input_ids"])
        splits: dict[str, list[Example]] = {}
        rendered: dict[int, list[Example]] = {}
        for split in SPLITS:
            conversations = self._conversations[split]
            limit = self.cfg.max_train_samples if split == "train" else self.cfg.max_eval_samples
            if id(conversations) in rendered:  # test = dev
                splits[split] = rendered[id(conversations)]
                continue
            examples = []
            for c in conversations if limit is None else conversations[:limit]:
                try:
                    examples.append(self.example(c))
                except BadRecord as e:
                    self._invalid(c.key, c.where, str(e))
            splits[split] = rendered[id(conversations)] = examples
        if not splits["train"]:
            raise ConfigError("task.train_file", "no conversation of the train data renders; fix the "
                                                 "records or the chat template")
        self._report_skipped()
        self._splits = splits
        last_reply = next((t for t, trained in reversed(splits["train"][0].segments) if trained), "")
        if tokenizer.eos_token and tokenizer.eos_token not in last_reply:
            note(f"the chat template does not close assistant replies with the EOS token "
                 f"{tokenizer.eos_token!r}: generation stops only at task.max_new_tokens")

    def example(self, conversation: Conversation) -> Example:
        """The conversation rendered into trained and untrained segments, shortened by whole
        turns from the left (the system message stays) until it fits task.max_length."""
        messages = conversation.messages
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        messages = messages[:last + 1]  # what follows the last reply trains nothing
        system = messages[:1] if messages[0]["role"] == "system" else []
        body = messages[len(system):]
        starts = [0] + [i for i in range(1, len(body)) if body[i]["role"] == "user"]  # turn starts
        for dropped, start in enumerate(starts):
            ex = self.render_example(system + body[start:])
            if dropped == len(starts) - 1 or self._fits(ex):
                ex.id, ex.turns_dropped = conversation.id, dropped
                return ex
        raise AssertionError("unreachable")

    def _fits(self, ex: Example) -> bool:
        text = "".join(t for t, _ in ex.segments)
        max_length = self.cfg.max_length
        if len(text.encode("utf-8")) + self._added <= max_length:
            return True
        return len(tokenize_conversation(ex.segments, self.tokenizer)[0]) <= max_length

    def render_example(self, messages: list[dict[str, str]]) -> Example:
        trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.cfg.train_on == "last_assistant":
            trained = trained[-1:]
        segments: list[tuple[str, bool]] = []
        done = prompt = ""
        for k in trained:
            head = render(self.tokenizer, self.template, messages[:k], True)
            full = render(self.tokenizer, self.template, messages[:k + 1], False)
            if not head.startswith(done) or not full.startswith(head):
                raise BadRecord(f"renders message {k + 1} differently as the conversation grows (the "
                                f"chat template rewrites earlier turns), so the reply cannot be "
                                f"located; give a template that keeps earlier turns as they were "
                                f"with task.chat_template")
            reply = full[len(head):].rstrip()  # whitespace after the end-of-turn marker: untrained
            if not reply:
                raise BadRecord(f"has message {k + 1}, an assistant reply, that the chat template "
                                f"renders as nothing; give it content")
            segments += [(head[len(done):], False), (reply, True)]
            done, prompt = head + reply, head
        full = render(self.tokenizer, self.template, messages, False)
        if not full.startswith(done):
            raise BadRecord("renders differently as the conversation grows (the chat template "
                            "rewrites earlier turns); give a template that keeps earlier turns as "
                            "they were with task.chat_template")
        segments.append((full[len(done):], False))
        return Example(prompt=prompt, target=messages[trained[-1]]["content"],
                       segments=[(t, f) for t, f in segments if t])

    # ------------------------------------------------------------------ the Task protocol
    def examples(self, split: str) -> list[Example]:
        check_split(split)
        if self._splits is None:
            raise RuntimeError("task=chat renders through the tokenizer: call "
                               "peftrun.tasks.bind_tokenizer(task, tokenizer) before examples()")
        return self._splits[split]

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        refs = [ex.references for ex in examples]
        return {"exact_match": mean_score(exact_match, predictions, refs), "rougeL": rouge_l(predictions, refs)}
