"""How the supervisor's one thread sleeps and wakes: a self-pipe.

Signal handlers only record the signal (neither logging nor killing is safe inside a handler);
the C-level handler also writes a byte to the pipe (``signal.set_wakeup_fd``), so a ``select``
on it returns at once. Helper threads (watchdog's inotify observer) write a byte to the same
pipe as a hint: the folder is the truth, the hint only makes the loop look sooner.
"""

from __future__ import annotations

import os
import select
import signal
from typing import Any

__all__ = ["Wakeup"]

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


class Wakeup:
    def __init__(self) -> None:
        self.pending: list[int] = []   # signals received, oldest first (the loop pops them)
        self.hinted = True             # a hint arrived since the last inbox scan
        self._r: int | None = None
        self._w: int | None = None

    def install(self) -> None:
        """Create the pipe and take over SIGTERM, SIGINT, SIGHUP and SIGCHLD."""
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The C-level handler writes to this pipe; the Python-level handler only records.
        signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        for sig in HANDLED:
            signal.signal(sig, self._record)

    def uninstall(self) -> None:
        signal.set_wakeup_fd(-1)

    def close(self) -> None:
        for fd in (self._r, self._w):
            if fd is not None:
                os.close(fd)
        self._r = self._w = None

    def _record(self, signum: int, _frame: Any) -> None:
        self.pending.append(signum)

    def hint(self) -> None:
        """From any thread: note it and wake the loop (a pipe write is thread-safe)."""
        self.hinted = True
        self.poke()

    def poke(self) -> None:
        """From any thread: wake the loop without marking the inbox for a scan (a claim's disk
        work finished on the pool's thread, say)."""
        if self._w is not None:
            try:
                os.write(self._w, b"p")
            except OSError:  # EAGAIN: the pipe is full, the loop will wake anyway
                pass

    def wait(self, timeout: float | None) -> None:
        """Sleep until a signal, a hint, or ``timeout`` seconds (None: no limit); then drain."""
        if self._r is None:
            return
        try:
            select.select([self._r], [], [], timeout)
        except InterruptedError:  # PEP 475 retries, but be explicit about EINTR
            pass
        try:
            while os.read(self._r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
