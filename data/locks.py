"""Workspace locks: one holder at a time across processes (`$ILR_HOME/locks/NAME.lock`, flock), for work
that must not overlap — DVC/git on a repository, a retrain, a build of one collection."""
from __future__ import annotations

import contextlib
import fcntl
from typing import Callable

from data.config import ilr_home


class LockBusy(Exception):
    """wait=False and another process holds the lock."""


@contextlib.contextmanager
def workspace_lock(name: str, wait: bool = True, on_wait: Callable[[], None] | None = None):
    """Hold the lock NAME; when another process holds it, call `on_wait` (say why we wait) and wait, or
    raise LockBusy with wait=False."""
    path = ilr_home() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise LockBusy(name) from None
            if on_wait:
                on_wait()
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield
