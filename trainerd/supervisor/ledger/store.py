"""The ledger's store: the SQLite connection (WAL, ``synchronous=FULL``; read-only for readers), its
transactions, the guarded writes every state change is made of, and the counters.

Every state change is ``UPDATE ... WHERE id=? AND state=?`` (:meth:`Store._transition`,
:meth:`Store._decide`) and raises :class:`LedgerConflict` when the row was not in the state the
caller believed, so a logic error shows up as a loud failure instead of a batch trained twice.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

from trainerd.supervisor.ledger import aggregates, schema
from trainerd.supervisor.ledger.rows import AttemptRecord, Batch
from trainerd.supervisor.ledger.states import BatchState, check_transition

__all__ = ["LedgerConflict", "Store"]


class LedgerConflict(RuntimeError):
    """A guarded update found the row in another state than expected: a bug, say it loudly."""


class Store:
    """The connection and its plumbing; :class:`trainerd.supervisor.ledger.Ledger` adds the records."""

    def __init__(self, path: str | os.PathLike[str], *, on_change: Callable[[Batch], None] | None = None):
        self.path = Path(path)
        # Called with every batch row a write transaction made, once it is committed (the
        # supervisor keeps each batch folder's manifest.json so; see supervisor/recovery.py).
        self.on_change = on_change
        self._changed: dict[int, Batch] | None = None
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            # 1 MiB of page cache (SQLite's default is 2 MiB): the daemon's reads are indexed pages
            # of the live part (the OS caches the file anyway), and the cache is held for weeks.
            self.db.execute("PRAGMA cache_size=-1024")
            schema.upgrade(self.db, self.path, self.transaction)
        except BaseException:
            self.db.close()
            raise
        os.chmod(self.path, 0o640)

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str]) -> "Store":
        """Open without write access. Never creates the file and never blocks the writer."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self.on_change, self._changed = None, None
        if not self.path.exists():
            raise FileNotFoundError(f"no ledger at {self.path}")
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        # With no -wal file the database was checkpointed and closed cleanly: read it as
        # immutable so that a reader running as another user (root) does not create -wal/-shm
        # files the daemon's own user could then not open.
        if not Path(str(self.path) + "-wal").exists():
            uri += "&immutable=1"
        self.db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=2.0)
        self.db.row_factory = sqlite3.Row
        return self

    def close(self) -> None:
        self.db.close()

    def schema_version(self) -> int:
        return schema.version(self.db)

    class _Tx:
        def __init__(self, ledger: "Store"):
            self.ledger, self.db = ledger, ledger.db

        def __enter__(self) -> sqlite3.Connection:
            # IMMEDIATE: take the write lock now, so a transaction never fails half-way with
            # "database is locked" after it has read the state it is about to change.
            self.db.execute("BEGIN IMMEDIATE")
            self.ledger._changed = {}
            return self.db

        def __exit__(self, exc_type, exc, tb) -> None:
            changed, self.ledger._changed = self.ledger._changed, None
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
            if not exc_type and changed and self.ledger.on_change is not None:
                for batch in changed.values():  # committed: now the copies may follow
                    self.ledger.on_change(batch)

    def transaction(self) -> "Store._Tx":
        return Store._Tx(self)

    def _get(self, db: sqlite3.Connection, batch_id: int) -> Batch:
        r = db.execute("SELECT * FROM batches WHERE id=?", (batch_id,)).fetchone()
        if r is None:
            raise KeyError(f"no batch {batch_id}")
        batch = Batch.from_row(r)
        if self._changed is not None:  # inside a write: the row this transaction made
            self._changed[batch_id] = batch
        return batch

    def _transition(self, db: sqlite3.Connection, batch_id: int, from_state: BatchState,
                    to_state: BatchState, now: float, **fields: Any) -> Batch:
        check_transition(from_state, to_state)  # from -> to
        cols = ", ".join(f"{k}=?" for k in fields)
        sql = f"UPDATE batches SET state=?, updated_at=?{', ' + cols if cols else ''} WHERE id=? AND state=?"
        cur = db.execute(sql, (to_state.value, now, *fields.values(), batch_id, from_state.value))
        if cur.rowcount != 1:
            actual = db.execute("SELECT state FROM batches WHERE id=?", (batch_id,)).fetchone()
            raise LedgerConflict(
                f"batch {batch_id}: expected state {from_state.value} for -> {to_state.value}, "
                f"found {actual['state'] if actual else 'no such batch'}")
        return self._get(db, batch_id)

    def _decide(self, db: sqlite3.Connection, batch_id: int, state: BatchState, now: float, **fields: Any) -> Batch:
        cols = ", ".join(f"{k}=?" for k in fields)
        cur = db.execute(f"UPDATE batches SET finished_at=?, updated_at=?, {cols} WHERE id=? AND state=?"
                         " AND finished_at IS NULL", (now, now, *fields.values(), batch_id, state.value))
        if cur.rowcount != 1:
            b = self._get(db, batch_id)
            raise LedgerConflict(f"batch {batch_id}: expected an undecided {state.value} batch, found "
                                 f"{b.state.value}{' (decided)' if b.finished_at is not None else ''}")
        return self._get(db, batch_id)

    def _end_attempt(self, db: sqlite3.Connection, batch_id: int, end: AttemptRecord | None, now: float) -> None:
        if end is None:
            return
        cur = db.execute(
            "UPDATE attempts SET ended_at=?, outcome=?, reason=?, exit_code=?, signal=?, signal_sent_by=?,"
            " result_json=? WHERE batch_id=? AND n=? AND ended_at IS NULL",
            (now, str(end.outcome), end.reason, end.exit_code, end.signal,
             None if end.signal_sent_by is None else str(end.signal_sent_by),
             json.dumps(end.result) if end.result is not None else None, batch_id, end.n))
        if cur.rowcount != 1:
            raise LedgerConflict(f"batch {batch_id} attempt {end.n}: not open")
        if end.result:
            db.execute("UPDATE batches SET last_step=?, total_steps=? WHERE id=?",
                       (end.result.get("step"), end.result.get("total_steps"), batch_id))
        if end.account is not None:
            db.execute("UPDATE attempts SET account_json=? WHERE batch_id=? AND n=?",
                       (json.dumps(end.account), batch_id, end.n))
        if end.batch_goodput is not None:
            db.execute("UPDATE batches SET goodput_json=? WHERE id=?", (json.dumps(end.batch_goodput), batch_id))
        if end.reached_step is not None:
            db.execute("UPDATE batches SET reached_step=max(coalesce(reached_step, 0), ?) WHERE id=?",
                       (end.reached_step, batch_id))

    @staticmethod
    def _upsert(db: sqlite3.Connection, table: str, key: str, row: dict[str, Any]) -> None:
        cols = list(row)
        cur = db.execute(f"UPDATE {table} SET {', '.join(f'{c}=?' for c in cols)} WHERE {key}=?",
                         [*row.values(), row[key]])
        if cur.rowcount == 0:
            db.execute(f"INSERT INTO {table}({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                       list(row.values()))

    def quick_check(self) -> str:
        return "; ".join(str(r[0]) for r in self.db.execute("PRAGMA quick_check").fetchall())

    def counter(self, name: str) -> int:
        r = self.db.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
        return int(r["value"]) if r else 0

    def bump(self, name: str, by: int = 1) -> int:
        with self.transaction() as db:
            db.execute("INSERT INTO counters(name, value) VALUES (?, ?) "
                       "ON CONFLICT(name) DO UPDATE SET value=value+excluded.value", (name, by))
            return int(db.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()[0])

    def set_counter(self, name: str, value: int) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                       (name, int(value)))

    def totals(self, prefix: str = "") -> dict[str, int]:
        """The running totals named ``prefix...`` (trainerd/supervisor/ledger/aggregates.py), the prefix cut off."""
        return aggregates.read(self.db, prefix)
