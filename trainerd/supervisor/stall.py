"""The stall watchdog: a worker whose own loops have not moved for too long is stopped.

The worker touches ``batches/<id>/heartbeat`` from its loops (worker/heartbeat.py), never from a
timer thread. Frozen (SIGSTOP, a deadlock, a hung NFS read, a rank stuck in a collective), it
stops beating; after ``supervisor.stall_timeout_s`` (0: max(300 s, 10 x its median step),
twice that while the model loads, which is no loop of ours) the supervisor logs
``worker_stalled`` and stops it like any other worker (stopping.py: SIGCONT first, so a stopped
one can still checkpoint, then SIGTERM, SIGKILL after the grace), and the attempt counts as a
crash: retried with back-off from the last checkpoint, then quarantined. A merely slow worker
(a long step on a loaded machine) beats at every micro-batch and is never taken for a stalled one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from trainerd.core.contract import BatchFiles
from trainerd.core.fsutil import read_json_or_none

__all__ = ["Stall", "StallWatch", "timeout_s", "watch"]

MIN_TIMEOUT_S = 300.0


def timeout_s(configured: float, phase: str | None, median_step_s: float | None) -> float:
    t = configured if configured > 0 else max(MIN_TIMEOUT_S, 10 * (median_step_s or 0.0))
    return 2 * t if phase in (None, "load") else t


@dataclass(frozen=True)
class Stall:
    since_s: float          # seconds without progress
    phase: str | None
    timeout_s: float
    median_step_s: float | None

    @property
    def stalled(self) -> bool:
        return self.since_s >= self.timeout_s

    def describe(self) -> str:
        return f"no progress for {self.since_s:.0f} s in phase {self.phase or 'start'} (timeout {self.timeout_s:.0f} s)"


class StallWatch:
    """How long one attempt's worker has gone without a sign of life (a stat per call)."""

    def __init__(self, files: BatchFiles, started_at: float):
        self.files, self.started_at = files, started_at

    def look(self, now: float, configured_timeout_s: float) -> Stall:
        try:
            last = max(os.stat(self.files.heartbeat).st_mtime, self.started_at)
            phase: str | None = self.files.heartbeat.read_text()[:32] or None
        except OSError:
            last, phase = self.started_at, None  # not started beating yet: imports, argparse
        median = (read_json_or_none(self.files.progress) or {}).get("median_step_s")
        return Stall(max(0.0, now - last), phase, timeout_s(configured_timeout_s, phase, median), median)

    def fields(self, s: Stall) -> dict[str, Any]:
        return {"no_progress_s": round(s.since_s, 1), "phase": s.phase, "stall_timeout_s": round(s.timeout_s, 1),
                "median_step_s": s.median_step_s}


def watch(r: Any, now: float, timeout_configured_s: float, grace_s: float) -> None:
    """Look at the running worker at most once a second; stop it (stopping.py) once stalled."""
    if r.stall is None or r.stop.stalled is not None or now < r.next_stall_look:
        return
    r.next_stall_look = now + 1.0  # a stat and two small reads: once a second is plenty
    look = r.stall.look(now, timeout_configured_s)
    if look.stalled:
        r.log.error("worker_stalled", pid=r.child.pid, **r.stall.fields(look),
                    action="SIGCONT, SIGTERM (a checkpoint if it still can), SIGKILL after the stop grace; "
                           "counted as a crash")
        r.stop.stall(now, grace_s, look.describe())
