"""One run per run folder: an OS file lock (`flock`) on `<run>/.lock`, holding the pid of the
process that took it. A second run started on a locked folder (a job submitted twice) is refused
in one line naming that pid, before it writes or deletes anything there. The kernel releases the
lock when its holder dies, however it dies, so a killed run never leaves the folder locked.

Only the main process of a run (rank 0) takes it: the data-parallel processes of one run share
the folder. Taking it again in the same process nests (the command line and the loop both take
it); the last release removes the file.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import ConfigError

LOCK_FILE = ".lock"

_held: dict[str, list] = {}  # resolved folder -> [file descriptor, depth, lock path]


def acquire_run_lock(run_dir: Path) -> None:
    """Lock `run_dir` for this process (creating the folder if needed); a ConfigError naming the
    holder's pid when another process holds it."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        _held[key][1] += 1
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                "hydra.run.dir",
                f"{run_dir} is in use by another peftrun run (pid {holder}); wait for it to end or "
                f"stop it, or run in another folder (hydra.run.dir=...)",
            ) from None
        # A holder that releases removes the file: the lock must be on the file still at the path.
        try:
            here, locked = os.stat(path), os.fstat(fd)
            if (here.st_dev, here.st_ino) == (locked.st_dev, locked.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = [fd, 1, path]


def release_run_lock(run_dir: Path) -> None:
    """Undo one `acquire_run_lock(run_dir)` of this process; the last one unlocks and removes
    the lock file."""
    key = str(Path(run_dir).resolve())
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[key]
    fd, _, path = entry
    try:
        path.unlink()  # while still locked: a waiting process then finds a new file, not this one
    except OSError:
        pass
    os.close(fd)


def holds_run_lock(run_dir: Path) -> bool:
    return str(Path(run_dir).resolve()) in _held
