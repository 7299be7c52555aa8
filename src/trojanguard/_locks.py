"""An exclusive lock between processes, on a lock file: concurrent builds and zoo trainings wait for each other
(test workers, Ray tasks, two shells) instead of writing the same files at once."""

from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: str | Path):
    """Hold an exclusive lock on ``path`` (created if missing) for the block; the OS releases it if the holder dies.
    Without ``fcntl`` (not POSIX) the block runs unlocked: writers there go through a temporary file and an
    atomic rename."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
