"""Write the bench scripts' tables into docs/benchmarks.md, the record of what was measured.

The page holds each generated table between two marker lines,

    <!-- bench:NAME -->
    ...
    <!-- /bench:NAME -->

and `update_section(NAME, markdown)` replaces what lies between them (nothing else) with the
markdown under a line that says when and by which command it was measured. The machine is named
once, at the top, in the section `machine`, which `publish` rewrites with every script's tables.
A page whose markers are missing, doubled or out of order is refused with a one-line error
(`SectionError`; `publish` and `preflight` exit 2 with it), never written half-way: the new page
goes to a temporary file in the same folder, which then replaces the page.

The bench scripts import this module as `benchmarks_doc`, with scripts/ on sys.path.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import stat
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
MACHINE = "machine"
WHERE = "on the machine named at the top"
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_ANY_MARKER = re.compile(r"^<!-- /?bench:([^ ]*) -->[ \t]*\r?$", re.MULTILINE)


class SectionError(ValueError):
    """The page cannot take the section: no such file, missing / doubled / misordered markers,
    a bad name or body. The message is one line."""


def _marker(name: str, closing: bool = False) -> re.Pattern:
    return re.compile(rf"^<!-- {'/' if closing else ''}bench:{re.escape(name)} -->[ \t]*\r?$", re.MULTILINE)


def _span(text: str, name: str, doc: Path) -> tuple[int, int]:
    """(start, end) of what lies between the section's marker lines: from just after the opening
    line's newline to the start of the closing line."""
    if not _NAME.fullmatch(name):
        raise SectionError(f"section name {name!r}: use lower-case letters, digits, '-' and '_'")
    opens = list(_marker(name).finditer(text))
    closes = list(_marker(name, closing=True).finditer(text))
    if not opens or not closes:
        missing = " and ".join(m for m, found in ((f"<!-- bench:{name} -->", opens),
                                                  (f"<!-- /bench:{name} -->", closes)) if not found)
        raise SectionError(f"{doc}: no marker line {missing}; put the pair, each on a line of its own, "
                           f"around the section {name!r}")
    if len(opens) > 1 or len(closes) > 1:
        raise SectionError(f"{doc}: the markers of section {name!r} appear more than once")
    start, end = opens[0].end(), closes[0].start()
    if end < start:
        raise SectionError(f"{doc}: <!-- /bench:{name} --> comes before <!-- bench:{name} -->")
    if _ANY_MARKER.search(text[start:end]):
        raise SectionError(f"{doc}: section {name!r} holds other bench markers (sections cannot nest)")
    if text[start:start + 1] == "\n":
        start += 1
    elif text[start:start + 2] == "\r\n":
        start += 2
    return start, end


def sections(text: str, doc: Path | str = "the page") -> dict[str, str]:
    """Every marked section of a page's text, name -> what lies between its markers; a marker
    without its partner (or doubled, or misordered) raises SectionError."""
    names = {m.group(1) for m in _ANY_MARKER.finditer(text)}
    found = {}
    for name in sorted(names):
        start, end = _span(text, name, Path(doc))
        found[name] = text[start:end]
    return found


def check_sections(names: Iterable[str], doc: Path | str = DOC) -> None:
    """Raise SectionError unless the page exists and holds one well-formed marker pair per name."""
    text = _read(Path(doc))
    for name in names:
        _span(text, name, Path(doc))


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that ran, as one would type it in the repository: `python scripts/x.py ARGS`
    (the script's path relative to the repository when it lies inside it)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return "python"
    script = argv[0]
    path = Path(script)
    if path.suffix == ".py":
        try:
            script = path.resolve().relative_to(ROOT).as_posix()
        except ValueError:
            pass
    return shlex.join(["python", script, *map(str, argv[1:])])


def _code(text: str) -> str:
    """`text` as a Markdown code span, whatever backticks it holds."""
    ticks = max((len(run) for run in re.findall(r"`+", text)), default=0) + 1
    fence = "`" * ticks
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def heading(date: datetime.date | str | None = None, command: str | None = None, where: str | None = WHERE) -> str:
    """`Measured YYYY-MM-DD by `python scripts/x.py ...` on the machine named at the top.`"""
    date = datetime.date.today() if date is None else date
    date = date.isoformat() if isinstance(date, datetime.date) else str(date)
    command = command_line() if command is None else command
    return f"Measured {date} by {_code(command)}" + (f" {where}" if where else "") + "."


def _read(doc: Path) -> str:
    try:
        with doc.open(encoding="utf-8", newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise SectionError(f"{doc}: no such file") from None


def _write_atomically(doc: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{doc.name}.", suffix=".tmp", dir=doc.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, stat.S_IMODE(doc.stat().st_mode))
        os.replace(tmp, doc)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def update_sections(bodies: Mapping[str, str], doc: Path | str = DOC, date: datetime.date | str | None = None, *,
                    command: str | None = None, where: str | None = WHERE) -> None:
    """Replace several sections in one write: all of them or (on SectionError) none. Each gets
    `heading(date, command, where)` above its body; the `machine` section gets no "where"."""
    doc = Path(doc)
    text = _read(doc)
    command = command_line() if command is None else command
    spans = []
    for name, body in bodies.items():
        body = body.strip("\r\n")
        if not body.strip():
            raise SectionError(f"section {name!r}: the body is empty")
        if _ANY_MARKER.search(body):
            raise SectionError(f"section {name!r}: the body holds a bench marker line")
        start, end = _span(text, name, doc)
        head = heading(date, command, None if name == MACHINE else where)
        spans.append((start, end, f"\n{head}\n\n{body}\n\n"))
    for start, end, inner in sorted(spans, reverse=True):  # from the end: earlier offsets stay valid
        text = text[:start] + inner + text[end:]
    if text != _read(doc):
        _write_atomically(doc, text)


def update_section(name: str, body_markdown: str, doc: Path | str = DOC, date: datetime.date | str | None = None, *,
                   command: str | None = None, where: str | None = WHERE) -> None:
    """Replace the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in `doc` with
    `body_markdown` under a line with the date (default: today) and the command line (default:
    sys.argv's); the rest of the page is left as it is. SectionError when the markers are not
    there once each, in order."""
    update_sections({name: body_markdown}, doc, date, command=command, where=where)


# --------------------------------------------------------------------------- the machine
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one, else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_markdown() -> str:
    """One line naming the machine: cores, CPU model, GPU (where CUDA has one), torch version."""
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    cores_text = f"{cores} CPU cores" + (f" ({usable} usable here)" if usable != cores else "")
    try:
        import torch
    except ImportError:  # pragma: no cover - every bench script has torch
        torch = None
    gpu = "no GPU"
    if torch is not None and torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpu = f"{len(names)} x {names[0]}" if len(set(names)) == 1 else " + ".join(names)
        gpu = f"GPU {gpu}"
    version = f"torch {torch.__version__}" if torch is not None else "no torch"
    return (f"The machine: **{cores_text}, {gpu}** ({cpu_model()}; {platform.system()} {platform.machine()}; "
            f"Python {platform.python_version()}, {version}).")


# ------------------------------------------------------------------------ for the scripts
def preflight(prog: str, names: Iterable[str], doc: Path | str | None, own_machine: bool = False) -> None:
    """Before a long benchmark: exit 2 with a one-line error unless `doc` (None: not writing)
    can take these sections and the machine's (not with `own_machine`: see `publish`)."""
    if doc is None:
        return
    try:
        check_sections([*names] if own_machine else [*names, MACHINE], doc)
    except SectionError as e:
        print(f"{prog}: error: {e} (or run with --no-doc)", file=sys.stderr)
        raise SystemExit(2) from None


def publish(prog: str, bodies: Mapping[str, str], doc: Path | str | None, declared: Sequence[str],
            argv: Sequence[str] | None = None, own_machine: bool = False) -> None:
    """Write a script's sections and the `machine` section into `doc` (None: --no-doc, nothing);
    a note on stderr (stdout stays the script's tables); exit 2 with a one-line error where the
    page cannot take them. `declared` is the script's DOC_SECTIONS: writing any other name is a bug.
    A body of None leaves that section as it is (a part of the script that was skipped).
    `own_machine`: the sections name this machine in their heading and the page's machine line
    stays (a GPU machine lent for one script, beside the machine of the other tables)."""
    undeclared = [name for name in bodies if name not in declared]
    if undeclared:
        raise ValueError(f"{prog}: sections {undeclared} are not in its DOC_SECTIONS {tuple(declared)}")
    bodies = {name: body for name, body in bodies.items() if body is not None}
    if doc is None:
        return
    if own_machine:
        where = "on " + machine_markdown().removeprefix("The machine: ").rstrip(".")
        sections = dict(bodies)
    else:
        where, sections = WHERE, {**bodies, MACHINE: machine_markdown()}
    try:
        update_sections(sections, doc, command=command_line(argv), where=where)
    except SectionError as e:
        print(f"{prog}: error: {e} (the tables above were not written into it)", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{prog}: wrote {', '.join(sections)} into {doc}", file=sys.stderr)
