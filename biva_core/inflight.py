"""Cross-process coordination of the python-backend stubs: which stub is inside an execute() right now, and the
cancel folder through which the fronts and the launcher stop abandoned requests.

Copied beside every python-backend model.py (export/repository.py's SERVED_CORE); the supervisor
(serving/supervisor.py) reads what the stubs mark. Standard library only.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

# Abandoned requests: the launcher makes a cancel folder and names it to the stubs in CANCEL_DIR_ENV; each front
# request carries a token (request parameter TOKEN_PARAMETER) that its front writes as a file there when the
# client goes away, and SHUTDOWN_MARK there stops every request when the server shuts down
CANCEL_DIR_ENV, TOKEN_PARAMETER, SHUTDOWN_MARK = "BIVA_CANCEL_DIR", "biva_token", "shutdown"

# In flight: a request in a stub's execute() holds a shared lock on BUSY_FILE in the cancel folder. Triton counts a
# request only when it ends and keeps no count of the running ones, so this is how the supervisor knows that a stub
# is at work before it loads a model again to give memory back, or kills a stub that outlived its unload; the
# kernel drops the lock when the stub dies, so a dead stub never looks busy.
BUSY_FILE = "busy-{pid}.lock"


class InFlight:
    """`with InFlight(folder):` around a stub's execute(): marks this process at work (BUSY_FILE); a no-op without
    a cancel folder (Triton started without the launcher)."""

    def __init__(self, folder: str | None):
        self.f = open(os.path.join(folder, BUSY_FILE.format(pid=os.getpid())), "a") if folder else None

    def __enter__(self) -> InFlight:
        if self.f:
            fcntl.flock(self.f, fcntl.LOCK_SH)
        return self

    def __exit__(self, *exc) -> None:
        if self.f:
            fcntl.flock(self.f, fcntl.LOCK_UN)


def stub_busy(folder: str | Path | None, pid: int) -> bool:
    """Whether stub `pid` is inside an execute() (holds its InFlight lock); False without a folder or a mark."""
    if not folder:
        return False
    try:
        f = open(os.path.join(folder, BUSY_FILE.format(pid=pid)), "r")
    except OSError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False
