"""Is the process that made something still at work? A lock it holds says so; a pid cannot.

A pid means nothing on another host, in another PID namespace (a container's
PID 1 is "alive" everywhere), or once reused. An ``flock`` is released by the
kernel when its holder ends, however it ends (kill -9 included), and another
process, here or over NFSv4, sees that at once.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def hold(fd: int) -> None:
    """Mark the open file ``fd`` as in use by this process for as long as ``fd`` stays open."""
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def held(path: Path) -> bool:
    """True if a live process (this one included, through another open file) holds ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
