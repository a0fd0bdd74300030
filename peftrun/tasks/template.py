r"""Prompt and target templates: literal text with `{field}` placeholders, filled from a record.

Only plain field names are allowed. `str.format` would also follow attribute and index look-ups
(`{prompt.__class__}`, `{record[0]}`) and call a value's own `__format__` with a format spec, so a
template could reach into the objects it is given; here a placeholder is looked up by name and
the value's text put in its place, nothing else. Anything but a field name is refused when the
task is built (validation), in one line naming the key.

A value typed on the command line cannot hold a real newline (Hydra keeps `\n` as a backslash
and an `n`), so in a template `\n` is a newline, `\t` a tab and `\\` one backslash (`unescape`);
any other backslash stays as it is.
"""

from __future__ import annotations

import re
import string
from typing import Any, Mapping

from peftrun.errors import ConfigError

TEMPLATE_KEYS = ("prompt_template", "target_template")
_PARSER = string.Formatter()
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}
_ESCAPE = re.compile(r"\\([nt\\])")


def unescape(template: str) -> str:
    r"""`template` with `\n`, `\t` and `\\` (as Hydra leaves them: two characters each) turned
    into a newline, a tab and one backslash; other backslashes stay."""
    return _ESCAPE.sub(lambda m: _ESCAPES[m.group(1)], template)


def template_fields(template: str, key: str) -> list[str]:
    """The field names `template` uses, in order; a ConfigError on `key` for anything else: a
    positional field (`{}`, `{0}`), a look-up (`{a.b}`, `{a[0]}`), a conversion (`{a!r}`), a
    format spec (`{a:>5}`) or unbalanced braces."""
    try:
        parsed = list(_PARSER.parse(unescape(template)))
    except ValueError as e:
        raise ConfigError(key, f"{template!r} is not a valid format string ({e}); escape literal "
                               f"braces as {{{{ and }}}}") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ConfigError(key, f"{template!r} has a positional field {{{name}}}; name a record "
                                   f"field instead, e.g. {{question}}")
        if "." in name or "[" in name or "]" in name:
            raise ConfigError(key, f"{{{name}}} in {template!r} is not a field name: templates take "
                                   f"field names only (no attribute or index look-ups); write "
                                   f"{{{name.split('.')[0].split('[')[0]}}}")
        if conversion or spec:
            raise ConfigError(key, f"{{{name}{'!' + conversion if conversion else ''}"
                                   f"{':' + spec if spec else ''}}} in {template!r}: templates take "
                                   f"field names only (no conversion or format spec); write {{{name}}}")
        names.append(name)
    return names


def render_template(template: str, fields: Mapping[str, Any]) -> str:
    """`template` with each `{name}` replaced by the text of `fields[name]` (a missing field is a
    KeyError naming it). Check the template with `template_fields` first."""
    out = []
    for literal, name, _, _ in _PARSER.parse(unescape(template)):
        out.append(literal)
        if name is not None:
            out.append(str(fields[name]))
    return "".join(out)


def check_templates(cfg: Any) -> None:
    """The task config's templates (those it has) hold field names only."""
    for key in TEMPLATE_KEYS:
        try:
            template = getattr(cfg, key, None)
        except Exception:  # a mandatory value left unset: the task reports it itself
            continue
        if isinstance(template, str):
            template_fields(template, f"task.{key}")
