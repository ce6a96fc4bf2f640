"""The supervisor's loop: signals, reload, pause, systemd, the inbox, and one worker at a time.

One thread runs the loop (:meth:`Supervisor.tick`); it takes ``now`` as an argument so tests
drive time without sleeping (huey style). Signal handlers only record the signal and wake the
loop through the wakeup pipe (neither logging nor killing is safe inside a handler). A turn of
the loop is bounded: the inbox's work is done in slices of at most :data:`SLICE_S` (intake.py,
claimpool.py), so signals, ``.stop``, requests and systemd's watchdog wait for one slice at most,
whatever arrives; each turn is timed (health.py) and one over a second is logged.

Helper threads: the memory guard's (guardthread.py: it samples and acts on its own schedule, so
no turn of the loop can blind it), the claim pool's (the disk's part of a claim), watchdog's
inotify observer (a byte to the wakeup pipe: a hint, the folder is the truth), and the relay of
the worker's stdout.

What happens to a batch is in the rooms beside this one: :mod:`.attempts` (claim, start,
settle), :mod:`.policy` (the pure exit policy), :mod:`.stopping` (the one way to stop a
worker), :mod:`.filing` (done/failed/current), :mod:`.reconcile` (restart recovery).

Queue discipline is strict FIFO: the oldest queued batch blocks the ones behind it, even
while it waits out a crash back-off. Each batch continues from ``adapters/current``; letting
a younger batch overtake would publish an adapter trained from an older base over it.

Never imports torch: it must stay small and never be the process the kernel kills.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from trainerd.core import faults
from trainerd.supervisor.child import worker_command
from trainerd.core.settings import Settings
from trainerd.core.contract import RootLayout
from trainerd.supervisor.inbox import Inbox
from trainerd.supervisor.ledger import Ledger, LedgerTooNew
from trainerd.core.logs import get_logger
from trainerd.memguard import MemoryGuard
from trainerd.supervisor.metrics import Metrics
from trainerd.supervisor.sdnotify import Notifier
from trainerd.supervisor.assembly import Assembly
from trainerd.supervisor.attempts import Attempts
from trainerd.supervisor.control import Control
from trainerd.supervisor.settle import Running
from trainerd.supervisor.chain import Chain
from trainerd.supervisor.guardthread import GuardThread
from trainerd.supervisor.loophealth import LoopHealth
from trainerd.supervisor.desk import Desk
from trainerd.supervisor.hooks import Hooks
from trainerd.supervisor.retention import Retention
from trainerd.supervisor.disk import DiskSpace
from trainerd.supervisor.diskbook import DiskBook
from trainerd.supervisor.filing import Filing
from trainerd.supervisor.intake import Intake
from trainerd.supervisor import heap, recovery
from trainerd.supervisor import stall
from trainerd.supervisor.basehold import BaseHold
from trainerd.supervisor.maintenance import Maintenance
from trainerd.supervisor.report import StateReport
from trainerd.supervisor.requests import Requests
from trainerd.supervisor.wakeup import Wakeup

__all__ = ["SLICE_S", "Supervisor"]

# The most a turn spends on the inbox (scan, /proc walk, claims) and on requests, each: the
# rest waits for the next turn, which comes at once.
SLICE_S = 0.05
# The guard's thread re-takes the GIL after each of a poll's ~10 small reads: with the loop
# running Python, that waits up to this long each time (measured at the default 5 ms: a poll took
# up to 40 ms; at 1 ms, 1.5 ms). Only contended switches are affected.
SWITCH_INTERVAL_S = 0.001


class Supervisor(Assembly, Control):
    """Owns ``root``: the single writer of the ledger and the parent of every worker. Here: the loop and
    the one worker; its rooms made and closed in assembly.py, signals, reload, pause and its state told
    in control.py, the root's lock in rootlock.py."""

    def __init__(self, settings: Settings, *, config_path: str | os.PathLike[str] | None = None,
                 worker_cmd: list[str] | str | None = None, log: Any = None,
                 env: dict[str, str] | None = None):
        settings.root = str(Path(settings.root).resolve())
        self.settings = settings
        self.config_path = config_path
        self.worker_cmd = worker_command(worker_cmd)
        self.env = env
        self.log = log if log is not None else get_logger()
        self.layout = RootLayout(settings.root)
        self.ledger: Ledger | None = None
        self.filing: Filing | None = None
        self.attempts: Attempts | None = None
        self.running: Running | None = None
        self.stopping = False
        self.finished = False
        self._lock_fd: int | None = None
        self._guard_stale = False
        self._start_blocked_until = 0.0
        # Remembered only to log the edges (paused/resumed, retry_waiting).
        self._paused_seen = False
        self._waiting_logged: int | None = None
        self.notifier = Notifier.from_env(unset_environment=True)
        self.guard = MemoryGuard(settings.memory, log=self.log)
        self.inbox = Inbox(self.layout.inbox, settle_s=settings.supervisor.settle_s, log=self.log)
        self.wakeup = Wakeup()
        self.intake = Intake(self.inbox, self.wakeup, self.log, rescan_s=settings.supervisor.rescan_s)
        self.disk = DiskSpace(self.layout, self.log)
        self.report = StateReport(self.layout, self.notifier, self.log)
        self.requests = Requests(self.layout, self.log)
        self.chain: Chain | None = None
        self.desk: Desk | None = None
        self.hooks: Hooks | None = None
        self.retention: Retention | None = None
        self.maintenance = Maintenance(self.layout, self.log, env)
        self.base_hold = BaseHold(settings.model.path, self.layout, self.log)
        self.backups: recovery.Backups | None = None
        self.book: DiskBook | None = None
        self.metrics = Metrics(self.log)  # the Prometheus textfile (trainerd/supervisor/metrics.py)
        self.health = LoopHealth(self.log)
        self.guard_thread = GuardThread(self.log)
        self._stalled = False  # the supervisor_stall_loop fault, done once

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code (0 after a graceful stop)."""
        self.wakeup.install()
        heap.limit_arenas()  # before any thread: the relay threads would each grow an arena
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        try:
            self.open()
            self.intake.start_watching(self.layout.stop, self.layout.requests)
            self.intake.work(time.time(), time.monotonic() + SLICE_S, self.ledger, self.filing)  # a first slice
            self.notifier.ready(status=self._describe_state())
            self.log.info("supervisor_ready", paused=self.paused,
                          watchdog_interval_s=self.notifier.watchdog_interval_s())
            while not self.finished:
                wake_at = self.tick(time.time())
                if self.finished:
                    break
                self.wakeup.wait(None if wake_at is None else max(0.0, wake_at - time.time()))
            self.log.info("supervisor_stopped")
            return 0
        except (LedgerTooNew, recovery.LedgerUnrecoverable):
            raise  # not a crash: the ledger cannot be used as it is; the CLI says why (exit 78)
        except Exception:
            self.log.exception("supervisor_crashed")
            raise
        finally:
            self.wakeup.uninstall()
            self.maintenance.stop()
            if self.running is not None:
                # Only after an exception. Let the worker checkpoint (it would also stop on its
                # lifeline, but then the next start has to wait for it); kill it if it hangs.
                child = self.running.child
                self.running.stop.shutdown(time.time(), self.settings.supervisor.stop_grace_s, at_once=False)
                if child.wait(self.settings.supervisor.stop_grace_s) is None:
                    self.running.stop.shutdown(time.time(), 0.0, at_once=True)
                    child.wait(5.0)
            self.close()

    # --- the loop ------------------------------------------------------------------------

    def tick(self, now: float) -> float | None:
        """Do everything that is due at ``now``; return when to be called next (None = on an event).

        ``now`` is wall-clock seconds (it is stored in the ledger: back-off deadlines must
        survive a restart). The memory guard's thread uses monotonic time: it only compares its
        own samples with each other, and a wall-clock step (NTP) must not read as growth.
        """
        assert self.ledger is not None, "call open() first"
        with self.health.turn():
            return self._turn(now)

    def _turn(self, now: float) -> float | None:
        phase = self.health.phase
        if self.running is None or self.running.child.poll() is not None:
            with phase("disk"):
                # Before this tick writes (claims, an exit's settlement), and only with no worker.
                self.disk.keep_reserve(self.settings.disk.min_free_bytes)
        with phase("signals"):
            self._handle_signals(now)
            self._check_pause(now)
        if self.running is not None:
            with phase("worker"):
                self._supervise(now)
        for action in self.guard_thread.take_actions():  # counted for the metrics (ledger counters survive restarts)
            self.ledger.bump(f"guard_actions:{action}")
        if self.stopping and self.running is None:
            self.finished = True
            self.metrics.tick(now, self, force=True)  # the last state (no worker) for the textfile it leaves behind
            return None
        with phase("inbox"):
            self.intake.work(now, time.monotonic() + SLICE_S, self.ledger, self.filing)
        with phase("requests"):
            # promote / rollback asked through root/requests/ (a listdir when there are none)
            self.requests.serve(self.desk, self.running, now, base=self.base_hold.base.get(),
                                deadline=time.monotonic() + SLICE_S)
        with phase("hooks"):
            self.hooks.tick(now)  # issue 14: polls a running hook, starts the next pending one
            self.retention.tick(now, idle=self.running is None, stopping=self.stopping)
        with phase("disk"):
            self.book.tick(now, running=self.running is not None, min_free_bytes=self.settings.disk.min_free_bytes)
        if self.running is None and not self.stopping:
            with phase("start"):
                self._maybe_start(now)
        with phase("report"):
            self.report.ping(now, self.settings.supervisor.watchdog_ping_s)
            self._write_daemon_state()
            self.backups.due(now, self.settings.supervisor.ledger_backup_s)
        with phase("metrics"):
            metrics_due = self.metrics.tick(now, self)  # reads this object's public state; cheap unless due
        return min(self._next_wake(now), metrics_due)

    def loop_figures(self) -> dict[str, Any]:
        """The loop's health for daemon.json and the metrics: the longest turn of the last minute
        (and what it did) and the guard's measured sampling interval."""
        mono = time.monotonic()
        longest, doing = self.health.longest(mono)
        return {"longest_turn_s": None if longest is None else round(longest, 4), "longest_turn_doing": doing,
                "guard_interval_s": self.guard_thread.intervals.figures(mono),
                "guard_interval_ms": self.settings.memory.interval_ms}

    def _next_wake(self, now: float) -> float:
        times = self.intake.next_wake(now)
        if self.requests.more:
            times.append(now)  # a burst of requests: the next slice at once
        if self.report.next_ping is not None:
            times.append(self.report.next_ping)
        if self.maintenance.child is not None:
            times.append(now + 1.0)  # SIGCHLD wakes us when it ends; this is only a backstop
        if self.hooks is not None and self.retention is not None:
            times += self.hooks.wake_times(now) + self.retention.wake_times(now)
        if self.book is not None:
            times += self.book.wake_times(now, running=self.running is not None)
        r = self.running
        if r is not None:
            times.append(r.next_stall_look)
            if r.stop.kill_at is not None:
                times.append(r.stop.kill_at)
            # SIGCHLD wakes us when the worker exits; this is only a backstop.
            times.append(now + 1.0)
        elif not self.paused and not self.stopping:
            head = self.ledger.next_queued() if self.ledger else None
            if head is not None and head.next_attempt_at > now:
                times.append(head.next_attempt_at)
        return max(now, min(times))

            # SIGCHLD is only a wake-up: _supervise reaps.

    # --- one worker ----------------------------------------------------------------------

    def _maybe_start(self, now: float) -> None:
        assert self.ledger is not None and self.attempts is not None
        if self.paused:
            return
        head = self.ledger.next_queued()
        if head is None or now < self._start_blocked_until:
            return
        if head.next_attempt_at > now:
            if self._waiting_logged != head.id:
                self._waiting_logged = head.id
                self.log.info("retry_waiting", batch=head.id, retry_in_s=round(head.next_attempt_at - now, 3))
            return
        if not self.disk.may_start(self.settings.disk.min_free_bytes, head.id):
            return
        if self.maintenance.busy(now, self.settings) or self.retention.busy() or \
                self.base_hold.holds(head, self.ledger.latest_version()):
            return
        if self._guard_stale:
            self._guard_stale = False
            self.guard = self.attempts.guard = MemoryGuard(self.settings.memory, log=self.log)
        try:
            self.running = self.attempts.start(head, now)
        except OSError as e:
            # Before the worker exists (settings.json, folders): the batch is still QUEUED.
            self.log.error("worker_start_failed", batch=head.id, error=str(e),
                           retry_in_s=self.settings.supervisor.rescan_s)
            self._start_blocked_until = now + self.settings.supervisor.rescan_s
            return
        if self.running is not None:
            # The guard gets monotonic time: it only compares its own samples (growth rates,
            # worker age), and a wall-clock step (NTP) must not read as growth or a sudden age.
            self.guard_thread.attach(self.guard, self.running, time.monotonic())

    def _supervise(self, now: float) -> None:
        r = self.running
        assert r is not None and self.attempts is not None
        status = r.child.poll()
        if status is None:
            # The memory guard polls on its own thread (guardthread.py); the stall watch looks
            # once a second.
            stall.watch(r, now, self.settings.supervisor.stall_timeout_s, self.settings.supervisor.stop_grace_s)
            r.stop.tick(now)
            if not self._stalled and (stall_s := faults.number("supervisor_stall_loop")):
                self._stalled = True  # chaos tests: the loop held busy, once, while a worker runs
                self.log.warning("loop_stall_injected", seconds=stall_s)
                faults.spin(stall_s)
                self.log.warning("loop_stall_ended", seconds=stall_s)
            return
        self.guard_thread.detach()  # waits for a poll in progress: nothing acts on this attempt now
        self.running = None
        self.attempts.finish(r, status, now, stopping=self.stopping)
        self.retention.worker_ended(now)
        self.metrics.attempt_ended(r.files.progress)
        heap.trim()  # what the attempt's relay freed goes back to the kernel: the RSS stays flat
