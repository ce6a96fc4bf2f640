"""The daemon's rooms, made and wired once the root is locked and the ledger opened (:meth:`open`:
the ledger and its backups, filing, the disk book, attempts, the claim pool, the chain, hooks,
retention, the desk, then the root upgraded and reconciled), and undone in order (:meth:`close`).

A part of :class:`trainerd.supervisor.daemon.Supervisor`, which holds the state it works on.
"""

from __future__ import annotations

import os
import time
from typing import Any

from trainerd.supervisor import recovery
from trainerd.supervisor.attempts import Attempts
from trainerd.supervisor.chain import Chain
from trainerd.supervisor.claimpool import ClaimPool
from trainerd.supervisor.desk import Desk
from trainerd.supervisor.diskbook import DiskBook
from trainerd.supervisor.evalupgrade import upgrade_root
from trainerd.supervisor.filing import Filing
from trainerd.supervisor.hooks import Hooks
from trainerd.supervisor.reconcile import reconcile
from trainerd.supervisor.retention import Retention
from trainerd.supervisor.rootlock import take_root_lock

__all__ = ["Assembly"]


class Assembly:
    """open() and close() of the Supervisor."""

    def open(self, now: float | None = None) -> None:
        """Create the folders, take the root's lock, open the ledger and reconcile."""
        now = time.time() if now is None else now
        self.layout.make()
        self._take_lock()
        self.ledger = recovery.open_ledger(self.layout, self.log)
        self.backups = recovery.Backups(self.ledger, self.layout, self.log,
                                        every_batch=not self.settings.supervisor.ledger_backup_s)
        self.ledger.on_change = self._batch_changed
        self.filing = Filing(self.layout, self.ledger, self.log, settings_of=lambda: self.settings)
        self.book = DiskBook(self.layout, self.ledger, self.log)  # disk use by kind, kept as things are filed
        self.filing.book = self.book
        self.attempts = Attempts(self.layout, self.ledger, self.filing, self.log, settings=self.settings,
                                 guard=self.guard, worker_cmd=self.worker_cmd, env=self.env)
        self.attempts.base = self.base_hold.base
        self.intake.pool = ClaimPool(self.attempts.claims, self.ledger, self.log, self.wakeup.poke,
                                     manifest=self.backups.changed)
        self.chain = Chain(self.layout, self.ledger, self.attempts, self.log)
        # Issue 14: publish hooks (children the loop polls), retention and disk use (a child between
        # workers), and the desk that serves cancel and gc requests besides the chain's.
        self.hooks = Hooks(self.layout, self.log, settings_of=lambda: self.settings, bump=self.ledger.bump,
                           env=self.env)
        self.retention = Retention(self.layout, self.ledger, self.log, settings_of=lambda: self.settings, env=self.env,
                                   book=self.book)
        self.desk = Desk(self.layout, self.ledger, self.attempts, self.chain, self.log, retention=self.retention)
        self.guard_thread.start()
        self.log.info("supervisor_starting", root=str(self.layout.root), pid=os.getpid(),
                      worker_cmd=" ".join(self.worker_cmd))
        upgrade_root(self.layout, self.ledger, self.settings, self.log, self.notifier)  # issue 17: the memory
        reconcile(self.layout, self.ledger, self.attempts, self.chain, self.log, now,
                  stop_grace_s=self.settings.supervisor.stop_grace_s, notifier=self.notifier)

    def _batch_changed(self, batch: Any) -> None:
        """The ledger committed a change of ``batch``: its folder's manifest (recovery.py), after
        any manifest of its claim still being written on the claim pool's threads."""
        if self.intake.pool is not None:
            self.intake.pool.wait_manifest(batch.id)
        if self.backups is not None:
            self.backups.changed(batch)

    def close(self) -> None:
        for side in (self.hooks, self.retention):  # issue 14: a running hook / remover ends here
            if side is not None:
                side.close()
        self.inbox.stop_watching()
        self.guard_thread.stop()
        if self.intake.pool is not None:
            self.intake.pool.close()  # before the ledger and the wakeup pipe its threads report to
        if self.ledger is not None:
            if self.backups is not None:
                self.backups.final()  # a copy at a clean stop (periodic otherwise: it costs the ledger's size)
            self.ledger.close()
            self.ledger = None
        if self._lock_fd is not None:
            try:
                os.unlink(self.layout.daemon)
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        self.wakeup.close()

    def _take_lock(self) -> None:
        self._lock_fd = take_root_lock(self.layout)
