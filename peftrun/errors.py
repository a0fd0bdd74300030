"""User-facing errors: one line that names the config key and how to fix it; exit code 2."""

from __future__ import annotations

import sys

EXIT_USAGE = 2


class ConfigError(Exception):
    """A bad input the user can fix. `key` is the config key at fault (e.g. `method.r`)."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")

    def __reduce__(self):  # survives pickling (a worker process raising it in a pool)
        return type(self), (self.key, self.message)


def fail(err: Exception, prog: str = "peftrun") -> "NoReturn":  # noqa: F821
    """Print `err` as one line on stderr and exit 2, with no traceback."""
    text = " ".join(str(err).split())
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)
