"""Print a few tokenized examples of a task as training sees them, with masked labels marked.

    python -m peftrun.preview task=squad 'task.data_files={train:train.jsonl,validation:dev.jsonl}'
    python -m peftrun.preview -n 5 --split dev task=boolq model=gpt2

Takes the same overrides as `peftrun` (the same config is composed). Token pieces are separated
by `|`; a run of positions without loss (label -100: the prompt, unless
task.loss_on_prompt=true) is shown as `[masked: ...]`. Newlines are shown as `\\n`.
"""

from __future__ import annotations

import argparse
import sys

from .errors import ConfigError, fail

IGNORE_INDEX = -100


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .cli import CONFIG_DIR, explain_composition_error

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides)
    except Exception as e:
        raise explain_composition_error(e) from None
    finally:
        GlobalHydra.instance().clear()


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


def preview(overrides: list[str], n: int = 3, split: str = "train") -> str:
    from .data import tokenize_examples
    from .models import load_tokenizer
    from .tasks import build_task

    cfg = compose(overrides)
    task = build_task(cfg.task)
    task.validate()
    tokenizer = load_tokenizer(cfg.model)
    examples = task.examples(split)[:n]
    lines = [f"task {cfg.task.name}, split {split}, model {cfg.model.name}: "
             f"{len(examples)} example(s), max_length {cfg.task.max_length}"]
    for ex in examples:  # one at a time, so a dropped example keeps its place
        features, _ = tokenize_examples([ex], tokenizer, cfg.task.max_length,
                                        cfg.task.loss_on_prompt)
        lines += ["", f"--- {ex.id}: references {ex.references}"]
        if not features:
            lines.append("dropped: the target alone does not fit in task.max_length")
            continue
        feat = features[0]
        labelled = sum(1 for label in feat["labels"] if label != IGNORE_INDEX)
        lines += [f"{len(feat['input_ids'])} tokens, {labelled} with loss",
                  show_tokens(feat["input_ids"], feat["labels"], tokenizer)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m peftrun.preview",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=3, help="examples to show (default 3)")
    parser.add_argument("--split", default="train", choices=("train", "dev", "test"))
    parser.add_argument("overrides", nargs="*", help="peftrun overrides, e.g. task=squad")
    args = parser.parse_args(argv)
    try:
        print(preview(args.overrides, args.n, args.split))
    except ConfigError as e:
        fail(e)


if __name__ == "__main__":
    main(sys.argv[1:])
