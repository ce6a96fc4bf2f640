"""A process's signal sets as the kernel shows them (/proc/<pid>/status: SigIgn, SigPnd, ShdPnd ...)."""

from __future__ import annotations

import signal
from pathlib import Path


def has_signal(pid: int, sig: int, *fields: str) -> bool:
    """Whether ``sig`` is in any of the named sets of ``pid`` (False once the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return False
    bit = 1 << (signal.Signals(sig) - 1)
    return any(int(line.split()[1], 16) & bit for line in lines if line.split(":", 1)[0] in fields)
