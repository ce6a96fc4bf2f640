"""What the operator and systemd say to the daemon, and what it tells them: signals (SIGTERM/SIGINT
stop, SIGHUP reloads the config), the pause file, and the daemon's state (``daemon.json``,
systemd's STATUS line).

A part of :class:`trainerd.supervisor.daemon.Supervisor`, which holds the state it works on.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from trainerd.core import config as config_mod
from trainerd.core.config import ConfigError
from trainerd.supervisor.basehold import BaseHold

__all__ = ["Control"]


class Control:
    """Signals, reload, pause and the daemon's state, of the Supervisor."""

    @property
    def paused(self) -> bool:
        """``root/.stop`` exists (the operator's pause)."""
        return os.path.lexists(self.layout.stop)

    @property
    def disk_low(self) -> bool:
        """Free space under the root is below ``disk.min_free_bytes``: no attempt starts."""
        return self.disk.low(self.settings.disk.min_free_bytes)

    def _handle_signals(self, now: float) -> None:
        while self.wakeup.pending:
            sig = self.wakeup.pending.pop(0)
            if sig == signal.SIGHUP:
                self.reload()
            elif sig in (signal.SIGTERM, signal.SIGINT):
                self.request_stop(now, signal.Signals(sig).name)

    def request_stop(self, now: float, why: str = "request") -> None:
        """First call: stop the worker gracefully (grace, then SIGKILL). Second call: at once."""
        r = self.running
        grace = self.settings.supervisor.stop_grace_s
        if not self.stopping:
            self.stopping = True
            self.log.info("shutdown_requested", signal=why, worker_running=r is not None, stop_grace_s=grace)
            self.notifier.stopping(status="stopping: checkpointing the running batch" if r else "stopping")
            if r is not None:
                # SIGTERM to the worker only (not its group): it checkpoints and exits 75, and
                # stops its own helpers. The whole group gets SIGKILL if the grace runs out.
                r.stop.shutdown(now, grace, at_once=False)
            return
        self.log.warning("shutdown_forced", signal=why)
        if r is not None:
            r.stop.shutdown(now, grace, at_once=True)

    def reload(self) -> None:
        """SIGHUP: load the config again for the next attempts; a bad file keeps the old one."""
        if self.config_path is None:
            self.log.warning("config_reload_skipped", reason="started without a config file")
            return
        self.notifier.reloading()
        try:
            new = config_mod.load(self.config_path)
        except ConfigError as e:
            self.log.error("config_reload_failed", config=str(self.config_path), problems=e.problems)
            self.notifier.ready(status=self._describe_state())
            return
        new.root = str(Path(new.root).resolve())
        if new.root != self.settings.root:
            self.log.warning("config_root_change_ignored", root=self.settings.root, new_root=new.root,
                             hint="restart trainerd to move its root")
            new.root = self.settings.root
        self.settings = new
        if self.attempts is not None:
            self.attempts.settings = new
        self.inbox.settle_s = new.supervisor.settle_s
        self.intake.rescan_s = new.supervisor.rescan_s
        self.base_hold = BaseHold(new.model.path, self.layout, self.log)
        if self.attempts is not None:
            self.attempts.base = self.base_hold.base
        self._guard_stale = True  # rebuilt with the new memory settings before the next attempt
        self.log.info("config_reloaded", config=str(self.config_path))
        self.notifier.ready(status=self._describe_state())

    def _check_pause(self, now: float) -> None:
        paused = self.paused
        if paused == self._paused_seen:
            return
        self._paused_seen = paused
        if paused:
            self.log.info("paused", stop_file=str(self.layout.stop), worker_running=self.running is not None)
        else:
            self.log.info("resumed")
        self.intake.look_soon(now)  # look at the queue again right away

    def _describe_state(self) -> str:
        r = self.running
        if self.stopping:
            return "stopping"
        if r is not None:
            return f"training batch {r.batch.id} ({r.batch.name}), attempt {r.attempt}" + (
                " (pausing)" if self.paused else "")
        if self.paused:
            return "paused (remove .stop to resume)"
        if self.base_hold.held:
            return self.base_hold.describe()
        if self.disk_low:
            return "waiting for free disk space"
        head = self.ledger.next_queued() if self.ledger else None
        if head is not None and head.next_attempt_at > time.time():
            return f"waiting to retry batch {head.id} ({head.name})"
        return "idle, watching the inbox"

    def _write_daemon_state(self) -> None:
        r = self.running
        self.report.publish(self._describe_state(), {
            "paused": self.paused, "stopping": self.stopping, "disk_low": self.disk_low, "base_held": self.base_hold.held,
            "running": None if r is None else {"batch": r.batch.id, "attempt": r.attempt,
                                               "pid": r.child.pid, "started_at": r.started_at},
        }, refreshed={"loop": self.loop_figures})
