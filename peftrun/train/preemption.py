"""Stopping at a step boundary: SIGTERM / SIGUSR1 (SLURM's warning before a time limit or a
preemption) and a first Ctrl-C (SIGINT) end the run after the current step, with a checkpoint;
then the signal is handed on (submitit requeues the job there) or the run exits with 128 + signal
(130 for Ctrl-C). A second Ctrl-C aborts at once (KeyboardInterrupt). Re-running the same
command resumes."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Callable, Iterator

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionFlag:
    def __init__(self) -> None:
        self.signum = 0

    def __bool__(self) -> bool:
        return self.signum != 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


@contextmanager
def catch_preemption() -> Iterator[tuple[PreemptionFlag, Callable[[], None]]]:
    """Yields (flag, hand_on): the flag turns true when a signal arrives; `hand_on()` passes the
    signal to the handler that was installed before (or exits 128 + signal). A second SIGINT
    raises KeyboardInterrupt where the run is."""
    flag = PreemptionFlag()
    previous = {}

    def record(signum, frame):
        if signum == signal.SIGINT and flag.signum:
            raise KeyboardInterrupt  # Ctrl-C while the run is already stopping: abort now
        if not flag.signum:
            flag.signum = signum

    for sig in SIGNALS:
        previous[sig] = signal.signal(sig, record)

    def hand_on() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        handler = previous.get(flag.signum)
        # Ctrl-C is the user's: exit 130 (the handler before, Python's own, would raise
        # KeyboardInterrupt and print a traceback). A scheduler's signal goes on to its handler.
        if callable(handler) and flag.signum != signal.SIGINT:
            handler(flag.signum, None)
        raise SystemExit(128 + flag.signum)

    try:
        yield flag, hand_on
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
