"""The synthetic tasks (peftrun/tasks/synthetic.py: an invented world, generated offline, in no
model's pretraining) written as chat conversations for an instruct model through `task=chat`:
a short system message that states the answer's form (the zero-shot model then has a fair
chance, and SmolLM2's template adds no default system prompt of its own), the task's prompt
without its "Answer:" cue as the user message, the target as the reply.

The chat task scores exact match of the reply (the dev curves); `native_scores` scores the test
predictions with the synthetic task's own metric (SQuAD exact match / F1, the final number),
which forgives an instruct model's full sentences.
"""

from __future__ import annotations

import json
from pathlib import Path

from .methods import compose

SYSTEM = {
    "synth_qa": "Answer the question with the word from the context, nothing else.",
    "synth_math": "Work the problem out step by step, as in '3 + 4 = 7. 7 - 2 = 5.', then end with '#### ' "
                  "and the final number.",
    "synth_sentiment": "Label the review positive, negative or mixed; answer with the label only.",
}
# Generation lengths: the longest reply plus room for the end-of-turn marker.
MAX_NEW_TOKENS = {"synth_qa": 16, "synth_math": 48, "synth_sentiment": 8}


def native_task(task: str):
    from peftrun.tasks import build_task

    return build_task(compose([f"task={task}"]).task)


def messages(task: str, example) -> list[dict[str, str]]:
    question = example.prompt.removesuffix("\nAnswer:").removesuffix("\nSentiment:")
    return [{"role": "system", "content": SYSTEM[task]}, {"role": "user", "content": question},
            {"role": "assistant", "content": example.target.strip()}]


def write_files(task: str, folder: Path, counts: dict[str, int]) -> dict[str, Path]:
    """train/dev/test .jsonl files of the first `counts[split]` examples of the task's splits (at
    its default sizes, so the examples do not depend on the counts); split -> path."""
    native = native_task(task)
    folder = Path(folder) / task
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in counts.items():
        examples = native.examples(split)
        if n > len(examples):
            raise SystemExit(f"{task}: {n} {split} examples asked for, the task has {len(examples)}")
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps({"messages": messages(task, e)}) + "\n" for e in examples[:n]))
    return paths


def task_overrides(task: str, paths: dict[str, Path], max_length: int = 256) -> tuple[str, ...]:
    """`task=chat` on the files; the last reply trained (the only one), short sequences."""
    return ("task=chat", f"task.train_file={paths['train']}", f"task.dev_file={paths['dev']}",
            f"task.test_file={paths['test']}", "task.train_on=last_assistant", "task.metric=exact_match",
            f"task.max_length={max_length}", f"task.max_new_tokens={MAX_NEW_TOKENS[task]}")


def native_scores(task: str, predictions: list[str], count: int) -> dict[str, float]:
    """The synthetic task's own metrics of predictions for its first `count` test examples."""
    native = native_task(task)
    return native.score(predictions, native.examples("test")[:count])


def read_predictions(run_dir: Path) -> list[str]:
    """A run's test predictions (predictions.jsonl, in test order)."""
    lines = (Path(run_dir) / "predictions.jsonl").read_text().splitlines()
    return [json.loads(line)["prediction"] for line in lines if line.strip()]
