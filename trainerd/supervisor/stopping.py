"""Stopping one worker: the only place that asks it to stop, and the one record of why and how.

Every request goes through an :class:`Escalation` (one per attempt), whoever makes it — the
memory guard, a shutdown, the stall watchdog — and climbs the same ladder::

    .stop file (the worker checkpoints at its next micro-batch boundary, exits 75)
      -> SIGTERM to the worker (it still checkpoints if it can)
        -> SIGKILL to its whole process group (the grace ran out, or there is no room left)

It remembers the *cause* (why trainerd wants the worker gone: memory, recycle, shutdown, ...)
and, for every signal it sent, the *sender* (the guard or the supervisor), so that when the
worker ends, the exit policy gets cause x sender x exit status as plain values instead of
reconstructing them from three places.

Two threads make requests: the memory guard's own (supervisor/guardthread.py, so that a busy
loop never delays a memory stop) and the supervisor's loop (shutdown, cancel, stall, the grace's
SIGKILL). Every rung runs under the escalation's lock, so the ladder, the cause and the record of
signals sent stay one consistent story; the worker itself is signalled through
:meth:`trainerd.supervisor.child.Child.send`, which never reaches a reaped pid.
"""

from __future__ import annotations

import functools
import signal
import threading
from enum import Enum
from typing import Any, Callable, TypeVar

from trainerd.core.contract import BatchFiles, StopReason
from trainerd.core.fsutil import atomic_write_bytes

__all__ = ["Escalation", "Sender"]


class Sender(str, Enum):
    """Who in trainerd sent a signal (the ledger's ``attempts.signal_sent_by``)."""

    SUPERVISOR = "supervisor"
    GUARD = "guard"

    def __str__(self) -> str:
        return self.value


# A memory stop outranks a recycle: both checkpoint and exit 75, but only memory backs off.
_RANK = {StopReason.RECYCLE: 1, StopReason.MEMORY: 2}

_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(fn: _F) -> _F:
    @functools.wraps(fn)
    def run(self: "Escalation", *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return fn(self, *args, **kwargs)
    return run  # type: ignore[return-value]


class Escalation:
    """The stop requests made to one running worker (``child``: a :class:`trainerd.supervisor.child.Child`)."""

    def __init__(self, child: Any, files: BatchFiles, log: Any):
        self.child = child
        self.files = files
        self.log = log
        self.cause: StopReason | None = None
        self.kill_at: float | None = None       # SIGKILL the group at this time (a grace runs)
        self.grace_s: float | None = None
        self.stalled: str | None = None  # what the stall watchdog saw, when it stopped the worker
        self.stop_file: StopReason | None = None  # what this attempt's .stop says (written by us)
        self._sent: list[tuple[int, Sender]] = []
        # Re-entrant: a rung calls the lower ones (apply_guard -> write_stop -> ...).
        self.lock = threading.RLock()

    # --- what happened ---------------------------------------------------------------

    @_locked
    def sent_by(self, sig: int | None) -> Sender | None:
        """Who in trainerd last sent ``sig``; None if trainerd never sent it."""
        for s, by in reversed(self._sent):
            if s == sig:
                return by
        return None

    # --- the rungs -------------------------------------------------------------------

    @_locked
    def write_stop(self, reason: StopReason) -> bool:
        """Rung 1: ask through ``batch/.stop`` (atomically, once; recycle may become memory).

        True when this call wrote it. A failed write is logged and left unrecorded, so the next
        request tries again.
        """
        if self.stop_file is not None and _RANK.get(self.stop_file, 3) >= _RANK.get(reason, 3):
            return False
        try:
            # durable=False: a .stop lost to a power cut is moot (the worker dies with it), and
            # an fsync here would cost milliseconds of reaction time.
            atomic_write_bytes(self.files.stop, reason.value.encode(), durable=False)
        except OSError as e:
            self.log.error("memory_stop_write_failed", path=str(self.files.stop), error=str(e))
            return False
        self.stop_file = reason
        self._set_cause(reason)
        return True

    @_locked
    def terminate(self, cause: StopReason, by: Sender, now: float, *, grace_s: float | None = None) -> None:
        """Rung 2: SIGTERM to the worker alone (it stops its own helpers); with ``grace_s``, the
        whole group gets SIGKILL once that has passed."""
        self._set_cause(cause, force=by is Sender.SUPERVISOR)
        self._send(signal.SIGTERM, by)
        if grace_s is not None:
            self.grace_s = grace_s
            self.kill_at = now + grace_s

    @_locked
    def kill(self, cause: StopReason, by: Sender) -> None:
        """Rung 3: SIGKILL the worker and every process in its group (grandchildren included)."""
        self._set_cause(cause, force=by is Sender.SUPERVISOR)
        self._send(signal.SIGKILL, by, group=True)
        self.kill_at = None

    @_locked
    def tick(self, now: float) -> None:
        """SIGKILL the group once a grace given to ``terminate`` has run out."""
        if self.kill_at is not None and now >= self.kill_at:
            self.log.warning("worker_killed", reason="stop grace expired", stop_grace_s=self.grace_s)
            self.kill(self.cause or StopReason.SHUTDOWN, Sender.SUPERVISOR)

    # --- requests by source ----------------------------------------------------------

    @_locked
    def apply_guard(self, decision: Any) -> None:
        """Carry out a memory guard :class:`~trainerd.memguard.Decision`."""
        action = decision.action
        if action == "stop":
            self.write_stop(StopReason.MEMORY)
        elif action == "recycle":
            self.write_stop(StopReason.RECYCLE)
        elif action == "term":
            # The worker's result.json must say why it was terminated: .stop first, then TERM.
            self.write_stop(StopReason.MEMORY)
            self.terminate(StopReason.MEMORY, Sender.GUARD, 0.0)
        elif action == "kill":
            self.kill(StopReason.MEMORY, Sender.GUARD)

    @_locked
    def stall(self, now: float, grace_s: float, why: str) -> None:
        """No progress: continue a stopped worker (so it can checkpoint), then SIGTERM with a grace."""
        self.stalled = why
        self.child.send(signal.SIGCONT, group=True)
        self.terminate(StopReason.STALLED, Sender.SUPERVISOR, now, grace_s=grace_s)

    @_locked
    def cancel(self, now: float, grace_s: float) -> bool:
        """`trainerd cancel`: .stop says cancelled (the worker checkpoints at its next micro-batch
        and exits 75, its result.json saying why), SIGKILL to the group once ``grace_s`` has passed.
        No SIGTERM in between: the worker reads both at the same boundaries, and the .stop keeps
        the reason. Once only; False when already asked."""
        if self.cause is StopReason.CANCELLED:
            return False
        self._set_cause(StopReason.CANCELLED, force=True)
        self.write_stop(StopReason.CANCELLED)
        self.grace_s = grace_s
        self.kill_at = now + grace_s if self.kill_at is None else min(self.kill_at, now + grace_s)
        return True

    @_locked
    def shutdown(self, now: float, grace_s: float, *, at_once: bool) -> None:
        """The daemon is stopping: SIGTERM with a grace, or (a second request) SIGKILL now."""
        if at_once:
            self.kill(StopReason.SHUTDOWN, Sender.SUPERVISOR)
        else:
            self.terminate(StopReason.SHUTDOWN, Sender.SUPERVISOR, now, grace_s=grace_s)

    # --- plumbing --------------------------------------------------------------------

    def _set_cause(self, cause: StopReason, *, force: bool = False) -> None:
        # A supervisor's own request (shutdown, stall) replaces the cause; a memory request
        # replaces any (it must back off); a recycle only fills an empty one. An operator's
        # cancel is never replaced: whatever follows, the batch is withdrawn.
        if self.cause is StopReason.CANCELLED:
            return
        if force or self.cause is None or cause is StopReason.MEMORY:
            self.cause = cause

    def _send(self, sig: int, by: Sender, *, group: bool = False) -> None:
        # Recorded only once delivered: a worker reaped meanwhile (the loop's thread) got nothing
        # from us. Under the lock, so the loop's sent_by() never reads a send half-recorded.
        if self.child.send(sig, group=group):
            self._sent.append((int(sig), by))
