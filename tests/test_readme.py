"""The README's commands run as written.

Conventions (write the README by them):

* Code blocks are indented by 4 spaces (after a blank line) or fenced with ```. A command line
  starts with `peftrun`, `peftrun-generate`, `peftrun-eval`, `python -m peftrun...` or
  `torchrun`; a trailing `\\` continues it on the next line; `# ...` is a comment. `make run` /
  `make test` (the set-up) and every other line are not run.
* A block is *illustrative* when the last non-blank line before it contains "(needs " — e.g.
  "(needs a network)", "(needs GPUs, a network, or SLURM)": its commands need what tests may not
  use (a download, a GPU, a cluster). They are not run; their peftrun overrides must compose.
* A block whose preceding line contains "(file `NAME`)" is the content of a file: the test writes
  it to NAME in the working folder before the commands run.
* Every other command runs, in one temporary working folder shared by all of them (so
  `peftrun-generate outputs/default` finds the run `peftrun` made), with tiny step counts appended
  to `peftrun` command lines (TINY). Those keys are left out of the run folder's name, so a
  command writes the folder the README names. Runs and other commands go first, two at a time;
  `peftrun-generate` / `peftrun-eval`, which read finished runs, after them. A command that exits
  non-zero fails the test.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
MAX_BYTES = 15_000

# Appended to every `peftrun` command line that runs: a run of seconds.
TINY_KEYS = {
    "trainer.max_steps": "2", "trainer.eval_every": "0", "trainer.save_every": "0",
    "trainer.progress": "false", "task.max_train_samples": "64", "task.max_eval_samples": "16",
}
TINY = [f"{k}={v}" for k, v in TINY_KEYS.items()] + [
    f"hydra.job.config.override_dirname.exclude_keys=[{','.join(TINY_KEYS)}]"]
CONSUMERS = ("peftrun-generate", "peftrun-eval")  # read runs made by earlier commands
ILLUSTRATIVE = "(needs "
FILE = re.compile(r"\(file `([^`]+)`\)")


@dataclass
class Block:
    label: str  # the last non-blank line before the block
    lines: list[str]
    line: int  # 1-based line number of the block's first line in README.md


def code_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []

    def label(i: int) -> str:
        return next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")

    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].lstrip().startswith("```"):
                j += 1
            blocks.append(Block(label(i), lines[i + 1:j], i + 2))
            i = j + 1
        elif line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            body = [s[4:] for s in lines[i:j]]
            while body and not body[-1].strip():
                body.pop()
            blocks.append(Block(label(i), body, i + 1))
            i = j
        else:
            i += 1
    return blocks


def logical_lines(block: Block) -> list[str]:
    """The block's lines with `\\` continuations joined."""
    out, current = [], ""
    for line in block.lines:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            out.append(current + line)
            current = ""
    if current:
        out.append(current)
    return out


def is_command(first_words: list[str]) -> bool:
    if not first_words:
        return False
    head = first_words[0]
    if head in ("peftrun", "torchrun", *CONSUMERS):
        return True
    return head == "python" and first_words[1:2] == ["-m"] and len(first_words) > 2 and (
        first_words[2] == "peftrun" or first_words[2].startswith("peftrun."))


def commands(block: Block) -> list[list[str]]:
    out = []
    for line in logical_lines(block):
        if is_command(line.split()[:3]) or line.split()[:1] == ["accelerate"]:
            out.append(shlex.split(line, comments=True))
    return out


def peftrun_args(argv: list[str]) -> list[str] | None:
    """The peftrun (training CLI) arguments of a command line, or None for another program."""
    if argv[0] == "peftrun":
        return argv[1:]
    if argv[:3] == ["python", "-m", "peftrun"]:
        return argv[3:]
    if argv[0] in ("torchrun", "accelerate") and "-m" in argv:
        i = argv.index("-m")
        if argv[i + 1:i + 2] == ["peftrun"]:
            return argv[i + 2:]
    return None


def readme_blocks() -> list[Block]:
    return code_blocks(README.read_text(encoding="utf-8"))


def runnable() -> tuple[dict[str, str], list[list[str]]]:
    """(files to write, command lines to run) from the README, in order, each command once."""
    files, cmds = {}, []
    for block in readme_blocks():
        match = FILE.search(block.label)
        if match:
            files[match.group(1)] = "\n".join(block.lines) + "\n"
            continue
        if ILLUSTRATIVE in block.label:
            continue
        for argv in commands(block):
            if argv[0] != "accelerate" and argv not in cmds:
                cmds.append(argv)
    return files, cmds


# --------------------------------------------------------------------------- cheap checks
def test_readme_is_small_and_points_at_the_docs():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) <= MAX_BYTES, f"README.md is {len(text.encode())} bytes, over {MAX_BYTES}"
    for needle in ("make run", "make test", "docs/benchmarks.md", "docs/methods/", "docs/adding-a-method.md"):
        assert needle in text, needle
    for link in re.findall(r"\]\((docs/[^)#]+)\)", text):
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


def test_readme_has_runnable_commands():
    _, cmds = runnable()
    heads = {argv[0] for argv in cmds}
    assert {"peftrun", "peftrun-generate", "peftrun-eval", "torchrun"} <= heads, heads


def test_every_readme_peftrun_command_composes():
    """Every peftrun command line, runnable or illustrative, names keys and options that exist."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    import peftrun.cli as cli

    candidates = [getattr(cli, "CONFIG_DIR", None), ROOT / "peftrun" / "conf"]
    config_dir = next(Path(c) for c in candidates if c is not None and (Path(c) / "config.yaml").is_file())
    parser = OverridesParser.create()
    checked = 0
    for block in readme_blocks():
        for argv in commands(block):
            args = peftrun_args(argv)
            if args is None:
                continue
            overrides, skip = [], False
            for a in args:
                if skip:
                    skip = False
                elif a in ("--cfg", "-c", "--package", "-p"):
                    skip = True
                elif not a.startswith("-") and not a.lstrip("+~").startswith("hydra"):
                    overrides.append(a)
            variants = [[]]
            for o in parser.parse_overrides(overrides):
                values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [None]
                key = o.get_key_element()
                variants = [v + [o.input_line if x is None else f"{key}={x}"] for v in variants for x in values]
            for variant in variants:
                GlobalHydra.instance().clear()
                try:
                    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
                        compose(config_name="config", overrides=variant)
                except Exception as e:  # noqa: BLE001
                    pytest.fail(f"README line {block.line}: {shlex.join(argv)}\ndoes not compose: {e}")
                finally:
                    GlobalHydra.instance().clear()
                checked += 1
    assert checked >= 10


# --------------------------------------------------------------------------- the commands
def run(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[list[str], subprocess.CompletedProcess]:
    args = peftrun_args(argv)
    full = [*argv, *TINY] if args is not None and argv[0] != "accelerate" else argv
    return argv, subprocess.run(full, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    files, cmds = runnable()
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content, encoding="utf-8")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "120",
           "PEFTRUN_CACHE": str(tmp_path / ".cache")}
    producers = [c for c in cmds if c[0] not in CONSUMERS]
    consumers = [c for c in cmds if c[0] in CONSUMERS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: run(c, tmp_path, env), producers))
    results += [run(c, tmp_path, env) for c in consumers]
    failed = [(argv, r) for argv, r in results if r.returncode != 0]
    report = "\n\n".join(f"$ {shlex.join(argv)}  -> exit {r.returncode}\n{(r.stdout + r.stderr)[-3000:]}"
                         for argv, r in failed)
    assert not failed, f"{len(failed)} README command(s) failed:\n\n{report}"
    assert (tmp_path / "outputs" / "default" / "adapter" / "adapter_model.safetensors").is_file()
