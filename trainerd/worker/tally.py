"""This attempt's running account, for the supervisor's fault accounting (``batches/<id>/tally.json``).

Where the attempt resumed from, the furthest optimizer step it completed, the time it spent in
steps and in checkpoints, its newest checkpoint, and how long its restart took (process start to
the first optimizer step, by phase). The supervisor reads it once the worker is gone
(trainerd/supervisor/ledger/goodput.py) to tell a crash that made progress from one that did not, and to count
the seconds each fault cost.

Written after every optimizer step, so it must cost nothing: one ``pwrite`` of a fixed-size
record at offset 0 of a file opened once (no rename, no fsync). It has to survive the worker's
death, not a power cut, and the page cache keeps it after a SIGKILL. A reader racing the write
can see a torn record only while the worker lives (the supervisor reads after it is gone; status
only as a hint). A background checkpoint writer updates it too, hence the lock.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["SIZE", "Tally", "phase_done", "phases", "start_clock"]

SIZE = 1024  # bytes: the JSON object, padded with spaces, then a newline

_t0: float | None = None
_last: float | None = None
_phases: dict[str, float] = {}


def start_clock() -> None:
    """The worker process starts (first thing in __main__): the restart clock begins."""
    global _t0, _last
    _t0 = _last = time.monotonic()


def phase_done(name: str) -> None:
    """A restart phase ended (imports, load, first_pass, prepare): its seconds are recorded."""
    global _last
    if _last is None:
        return
    now = time.monotonic()
    _phases[name] = round(_phases.get(name, 0.0) + now - _last, 3)
    _last = now


def phases() -> dict[str, float]:
    return dict(_phases)


class Tally:
    """One attempt's record. ``writes=False`` (a torchrun rank other than 0) keeps it in memory."""

    def __init__(self, path: Path, *, writes: bool = True):
        self.path = path
        self.writes = writes
        self._fd: int | None = None
        self._lock = threading.Lock()
        self.data: dict[str, Any] = {"pid": os.getpid(), "from_step": None, "step": None, "steps": 0,
                                     "step_s": 0.0, "ckpt_n": 0, "ckpt_s": 0.0, "ckpt_step": None,
                                     "ckpt_write_s": None, "interval_s": None, "interval_rule": None,
                                     "mtbf_s": None, "ready_at": None, "phases": {}}

    def begin(self, from_step: int, *, mtbf_s: float | None) -> None:
        """Training starts (after the restart phases): where from, and the first step begins now."""
        self.update(from_step=from_step, step=from_step, mtbf_s=mtbf_s, ready_at=round(time.time(), 3),
                    phases=phases())

    def stepped(self, step: int, seconds: float) -> None:
        d = self.data
        self.update(step=step, steps=d["steps"] + 1, step_s=round(d["step_s"] + seconds, 4))

    def checkpointed(self, step: int, write_s: float) -> None:
        """A checkpoint is complete on disk (maybe written by the background writer's thread)."""
        with self._lock:
            d = self.data
            d.update(ckpt_n=d["ckpt_n"] + 1, ckpt_write_s=round(write_s, 4),
                     ckpt_step=step if d["ckpt_step"] is None else max(step, d["ckpt_step"]))
            self._write()

    def stalled(self, seconds: float, **fields: Any) -> None:
        """What a checkpoint cost the step loop (known in the loop, after the write)."""
        with self._lock:
            self.data.update(ckpt_s=round(self.data["ckpt_s"] + seconds, 4), **fields)
            self._write()

    def update(self, **fields: Any) -> None:
        with self._lock:
            self.data.update(fields)
            self._write()

    def _write(self) -> None:
        if not self.writes:
            return
        body = json.dumps(self.data, separators=(",", ":")).encode()
        if len(body) > SIZE - 1:  # never: the fields are bounded; drop the breakdown rather than tear
            body = json.dumps({**self.data, "phases": {}}, separators=(",", ":")).encode()[: SIZE - 1]
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
            os.pwrite(self._fd, body.ljust(SIZE - 1) + b"\n", 0)
        except OSError:
            pass  # a full disk must not stop training: the account is a report, not the state

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
