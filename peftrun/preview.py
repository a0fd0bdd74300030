"""Print a few tokenized examples of a task as training sees them, with masked labels marked.

    python -m peftrun.preview task=squad 'task.data_files={train:train.jsonl,validation:dev.jsonl}'
    python -m peftrun.preview -n 5 --split dev task=boolq model=gpt2

    python -m peftrun.preview task=chat task.train_file=chat.jsonl    # a conversation, replies marked

Takes the same overrides as `peftrun` (the same config is composed; `--config-dir DIR` adds
option files of your own). Token pieces are separated by `|`; a run of positions without loss
(label -100: the prompt, unless task.loss_on_prompt=true) is shown as `[masked: ...]`. Newlines
are shown as `\\n`. A conversation is also shown as rendered text, its trained tokens (the
assistant replies) between `[[` and `]]`.
"""

from __future__ import annotations

import argparse
import sys

from .errors import ConfigError, fail

IGNORE_INDEX = -100


def compose(overrides: list[str], config_dirs: list[str] = ()):
    from .cli import compose_config, explain_composition_error, user_config_dirs

    dirs = user_config_dirs([a for d in config_dirs for a in ("--config-dir", d)])
    try:
        return compose_config(overrides, dirs)
    except Exception as e:
        raise explain_composition_error(e, dirs) from None


def show_tokens(input_ids: list[int], labels: list[int], tokenizer) -> str:
    """`[masked: a|b|c]|d|e` : runs without loss in brackets, labelled pieces after."""
    pieces = [tokenizer.decode([i]).replace("\n", "\\n") for i in input_ids]
    out, masked_run = [], []
    for piece, label in zip(pieces, labels):
        if label == IGNORE_INDEX:
            masked_run.append(piece)
            continue
        if masked_run:
            out.append(f"[masked: {'|'.join(masked_run)}]")
            masked_run = []
        out.append(piece)
    if masked_run:
        out.append(f"[masked: {'|'.join(masked_run)}]")
    return "|".join(out)


def show_text(input_ids: list[int], labels: list[int], tokenizer) -> str:
    """The decoded text, each run of labelled tokens between `[[` and `]]`."""
    out, run, trained = [], [], False
    for token, label in [*zip(input_ids, labels), (None, None)]:
        now = label is not None and label != IGNORE_INDEX
        if token is None or (run and now != trained):
            text = tokenizer.decode(run)
            out.append(f"[[{text}]]" if trained else text)
            run = []
        if token is not None:
            run.append(token)
            trained = now
    return "".join(out)


def preview(overrides: list[str], n: int = 3, split: str = "train", config_dirs: list[str] = ()) -> str:
    from .data import tokenize_examples
    from .models import load_tokenizer
    from .tasks import bind_tokenizer, build_task

    cfg = compose(overrides, config_dirs)
    task = build_task(cfg.task)
    task.validate()
    tokenizer = load_tokenizer(cfg.model)
    bind_tokenizer(task, tokenizer)
    examples = task.examples(split)[:n]
    lines = [f"task {cfg.task.name}, split {split}, model {cfg.model.name}: "
             f"{len(examples)} example(s), max_length {cfg.task.max_length}"]
    for ex in examples:  # one at a time, so a dropped example keeps its place
        features, _ = tokenize_examples([ex], tokenizer, cfg.task.max_length,
                                        cfg.task.loss_on_prompt)
        lines += ["", f"--- {ex.id}: references {ex.references}"]
        if not features:
            lines.append("dropped: its last turn alone does not fit in task.max_length" if ex.segments
                         else "dropped: the target alone does not fit in task.max_length")
            continue
        feat = features[0]
        labelled = sum(1 for label in feat["labels"] if label != IGNORE_INDEX)
        lines.append(f"{len(feat['input_ids'])} tokens, {labelled} with loss")
        if ex.segments is not None:
            shortened = f" ({ex.turns_dropped} leading turn(s) left out to fit)" if ex.turns_dropped else ""
            lines += [f"text, trained tokens in [[ ]]{shortened}:",
                      show_text(feat["input_ids"], feat["labels"], tokenizer), "tokens:"]
        lines.append(show_tokens(feat["input_ids"], feat["labels"], tokenizer))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m peftrun.preview",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=3, help="examples to show (default 3)")
    parser.add_argument("--split", default="train", choices=("train", "dev", "test"))
    parser.add_argument("--config-dir", "-cd", action="append", default=[], metavar="DIR",
                        help="a folder of your own option files, added to the groups (as peftrun's)")
    parser.add_argument("overrides", nargs="*", help="peftrun overrides, e.g. task=squad")
    args = parser.parse_args(argv)
    try:
        print(preview(args.overrides, args.n, args.split, args.config_dir))
    except ConfigError as e:
        fail(e)


if __name__ == "__main__":
    main(sys.argv[1:])
