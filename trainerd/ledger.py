"""The SQLite ledger (``root/state.db``): the one source of truth for batches, attempts and
adapter versions.

Single writer: the supervisor. Every state change is ``UPDATE ... WHERE id=? AND state=?``
and raises :class:`LedgerConflict` when the row was not in the state the caller believed, so
a logic error shows up as a loud failure instead of a batch trained twice. The transition
table itself lives in :mod:`trainerd.states`.

Durability: WAL with ``synchronous=FULL`` (every commit is fsynced before it returns; the
default NORMAL could lose the last commits on power loss, and a claim that is on disk as a
rename but not in the ledger is exactly what reconcile must then guess at). Readers
(``trainerd status``) open the file read-only and never block the writer (WAL).
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

from trainerd.states import BatchState, check_transition

__all__ = ["Layout", "Ledger", "LedgerConflict", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id                     INTEGER PRIMARY KEY AUTOINCREMENT,
    name                   TEXT NOT NULL,          -- original file name in the inbox
    sha256                 TEXT,                   -- NULL until the claim hashed it
    size_bytes             INTEGER,
    state                  TEXT NOT NULL,
    attempts               INTEGER NOT NULL DEFAULT 0,  -- every worker start
    crashes                INTEGER NOT NULL DEFAULT 0,  -- attempts that crashed (retry budget)
    memory_stops           INTEGER NOT NULL DEFAULT 0,
    micro_batch_size       INTEGER,                -- NULL = the config's value
    grad_accum_steps       INTEGER,
    gradient_checkpointing INTEGER,
    next_attempt_at        REAL NOT NULL DEFAULT 0,
    last_reason            TEXT,
    last_step              INTEGER,
    total_steps            INTEGER,
    adapter_version        INTEGER,                -- the version this batch published
    duplicate_of           INTEGER,
    created_at             REAL NOT NULL,
    updated_at             REAL NOT NULL,
    finished_at            REAL
);
CREATE INDEX IF NOT EXISTS batches_state ON batches(state, id);
CREATE INDEX IF NOT EXISTS batches_sha ON batches(sha256);
CREATE TABLE IF NOT EXISTS attempts (
    batch_id        INTEGER NOT NULL REFERENCES batches(id),
    n               INTEGER NOT NULL,
    pid             INTEGER,
    pid_started_at  REAL,            -- psutil create_time: tells our worker from a reused pid
    started_at      REAL NOT NULL,
    ended_at        REAL,
    init_adapter    TEXT,
    exit_code       INTEGER,
    signal          INTEGER,
    signal_sent_by  TEXT,            -- who sent a fatal signal: supervisor, guard, NULL = nobody we know
    outcome         TEXT,            -- done | stopped | bad_data | bad_config | crashed | lost
    reason          TEXT,
    result_json     TEXT,
    PRIMARY KEY (batch_id, n)
);
CREATE TABLE IF NOT EXISTS adapter_versions (
    n           INTEGER PRIMARY KEY,
    batch_id    INTEGER NOT NULL REFERENCES batches(id),
    path        TEXT NOT NULL,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name   TEXT PRIMARY KEY,
    value  INTEGER NOT NULL
);
"""


class LedgerConflict(RuntimeError):
    """A guarded update found the row in another state than expected: a bug, say it loudly."""


def _row(r: sqlite3.Row | None) -> dict[str, Any] | None:
    return dict(r) if r is not None else None


class Ledger:
    """Read/write access for the supervisor; :meth:`open_readonly` for everyone else."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.readonly = False
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        with self.transaction():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self.db.execute(stmt)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        os.chmod(self.path, 0o640)

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str]) -> "Ledger":
        """Open without write access. Never creates the file and never blocks the writer."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self.readonly = True
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

    # --- plumbing ------------------------------------------------------------------------

    class _Tx:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            # IMMEDIATE: take the write lock now, so a transaction never fails half-way with
            # "database is locked" after it has read the state it is about to change.
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb) -> None:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def transaction(self) -> "Ledger._Tx":
        return Ledger._Tx(self.db)

    def _transition(self, db: sqlite3.Connection, batch_id: int, from_state: BatchState,
                    to_state: BatchState, now: float, **fields: Any) -> None:
        check_transition(from_state, to_state)  # from -> to
        cols = ", ".join(f"{k}=?" for k in fields)
        sql = f"UPDATE batches SET state=?, updated_at=?{', ' + cols if cols else ''} WHERE id=? AND state=?"
        cur = db.execute(sql, (to_state.value, now, *fields.values(), batch_id, from_state.value))
        if cur.rowcount != 1:
            actual = db.execute("SELECT state FROM batches WHERE id=?", (batch_id,)).fetchone()
            raise LedgerConflict(
                f"batch {batch_id}: expected state {from_state.value} for -> {to_state.value}, "
                f"found {actual['state'] if actual else 'no such batch'}")

    # --- queries -------------------------------------------------------------------------

    def batch(self, batch_id: int) -> dict[str, Any]:
        r = _row(self.db.execute("SELECT * FROM batches WHERE id=?", (batch_id,)).fetchone())
        if r is None:
            raise KeyError(f"no batch {batch_id}")
        return r

    def batches(self, *states: BatchState, limit: int | None = None, newest_first: bool = False
                ) -> list[dict[str, Any]]:
        sql = "SELECT * FROM batches"
        args: list[Any] = []
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args += [s.value for s in states]
        sql += " ORDER BY id" + (" DESC" if newest_first else "")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [dict(r) for r in self.db.execute(sql, args)]

    def next_queued(self) -> dict[str, Any] | None:
        """The head of the FIFO queue (lowest id), whether or not its back-off has expired."""
        return _row(self.db.execute(
            "SELECT * FROM batches WHERE state=? ORDER BY id LIMIT 1", (BatchState.QUEUED.value,)
        ).fetchone())

    def find_by_sha(self, sha256: str, states: tuple[BatchState, ...], exclude_id: int
                    ) -> dict[str, Any] | None:
        return _row(self.db.execute(
            f"SELECT * FROM batches WHERE sha256=? AND id<>? AND state IN ({','.join('?' * len(states))})"
            " ORDER BY id LIMIT 1", (sha256, exclude_id, *[s.value for s in states])).fetchone())

    def attempts(self, batch_id: int) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute(
            "SELECT * FROM attempts WHERE batch_id=? ORDER BY n", (batch_id,))]

    def open_attempts(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute(
            "SELECT * FROM attempts WHERE ended_at IS NULL ORDER BY batch_id, n")]

    def adapter_versions(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute("SELECT * FROM adapter_versions ORDER BY n")]

    def latest_version(self) -> dict[str, Any] | None:
        return _row(self.db.execute("SELECT * FROM adapter_versions ORDER BY n DESC LIMIT 1").fetchone())

    def counter(self, name: str) -> int:
        r = self.db.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
        return int(r["value"]) if r else 0

    def counts(self) -> dict[str, int]:
        return {r["state"]: r["c"] for r in self.db.execute(
            "SELECT state, count(*) AS c FROM batches GROUP BY state")}

    # --- writes --------------------------------------------------------------------------

    def bump(self, name: str, by: int = 1) -> int:
        with self.transaction() as db:
            db.execute("INSERT INTO counters(name, value) VALUES (?, ?) "
                       "ON CONFLICT(name) DO UPDATE SET value=value+excluded.value", (name, by))
            return int(db.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()[0])

    def begin_claim(self, name: str, size_bytes: int, now: float) -> int:
        """Insert a CLAIMING row; committed before the file is touched, so a crash leaves a trace."""
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO batches(name, size_bytes, state, created_at, updated_at) VALUES (?,?,?,?,?)",
                (name, size_bytes, BatchState.CLAIMING.value, now, now))
            return int(cur.lastrowid)

    def forget_claim(self, batch_id: int) -> None:
        """Drop a CLAIMING row whose file vanished before it was renamed (nothing was taken)."""
        with self.transaction() as db:
            cur = db.execute("DELETE FROM batches WHERE id=? AND state=?", (batch_id, BatchState.CLAIMING.value))
            if cur.rowcount != 1:
                raise LedgerConflict(f"batch {batch_id}: forget_claim needs state claiming")

    def finish_claim(self, batch_id: int, sha256: str, size_bytes: int, now: float) -> None:
        with self.transaction() as db:
            # CLAIMING -> QUEUED
            self._transition(db, batch_id, BatchState.CLAIMING, BatchState.QUEUED, now,
                             sha256=sha256, size_bytes=size_bytes)

    def skip_duplicate(self, batch_id: int, sha256: str, duplicate_of: int, now: float) -> None:
        with self.transaction() as db:
            # CLAIMING -> SKIPPED
            self._transition(db, batch_id, BatchState.CLAIMING, BatchState.SKIPPED, now, sha256=sha256,
                             duplicate_of=duplicate_of, finished_at=now,
                             last_reason=f"same content as batch {duplicate_of}")

    def fail(self, batch_id: int, from_state: BatchState, reason: str, now: float) -> None:
        with self.transaction() as db:
            # CLAIMING | QUEUED | RUNNING -> FAILED
            self._transition(db, batch_id, from_state, BatchState.FAILED, now, last_reason=reason,
                             finished_at=now)

    def set_plan(self, batch_id: int, micro_batch_size: int, grad_accum_steps: int,
                 gradient_checkpointing: bool, now: float) -> None:
        """Record the micro-batch settings the next attempt runs with (planning and back-off)."""
        with self.transaction() as db:
            db.execute("UPDATE batches SET micro_batch_size=?, grad_accum_steps=?, gradient_checkpointing=?,"
                       " updated_at=? WHERE id=?",
                       (micro_batch_size, grad_accum_steps, int(gradient_checkpointing), now, batch_id))

    def start_attempt(self, batch_id: int, now: float, init_adapter: str | None) -> int:
        """QUEUED -> RUNNING and a new attempt row (pid still unknown); returns the attempt number."""
        with self.transaction() as db:
            n = int(db.execute("SELECT attempts FROM batches WHERE id=?", (batch_id,)).fetchone()[0]) + 1
            # QUEUED -> RUNNING
            self._transition(db, batch_id, BatchState.QUEUED, BatchState.RUNNING, now, attempts=n)
            db.execute("INSERT INTO attempts(batch_id, n, started_at, init_adapter) VALUES (?,?,?,?)",
                       (batch_id, n, now, init_adapter))
            return n

    def set_attempt_pid(self, batch_id: int, n: int, pid: int, pid_started_at: float | None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE attempts SET pid=?, pid_started_at=? WHERE batch_id=? AND n=?",
                       (pid, pid_started_at, batch_id, n))

    def end_attempt(self, batch_id: int, n: int, now: float, *, outcome: str, reason: str | None,
                    exit_code: int | None = None, signal: int | None = None,
                    signal_sent_by: str | None = None, result: dict[str, Any] | None = None) -> None:
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE attempts SET ended_at=?, outcome=?, reason=?, exit_code=?, signal=?, signal_sent_by=?,"
                " result_json=? WHERE batch_id=? AND n=? AND ended_at IS NULL",
                (now, outcome, reason, exit_code, signal, signal_sent_by,
                 json.dumps(result) if result is not None else None, batch_id, n))
            if cur.rowcount != 1:
                raise LedgerConflict(f"batch {batch_id} attempt {n}: not open")

    def requeue(self, batch_id: int, now: float, *, reason: str, next_attempt_at: float = 0.0,
                **fields: Any) -> None:
        """RUNNING -> QUEUED after a stop or a crash with retries left (``fields``: counters, plan)."""
        with self.transaction() as db:
            # RUNNING -> QUEUED
            self._transition(db, batch_id, BatchState.RUNNING, BatchState.QUEUED, now,
                             last_reason=reason, next_attempt_at=next_attempt_at, **fields)

    def update_progress(self, batch_id: int, step: int | None, total_steps: int | None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE batches SET last_step=?, total_steps=? WHERE id=?", (step, total_steps, batch_id))

    def finish_done(self, batch_id: int, path_for: Any, now: float) -> int:
        """RUNNING -> DONE and the next adapter version, in one transaction; returns the version.

        ``path_for(n)`` gives the folder version ``n`` will live in. The folder is renamed
        into place *after* this commits; reconcile rolls a missing folder forward.
        """
        with self.transaction() as db:
            n = int(db.execute("SELECT coalesce(max(n), 0) FROM adapter_versions").fetchone()[0]) + 1
            db.execute("INSERT INTO adapter_versions(n, batch_id, path, created_at) VALUES (?,?,?,?)",
                       (n, batch_id, str(path_for(n)), now))
            # RUNNING -> DONE
            self._transition(db, batch_id, BatchState.RUNNING, BatchState.DONE, now, adapter_version=n,
                             finished_at=now, last_reason="done", next_attempt_at=0)
            return n

    def iter_all(self) -> Iterator[dict[str, Any]]:
        for r in self.db.execute("SELECT * FROM batches ORDER BY id"):
            yield dict(r)




class Layout:
    """The paths under ``root`` (docs/architecture.md); the ledger describes what is in them."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.inbox = self.root / "inbox"
        self.batches = self.root / "batches"
        self.adapters = self.root / "adapters"
        self.current = self.adapters / "current"
        self.done = self.root / "done"
        self.failed = self.root / "failed"
        self.logs = self.root / "logs"
        self.log_file = self.logs / "trainerd.jsonl"
        self.db = self.root / "state.db"
        self.stop = self.root / ".stop"
        self.lock = self.root / "trainerd.pid"  # flock held by the running supervisor; holds its pid
        self.daemon = self.root / "daemon.json"  # what the supervisor is doing now (for status)

    def batch_dir(self, batch_id: int) -> Path:
        return self.batches / f"{batch_id:06d}"

    def adapter_dir(self, n: int) -> Path:
        return self.adapters / str(n)

    def make(self) -> None:
        for d in (self.root, self.batches, self.adapters, self.done, self.failed, self.logs):
            d.mkdir(mode=0o750, parents=True, exist_ok=True)
        # The inbox is where operators (group members, not the daemon's user) drop files: group
        # writable, and setgid so what they drop stays in the daemon's group. Set explicitly:
        # mkdir's mode is filtered by the daemon's umask 027. Nothing else is group-writable.
        # Under the hardened unit (RestrictSUIDSGID=yes) setting setgid fails with EPERM; there
        # scripts/install-service creates the inbox 2770 beforehand, as root.
        if not self.inbox.is_dir():
            self.inbox.mkdir(mode=0o750, parents=True, exist_ok=True)
            try:
                os.chmod(self.inbox, 0o2770)
            except PermissionError:
                os.chmod(self.inbox, 0o770)
