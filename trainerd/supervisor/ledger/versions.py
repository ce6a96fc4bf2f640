"""The ledger's adapter versions: the numbered chain, each version reserved in the same transaction
as the decision that publishes it (blessed, forced by promote, a rollback copy), marked when
retention removes its folder, and restored from its folder's copy.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path
from typing import Callable

from trainerd.supervisor.ledger.rows import AdapterVersion, AttemptRecord, Batch
from trainerd.supervisor.ledger.states import BatchState
from trainerd.supervisor.ledger.store import LedgerConflict, Store

__all__ = ["VersionRows"]


class VersionRows(Store):
    """The adapter_versions table."""

    def adapter_versions(self) -> list[AdapterVersion]:
        return [AdapterVersion.from_row(r) for r in self.db.execute("SELECT * FROM adapter_versions ORDER BY n")]

    def latest_version(self) -> AdapterVersion | None:
        r = self.db.execute("SELECT * FROM adapter_versions ORDER BY n DESC LIMIT 1").fetchone()
        return AdapterVersion.from_row(r) if r else None

    def version(self, n: int | None) -> AdapterVersion | None:
        r = None if n is None else self.db.execute("SELECT * FROM adapter_versions WHERE n=?", (n,)).fetchone()
        return AdapterVersion.from_row(r) if r else None

    def versions(self, *, limit: int | None = None, newest_first: bool = False, kept: bool = False,
                 before: int | None = None, after: int = 0) -> list[AdapterVersion]:
        """Versions by number (``kept``: only those whose folder retention has not removed;
        ``before`` / ``after``: numbers below / above it, for paging)."""
        sql, args = "SELECT * FROM adapter_versions WHERE n > ?", [after]
        if kept:
            sql += " AND removed_at IS NULL"
        if before is not None:
            sql, args = sql + " AND n < ?", [*args, before]
        sql += " ORDER BY n" + (" DESC" if newest_first else "") + ("" if limit is None else f" LIMIT {int(limit)}")
        return [AdapterVersion.from_row(r) for r in self.db.execute(sql, args)]

    def decide_done(self, batch_id: int, path_for: Callable[[int], Path], now: float, *,
                    attempt: AttemptRecord | None = None, decision: str = "blessed",
                    gate_json: str | None = None, reason: str = "done") -> Batch:
        """Reserve the next adapter version for a RUNNING batch (its ``adapter_version``).

        ``path_for(version)`` gives the folder the version will live in.
        """
        with self.transaction() as db:
            self._end_attempt(db, batch_id, attempt, now)
            b = self._get(db, batch_id)
            version = self._reserve(db, batch_id, b.parent_version, "blessed", path_for, now)
            return self._decide(db, batch_id, BatchState.RUNNING, now, adapter_version=version,
                                last_reason=reason, next_attempt_at=0, decision=decision, gate_json=gate_json)

    def decide_promote(self, batch_id: int, path_for: Callable[[int], Path], now: float) -> Batch:
        """An operator publishes a rejected candidate anyway: the next version, kind ``forced``."""
        with self.transaction() as db:
            b = self._get(db, batch_id)
            if b.state is not BatchState.REJECTED or b.adapter_version is not None:
                raise LedgerConflict(f"batch {batch_id}: only a rejected batch can be promoted (it is {b.state.value})")
            version = self._reserve(db, batch_id, b.parent_version, "forced", path_for, now)
            db.execute("UPDATE batches SET adapter_version=?, decision='forced', updated_at=? WHERE id=?",
                       (version, now, batch_id))
            return self._get(db, batch_id)

    def add_rollback(self, source: int, path_for: Callable[[int], Path], now: float) -> AdapterVersion:
        """The next version as a copy of version ``source`` (kind ``rollback``)."""
        with self.transaction() as db:
            src = db.execute("SELECT * FROM adapter_versions WHERE n=?", (source,)).fetchone()
            if src is None:
                raise LedgerConflict(f"no adapter version {source}")
            src = AdapterVersion.from_row(src)
            # Its weights are version ``source``'s: that is its parent in the chain back to the base.
            version = self._reserve(db, src.batch_id, source, "rollback", path_for, now, source=source)
            return AdapterVersion.from_row(db.execute("SELECT * FROM adapter_versions WHERE n=?", (version,)).fetchone())

    @staticmethod
    def _reserve(db: sqlite3.Connection, batch_id: int, parent: int | None, kind: str,
                 path_for: Callable[[int], Path], now: float, source: int | None = None) -> int:
        version = int(db.execute("SELECT coalesce(max(n), 0) FROM adapter_versions").fetchone()[0]) + 1
        db.execute("INSERT INTO adapter_versions(n, batch_id, path, created_at, parent, kind, source)"
                   " VALUES (?,?,?,?,?,?,?)", (version, batch_id, str(path_for(version)), now, parent, kind, source))
        return version

    def mark_removed(self, versions: list[int], now: float) -> None:
        """Retention is about to delete these versions' folders (recorded first: fsck and history
        then know the folder is gone on purpose; a crash before the delete repeats it)."""
        if not versions:
            return
        with self.transaction() as db:
            db.executemany("UPDATE adapter_versions SET removed_at=? WHERE n=? AND removed_at IS NULL",
                           [(now, n) for n in versions])

    def restore_version(self, v: AdapterVersion) -> None:
        with self.transaction() as db:
            self._upsert(db, "adapter_versions", "n", dataclasses.asdict(v))
