"""The memory guard on its own schedule: a thread that samples the running worker every
``memory.interval_ms`` and carries out each decision at once, whatever the loop is doing.

Why a thread and not the loop: the loop claims files, answers requests and files results; one
long turn of it (a burst of files, a slow disk) used to blind the guard for as long — the kernel
OOM-killed a worker while a 71 s burst was claimed. Why a thread and not a process: the guard
acts through the attempt's :class:`~trainerd.supervisor.stopping.Escalation` (the one record of
why and how a worker was stopped, which the exit policy reads), and signals the worker through
its :class:`~trainerd.supervisor.child.Child` (which alone may, as its parent, know whether it is reaped); a
second process would need both carried across, and another interpreter (~10 MB) beside the
40 MB budget.

The GIL: the loop's heavy work either releases it (hashing, SQLite, fsync, the claim pool's
threads) or runs pure Python, which yields it every switch interval. A poll makes ~10 small
reads, each a release and a re-acquire; the daemon sets the switch interval to 1 ms (measured on
2 cores with the loop spinning in pure Python: a poll took up to 40 ms at the default 5 ms, 1.5 ms
at 1 ms; the shorter interval costs nothing while no other thread waits).

Safety, as before: decisions go to the attempt's Escalation (its lock keeps the ladder and the
record consistent with the loop's own requests), the worker is signalled only while unreaped
(Child's lock and pidfd), and ``.stop`` is written atomically. :meth:`GuardThread.detach` waits
for a poll in progress, so nothing acts on an attempt the loop has settled.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from trainerd.supervisor.loophealth import RecentIntervals

__all__ = ["GuardThread"]

_ERROR_LOG_EVERY_S = 60.0


@dataclass
class _Target:
    guard: Any            # MemoryGuard
    running: Any          # attempts.Running: its child and its Escalation
    interval_s: float
    next_poll: float
    last_poll: float | None = None


class GuardThread:
    """Polls the attached worker's guard on a fixed cadence (monotonic clock)."""

    def __init__(self, log: Any):
        self.log = log
        self.intervals = RecentIntervals()      # measured time between two polls
        self._cond = threading.Condition()      # its lock is held for a whole poll and its action
        self._target: _Target | None = None
        self._actions: deque[str] = deque()     # carried out, for the loop to count in the ledger
        self._stopped = False
        self._errors_logged_at = -1e18
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="memory-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    # --- the loop's side -------------------------------------------------------------------

    def attach(self, guard: Any, running: Any, now: float) -> None:
        """Watch ``running``'s worker from ``now`` (monotonic) with ``guard``; the first poll at once."""
        guard.attach(running.child.pid, running.files.dir, now)
        with self._cond:
            self._target = _Target(guard, running, guard.interval_s, next_poll=now)
            self._cond.notify()

    def detach(self) -> None:
        """Stop watching (after the worker was reaped); returns once no poll is in progress."""
        with self._cond:
            target, self._target = self._target, None
        if target is not None:
            target.guard.detach()

    def take_actions(self) -> list[str]:
        """The actions carried out since the last call (stop, recycle, term, kill)."""
        out = []
        while self._actions:
            out.append(self._actions.popleft())
        return out

    # --- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                t = self._target
                now = time.monotonic()
                if t is None or now < t.next_poll:
                    self._cond.wait(None if t is None else t.next_poll - now)
                    continue
                self._poll(t, now)
                # A fixed cadence; after a stall (a suspended VM) start again from now, no burst.
                t.next_poll = max(t.next_poll + t.interval_s, time.monotonic())

    def _poll(self, t: _Target, now: float) -> None:
        if t.last_poll is not None:
            self.intervals.add(now, now - t.last_poll)
        t.last_poll = now
        try:
            decision = t.guard.poll(now)
            if decision.action == "none":
                return
            esc = t.running.stop
            with esc.lock:
                if t.running.child.returncode is not None:
                    return  # reaped: the loop settles it; nothing to stop any more
                esc.apply_guard(decision)
            self._actions.append(decision.action)
        except Exception as e:  # noqa: BLE001 - the guard must keep polling whatever one poll hit
            if now - self._errors_logged_at >= _ERROR_LOG_EVERY_S:
                self._errors_logged_at = now
                self.log.exception("memory_guard_poll_failed", error=f"{type(e).__name__}: {e}",
                                   hint="the guard keeps polling; this is logged once a minute at most")
