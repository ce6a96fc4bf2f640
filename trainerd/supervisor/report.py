"""What the daemon says about itself: systemd's STATUS= and WATCHDOG=1, and ``daemon.json``
(for ``trainerd status``), rewritten when the state text changes, and every
:data:`REFRESH_S` at most when figures that move on their own (the loop's health) changed."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from trainerd.core.contract import RootLayout
from trainerd.core.fsutil import atomic_write_json
from trainerd.supervisor.sdnotify import Notifier
from trainerd.supervisor.intake import guarded

__all__ = ["REFRESH_S", "StateReport"]

REFRESH_S = 10.0


class StateReport:
    def __init__(self, layout: RootLayout, notifier: Notifier, log: Any):
        self.layout, self.notifier, self.log = layout, notifier, log
        self.next_ping: float | None = None
        self._text = ""
        self._refreshed_at = -REFRESH_S
        self._refreshed: dict[str, Any] = {}

    def publish(self, text: str, fields: dict[str, Any],
                refreshed: dict[str, Callable[[], Any]] | None = None) -> None:
        """STATUS= to systemd and daemon.json, when ``text`` changed since the last call; the
        ``refreshed`` fields (computed only when looked at) also every REFRESH_S if they changed."""
        mono = time.monotonic()
        changed = text != self._text
        if not changed and (not refreshed or mono - self._refreshed_at < REFRESH_S):
            return
        self._refreshed_at = mono
        extra = {k: fn() for k, fn in (refreshed or {}).items()}
        if not changed and extra == self._refreshed:
            return
        self._refreshed = extra
        if changed:
            self._text = text
            self.notifier.status(text)
        # Not fsynced: a status hint, rewritten on every change; losing it on power loss is fine.
        guarded(self.log, "daemon_state_unwritable", lambda: atomic_write_json(self.layout.daemon, {
            "pid": os.getpid(), "state": text, "updated_at": time.time(), **fields, **extra}, durable=False))

    def ping(self, now: float, watchdog_ping_s: float) -> None:
        """WATCHDOG=1 from the main loop, never from a training step: every ``watchdog_ping_s``,
        and at least twice per systemd's WatchdogSec."""
        interval = watchdog_ping_s or None
        wd = self.notifier.watchdog_interval_s()
        if wd:
            interval = min(interval or wd / 2, wd / 2)
        if not interval:
            self.next_ping = None
            return
        if self.next_ping is None or now >= self.next_ping:
            self.notifier.watchdog()
            self.next_ping = now + interval
