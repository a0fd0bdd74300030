"""User-facing errors: one line that names the config key and how to fix it; exit code 2."""

from __future__ import annotations

import sys

EXIT_USAGE = 2
EXIT_FAILED = 1  # the run started and could not go on (e.g. it diverged): RunError
EXIT_INTERRUPTED = 130  # 128 + SIGINT: stopped by Ctrl-C


class ConfigError(Exception):
    """A bad input the user can fix. `key` is the config key at fault (e.g. `method.r`)."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")

    def __reduce__(self):  # survives pickling (a worker process raising it in a pool)
        return type(self), (self.key, self.message)


class RunError(Exception):
    """A run that started and cannot go on for a reason the user can act on (it diverged, ...):
    one line naming the key to change, exit code `code` (1)."""

    code = EXIT_FAILED

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")

    def __reduce__(self):
        return type(self), (self.key, self.message)


def fail(err: Exception, prog: str = "peftrun", code: int | None = None) -> "NoReturn":  # noqa: F821
    """Print `err` as one line on stderr and exit (2, a RunError's own code, or `code`), with no
    traceback."""
    text = " ".join(str(err).split())
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    if code is None:
        code = err.code if isinstance(err, RunError) else EXIT_USAGE
    sys.exit(code)
