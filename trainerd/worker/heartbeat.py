"""The worker's sign of life, given by its own loops: never a timer thread, which would go on
beating through a deadlock, a hung read or a rank stuck in a collective.

``batches/<id>/heartbeat`` holds the phase (load, split, scan, train, checkpoint, evaluate,
publish); its mtime is the last time a loop of the worker made progress. A beat rewrites it at
most once a second (a ``utime`` syscall; the phase text only when it changes). The supervisor's
stall watchdog reads the mtime (supervisor/stall.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["beat", "phase", "start"]

_path: Path | None = None
_last = 0.0


def start(path: Path) -> None:
    global _path
    _path = path


def phase(name: str) -> None:
    """Entering a phase is progress too; the supervisor's timeout may depend on it."""
    global _last
    if _path is None:
        return
    try:
        tmp = _path.with_name(f".{_path.name}.tmp")
        tmp.write_text(name)
        os.replace(tmp, _path)
        _last = time.monotonic()
    except OSError:
        pass  # a full disk must not stop training; the checkpoint says so if it matters


def beat() -> None:
    """Progress was made (a micro-batch, 4096 lines read, an evaluation batch)."""
    global _last
    if _path is None:
        return
    now = time.monotonic()
    if now - _last < 1.0:
        return
    _last = now
    try:
        os.utime(_path)
    except OSError:
        pass
