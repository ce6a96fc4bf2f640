"""The root's lock: an exclusive flock on ``root/trainerd.pid``, held by the one writer of the ledger
(the daemon, or a command applying a change with no daemon running).
"""

from __future__ import annotations

import fcntl
import os

from trainerd.core.contract import RootLayout

__all__ = ["AlreadyRunning", "take_root_lock"]


class AlreadyRunning(RuntimeError):
    """Another supervisor holds the root's lock: two writers would corrupt the ledger's story."""


def take_root_lock(layout: RootLayout, *, write_pid: bool = True) -> int:
    """The root's lock (an exclusive flock on ``trainerd.pid``, holding our pid): the one writer of
    the ledger holds it, the daemon or a command applying a change with no daemon running.
    Released when the fd closes or the process dies. AlreadyRunning when another holds it.

    A command (``write_pid=False``) only flocks: the file keeps the last daemon's pid, so a command
    that ends up refusing has changed nothing on disk (status, meanwhile, names that pid)."""
    fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise AlreadyRunning(f"another trainerd (pid {other or '?'}) is running on {layout.root}")
    if write_pid:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
