"""Preemption: SIGTERM / SIGUSR1 (SLURM's warning before a time limit or a preemption) end the
run at the next step boundary with a checkpoint, then hand the signal on (submitit requeues the
job there) or exit with 128 + signal. Re-running the same command resumes."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Callable, Iterator

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self) -> None:
        self.signum = 0

    def __bool__(self) -> bool:
        return self.signum != 0


@contextmanager
def catch_preemption() -> Iterator[tuple[PreemptionFlag, Callable[[], None]]]:
    """Yields (flag, hand_on): the flag turns true when a signal arrives; `hand_on()` passes the
    signal to the handler that was installed before (or exits 128 + signal)."""
    flag = PreemptionFlag()
    previous = {}

    def record(signum, frame):
        flag.signum = signum

    for sig in SIGNALS:
        previous[sig] = signal.signal(sig, record)

    def hand_on() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        handler = previous.get(flag.signum)
        if callable(handler):
            handler(flag.signum, None)
        raise SystemExit(128 + flag.signum)

    try:
        yield flag, hand_on
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
