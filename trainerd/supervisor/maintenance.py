"""Work on the root that must not run beside a worker, nor in the daemon's loop: a child process.

Today one task: compacting the replay store once it is past ``replay.max_bytes`` (trainerd/
replay.py; a worker's first pass reads the store, so never both at once). The daemon asks
:meth:`Maintenance.busy` before it starts a worker; while the child runs, no worker starts.
A failed run is retried after ``retry.backoff_max_s``.
"""

from __future__ import annotations

import sys
from typing import Any

from trainerd.supervisor.child import Child
from trainerd.core.contract import RootLayout
from trainerd.core.replay import Store

__all__ = ["Maintenance"]


class Maintenance:
    def __init__(self, layout: RootLayout, log: Any, env: dict[str, str] | None):
        self.layout, self.log, self.env = layout, log, env
        self.child: Child | None = None
        self._blocked_until = 0.0

    def busy(self, now: float, settings: Any) -> bool:
        """True while a maintenance child runs (started now if one is due)."""
        if self.child is not None:
            st = self.child.poll()
            if st is None:
                return True
            self.child = None
            if st.code != 0:
                self._blocked_until = now + settings.retry.backoff_max_s
            (self.log.info if st.code == 0 else self.log.error)(
                "replay_compaction_ended", exit=st.describe(),
                retry_in_s=None if st.code == 0 else settings.retry.backoff_max_s)
            return False
        max_bytes = settings.replay.max_bytes
        if now < self._blocked_until or not Store.open(self.layout.replay).over(max_bytes):
            return False
        argv = [sys.executable, "-m", "trainerd.core.replay", "compact", str(self.layout.root), str(max_bytes)]
        self.child = Child(argv, stderr_path=self.layout.logs / "maintenance.stderr",
                           log=self.log.bind(task="replay_compaction"), env=self.env, cwd=self.layout.root)
        self.log.info("replay_compaction_started", max_bytes=max_bytes, pid=self.child.pid)
        return True

    def stop(self) -> None:
        """At shutdown: each of its steps is atomic, so it is safe to cut anywhere."""
        if self.child is not None:
            self.child.kill_group()
            self.child.wait(5.0)
            self.child = None
