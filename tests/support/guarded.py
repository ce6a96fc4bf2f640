"""Acting on the memory guard's decisions as the supervisor does, for the guard's tests and its
benchmark: the worker is a real :class:`trainerd.supervisor.child.Child` (its own session and group), and
every decision goes to a real ``Escalation``, which writes ``.stop`` and sends the signals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainerd.supervisor.child import Child, ExitStatus
from trainerd.core.contract import BatchFiles
from trainerd.supervisor import stopping

__all__ = ["Acted", "Run", "start_worker", "stopping", "supervise"]




def start_worker(argv: list[str], batch_dir: Path, log: Any, *, cg: Any = None,
                 env: dict[str, str] | None = None) -> tuple[Child, Any]:
    """Start ``argv`` as the worker of ``batch_dir`` (inside the test cgroup ``cg``, if given),
    and the Escalation that carries out the guard's decisions for it."""
    if cg is not None:
        # Child has no preexec hook: a shell joins the cgroup, then execs the worker under the
        # same pid, so every byte the worker touches is charged there.
        argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cg.path / "cgroup.procs"), *argv]
    files = BatchFiles(batch_dir)
    child = Child(argv, stderr_path=files.stderr, log=log, env=env)
    return child, stopping.Escalation(child, files, log)


@dataclass
class Acted:
    """A decision with an action, and when it was made and carried out."""

    decision: Any
    polled_at: float
    acted_at: float        # after the Escalation wrote .stop / sent the signal
    poll_gap_s: float      # since the previous poll


@dataclass
class Run:
    status: ExitStatus
    acted: list[Acted] = field(default_factory=list)
    max_usage_bytes: int = 0

    @property
    def actions(self) -> list[str]:
        return [a.decision.action for a in self.acted]


def supervise(guard: Any, child: Child, escalation: Any, batch_dir: Path, *, timeout_s: float = 20.0) -> Run:
    """Poll the guard every interval until the worker exits, handing each decision to the
    Escalation (as the supervisor's loop does); the guard is detached at the end."""
    started = time.monotonic()
    guard.attach(child.pid, batch_dir, started)
    run = Run(status=ExitStatus(None, None))
    next_poll = last_poll = started
    try:
        while child.poll() is None:
            now = time.monotonic()
            assert now - started < timeout_s, f"worker still running after {timeout_s}s: {run.acted}"
            if now >= next_poll:
                next_poll = now + guard.interval_s  # as the supervisor schedules it
                d = guard.poll(now)
                run.max_usage_bytes = max(run.max_usage_bytes, d.usage_bytes)
                if d.action != "none":
                    escalation.apply_guard(d)
                    run.acted.append(Acted(d, now, time.monotonic(), now - last_poll))
                last_poll = now
            time.sleep(max(0.0, min(next_poll - time.monotonic(), 0.01)))
        guard.poll(time.monotonic())  # the guard sees the exit (learns how long a stop takes)
    finally:
        if child.poll() is None:
            child.kill_group()
        child.wait()
        guard.detach()
    status = child.poll()
    assert status is not None
    run.status = status
    return run
