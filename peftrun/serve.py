"""Multi-tenant inference from saved runs: one backbone, several adapters, batches whose
requests each name their adapter.

    peftrun-generate outputs/RUN --prompt "max 3815="                  # the run's adapter
    peftrun-generate outputs/RUN --adapter b=outputs/RUN_B --prompts-file requests.jsonl
    python -m peftrun.serve outputs/RUN --prompt "max 3815=" --output completions.jsonl

Each line of a prompts file is {"prompt": "...", "adapter": "b"}: "adapter" names a loaded
adapter, null for the backbone alone; without it, the request goes to the positional run's
adapter (named "default"), or to the backbone when there is none. Output lines (stdout or
--output) are {"prompt", "adapter", "completion"}, in the order of the requests; other fields of
a request (an "id", a "target", "references") are copied to its output line, so that
`peftrun-eval RUN --predictions completions.jsonl` scores it. For a chat run (task=chat) a
prompt is one user message, and a line may give a whole conversation instead,
{"messages": [{"role": "user", "content": "..."}, ...]}: both are rendered with the run's chat
template up to the assistant's reply, as in training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, fail
from .host_memory import keep_freed_memory
from .multitenant import generate_mixed, load_tenants, locate_adapter

PROG = "peftrun-generate"
DEFAULT_ADAPTER = "default"


@dataclass
class Request:
    """One request: a prompt text, or (chat runs) the line that holds a conversation."""

    adapter: str | None
    prompt: str | None = None
    record: dict | None = None  # the line, for a conversation ({"messages": [...]})
    where: str = ""  # "line 3 of requests.jsonl"
    extra: dict = field(default_factory=dict)  # other fields, copied to the output line


RESERVED = ("prompt", "adapter", "completion")


def read_requests(path: Path, default: str | None) -> list[Request]:
    """The requests of a JSON-lines file of {"prompt" (or a conversation), "adapter" (optional),
    other fields (copied to the output)}."""
    if not path.is_file():
        raise ConfigError("prompts-file", f"{path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("prompts-file", f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError("prompts-file", f"{path} cannot be read ({e.strerror or e})") from None
    requests = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError("prompts-file", f"line {lineno} of {path} is not JSON ({e})") from None
        if not isinstance(row, dict) or ("prompt" in row and not isinstance(row["prompt"], str)):
            raise ConfigError("prompts-file", f"line {lineno} of {path} needs a \"prompt\" string (or, for a "
                                              f"chat run, \"messages\")")
        name = row.get("adapter", default)
        if name is not None and not isinstance(name, str):
            raise ConfigError("prompts-file", f"line {lineno} of {path}: \"adapter\" is a name or null")
        where = f"line {lineno} of {path}"
        if "prompt" in row:
            extra = {k: v for k, v in row.items() if k not in RESERVED}
            requests.append(Request(name, prompt=row["prompt"], where=where, extra=extra))
        else:  # a conversation, checked against the run's task once it is known
            requests.append(Request(name, record=row, where=where))
    if not requests:
        raise ConfigError("prompts-file", f"{path} holds no request")
    return requests


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.error = lambda message: fail(ValueError(message), PROG)  # one line, exit 2
    parser.add_argument("run", nargs="?", help=f"a run folder (or adapter folder): its adapter, named {DEFAULT_ADAPTER!r}")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="one more adapter (run or adapter folder) under NAME; repeatable")
    requests = parser.add_mutually_exclusive_group(required=True)
    requests.add_argument("--prompt", action="append", metavar="TEXT",
                          help=f"a prompt for the {DEFAULT_ADAPTER!r} adapter (the backbone without one); repeatable")
    requests.add_argument("--prompts-file", type=Path, metavar="FILE.jsonl",
                          help='requests, one JSON object a line: {"prompt": ..., "adapter": NAME or null} '
                               '(chat runs: {"messages": [...]} instead of "prompt"); other fields are copied '
                               'to the output')
    parser.add_argument("--max-new-tokens", type=int, help="default: the run's task.max_new_tokens")
    parser.add_argument("--max-prompt-length", type=int, help="prompts are cut from the left to this many "
                                                              "tokens; default: the run's task.max_length")
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16, help="requests per shared batch")
    parser.add_argument("--output", type=Path, metavar="FILE.jsonl", help="default: standard output")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the backbone run code of its own (transformers' trust_remote_code); never "
                             "taken from a run folder's config.yaml, only from this flag")
    args = parser.parse_args(argv)
    for flag in ("max_new_tokens", "max_prompt_length", "num_beams", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    return args


def serve(args: argparse.Namespace) -> list[dict[str, Any]]:
    keep_freed_memory()  # each batch reuses the last one's memory (host_memory.py)
    adapters: dict[str, str] = {}
    if args.run is not None:
        adapters[DEFAULT_ADAPTER] = args.run
    for spec in args.adapter:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ConfigError("adapter", f"expected NAME=DIR, got {spec!r}")
        if not (name.isascii() and name.isidentifier()):
            raise ConfigError("adapter", f"the name {name!r} is not a plain identifier (letters, digits and _, "
                                         f"not starting with a digit); e.g. --adapter my_run={folder}")
        if name in adapters:
            raise ConfigError("adapter", f"the name {name!r} is given twice; name each adapter once")
        adapters[name] = folder
    default = DEFAULT_ADAPTER if args.run is not None else None
    if args.prompts_file is not None:
        requests = read_requests(args.prompts_file, default)
    else:
        requests = [Request(default, prompt=p) for p in args.prompt]
    for i, r in enumerate(requests, start=1):
        if r.adapter is not None and r.adapter not in adapters:
            raise ConfigError("adapter", f"request {i} names adapter {r.adapter!r}, which is not given (given: "
                                         f"{', '.join(adapters) or 'none'}; null means the backbone)")
    check_conversations(requests, adapters)  # before any weights load
    model, tokenizer, router, task = load_tenants(adapters, args.device, trust_remote_code=args.trust_remote_code)
    task = task or {}
    inputs = [(render_request(r, task, tokenizer), r.adapter) for r in requests]
    completions = generate_mixed(
        model, tokenizer, router, inputs, batch_size=args.batch_size, num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens or task.get("max_new_tokens") or 16,
        max_prompt_length=args.max_prompt_length or task.get("max_length") or 256,
    )
    return [{**request_fields(r, task), "adapter": r.adapter, "completion": c, **r.extra}
            for r, c in zip(requests, completions)]


def check_conversations(requests: list[Request], adapters: dict[str, str]) -> None:
    """A request given as a conversation must go to a chat run (the run whose task config the
    requests are rendered with: the first that has one) and read as a conversation there."""
    from .tasks.chat_format import BadRecord, messages_field, request_messages

    chats = [r for r in requests if r.record is not None]
    if not chats or not adapters:  # no adapter: load_tenants says there is no backbone to build
        return
    task = next((a.task_config for a in (locate_adapter(n, f) for n, f in adapters.items())
                 if a.task_config is not None), None) or {}
    for r in chats:
        if task.get("name") != "chat":
            what = "has no \"prompt\"" if messages_field(task, r.record) is None else "holds a conversation"
            raise ConfigError("prompts-file", f"{r.where} {what}, but the run was trained on "
                                              f"task={task.get('name')}, not task=chat; write {{\"prompt\": \"...\"}}")
        try:
            request_messages(task, r.record)
        except BadRecord as e:
            raise ConfigError("prompts-file", f"{r.where} {e}") from None
        kept = messages_field(task, r.record)
        r.extra = {k: v for k, v in r.record.items() if k not in (*RESERVED, kept)}


def render_request(request: Request, task: dict, tokenizer) -> str:
    """The text generation reads: a chat run's template renders the prompt as one user message,
    or the request's conversation; other runs read the prompt as it is."""
    if task.get("name") != "chat":
        return request.prompt
    from .tasks.chat_format import BadRecord, chat_prompt, chat_request

    if request.record is None:
        return chat_prompt(task, tokenizer, request.prompt)
    try:
        return chat_request(task, tokenizer, request.record)
    except BadRecord as e:
        raise ConfigError("prompts-file", f"{request.where} {e}") from None


def request_fields(request: Request, task: dict) -> dict[str, Any]:
    """The output line's copy of the request: its prompt, or its conversation."""
    if request.record is None:
        return {"prompt": request.prompt}
    from .tasks.chat_format import messages_field

    name = messages_field(task, request.record)
    return {name: request.record[name]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        rows = serve(args)
    except ConfigError as e:
        if e.key == "model.trust_remote_code":  # the run's own wording names a config key
            e = ConfigError("trust-remote-code", "the backbone ships code of its own; pass --trust-remote-code "
                                                 "to run it, if you trust it")
        fail(e, PROG)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if args.output is None:
        sys.stdout.write(text)
        return
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(f".{args.output.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, args.output)


if __name__ == "__main__":
    main()
