"""The SQLite ledger (``root/state.db``): the one source of truth for batches, attempts and
adapter versions.

Single writer: the supervisor. Every state change is ``UPDATE ... WHERE id=? AND state=?``
and raises :class:`LedgerConflict` when the row was not in the state the caller believed, so
a logic error shows up as a loud failure instead of a batch trained twice. The transition
table itself lives in :mod:`trainerd.supervisor.ledger.states`. Every transition returns the row as it now is
(a frozen :class:`Batch`): nobody re-reads what they just wrote.

Durability: WAL with ``synchronous=FULL`` (every commit is fsynced before it returns; the
default NORMAL could lose the last commits on power loss, and a claim that is on disk as a
rename but not in the ledger is exactly what reconcile must then guess at). Readers
(``trainerd status``) open the file read-only and never block the writer (WAL).

The tables, their version and the migrations between versions are in :mod:`trainerd.supervisor.ledger.schema`.

This package is the ledger and what its rows mean: states.py (the transition table), rows.py (the
frozen rows), schema.py and aggregates.py (tables, migrations, running totals), goodput.py (the
accounts kept per batch). May import: the standard library (sqlite3) and :mod:`trainerd.core`;
nothing of the daemon's loop (the views and the CLI open it read-only).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

from trainerd.supervisor.ledger import aggregates, schema
from trainerd.supervisor.ledger.rows import AdapterVersion, Attempt, AttemptRecord, Batch, BatchSummary, decided_end
from trainerd.supervisor.ledger.schema import LedgerTooNew
from trainerd.supervisor.ledger.states import FINAL_STATES, BatchState, check_transition

__all__ = ["AdapterVersion", "Attempt", "AttemptRecord", "Batch", "Ledger", "LedgerConflict", "LedgerTooNew",
           "decided_end"]

class LedgerConflict(RuntimeError):
    """A guarded update found the row in another state than expected: a bug, say it loudly."""


class Ledger:
    """Read/write access for the supervisor; :meth:`open_readonly` for everyone else."""

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
    def open_readonly(cls, path: str | os.PathLike[str]) -> "Ledger":
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

    # --- plumbing ------------------------------------------------------------------------

    class _Tx:
        def __init__(self, ledger: "Ledger"):
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

    def transaction(self) -> "Ledger._Tx":
        return Ledger._Tx(self)

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

    # --- queries -------------------------------------------------------------------------

    def batch(self, batch_id: int) -> Batch:
        return self._get(self.db, batch_id)

    def decided(self) -> list[Batch]:
        """Batches whose end was decided but whose files were not all filed (a crash in between)."""
        live = [s.value for s in BatchState if s not in FINAL_STATES]
        # By state (its index): a live batch with an end, or a rejected one being promoted.
        return [Batch.from_row(r) for r in self.db.execute(
            f"SELECT * FROM batches WHERE (state IN ({','.join('?' * len(live))}) AND finished_at IS NOT NULL)"
            " OR (state = ? AND adapter_version IS NOT NULL) ORDER BY id", [*live, BatchState.REJECTED.value])]

    def batches(self, *states: BatchState, limit: int | None = None, newest_first: bool = False) -> list[Batch]:
        sql = "SELECT * FROM batches"
        args: list[Any] = []
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args += [s.value for s in states]
        sql += " ORDER BY id" + (" DESC" if newest_first else "")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [Batch.from_row(r) for r in self.db.execute(sql, args)]

    def summaries(self, *states: BatchState, limit: int | None = None, newest_first: bool = False,
                  after: int = 0, order: str | None = None, decisions: tuple[str, ...] = (),
                  offset: int = 0) -> list[BatchSummary]:
        """Batches (in ``states``; with a ``decision`` in ``decisions``) as the light tuples ``trainerd
        status`` reads: by id, ``after`` an id (keyset pages), or in ``order``: ``queue`` (the order
        they start in: :meth:`next_queued`) or ``finished`` (the newest end first)."""
        make, by_value = BatchSummary._make, {s.value: s for s in BatchState}
        where, args = (["id > ?"], [after]) if after else (["1"], [])  # (no range on id: the planner uses the other indexes)
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += [s.value for s in states]
        if decisions:
            where.append(f"decision IN ({','.join('?' * len(decisions))})")
            args += list(decisions)
        if order == "finished":
            where.append("finished_at IS NOT NULL")
        sql = {"queue": "attempts > 0 DESC, priority DESC, id", "finished": "finished_at DESC"}.get(
            order or "", "id DESC" if newest_first else "id")
        sql = f"SELECT {self._summary_columns()} FROM batches WHERE {' AND '.join(where)} ORDER BY {sql}"
        if limit is not None or offset:
            sql += f" LIMIT {-1 if limit is None else int(limit)} OFFSET {int(offset)}"
        return [make((r[0], r[1], by_value[r[2]], *r[3:])) for r in self.db.execute(sql, args)]

    def _summary_columns(self) -> str:
        """BatchSummary's columns; a reader newer than the daemon writing the ledger (upgraded, not yet
        restarted) reads a column the older schema lacks as its default. Asked once per connection."""
        cols = getattr(self, "_summary_cols", None)
        if cols is None:
            have = {r[1] for r in self.db.execute("PRAGMA table_info(batches)")}
            cols = self._summary_cols = ", ".join(c if c in have else f"0 AS {c}" for c in BatchSummary._fields)
        return cols

    def next_queued(self) -> Batch | None:
        """The head of the queue, whether or not its back-off has expired: a batch that has
        started (any attempt) first — its checkpoints continue a given adapter, so it is never
        overtaken — then the highest priority lane, arrival order (id) within a lane."""
        r = self.db.execute("SELECT * FROM batches WHERE state=? AND finished_at IS NULL"
                            " ORDER BY attempts > 0 DESC, priority DESC, id LIMIT 1",
                            (BatchState.QUEUED.value,)).fetchone()
        return Batch.from_row(r) if r else None

    def find_by_sha(self, sha256: str, states: tuple[BatchState, ...], exclude_id: int) -> Batch | None:
        r = self.db.execute(
            f"SELECT * FROM batches WHERE sha256=? AND id<>? AND state IN ({','.join('?' * len(states))})"
            " ORDER BY id LIMIT 1", (sha256, exclude_id, *[s.value for s in states])).fetchone()
        return Batch.from_row(r) if r else None

    def attempts(self, batch_id: int) -> list[Attempt]:
        return [Attempt.from_row(r) for r in self.db.execute(
            "SELECT * FROM attempts WHERE batch_id=? ORDER BY n", (batch_id,))]

    def attempt(self, batch_id: int, n: int) -> Attempt | None:
        r = self.db.execute("SELECT * FROM attempts WHERE batch_id=? AND n=?", (batch_id, n)).fetchone()
        return Attempt.from_row(r) if r else None

    def attempts_ended_since(self, since: float) -> list[tuple[float, float, str | None, str | None]]:
        """(started_at, ended_at, outcome, reason) of every attempt that ended after ``since``
        (the fault rate's window; indexed, so a long history costs nothing)."""
        return [tuple(r) for r in self.db.execute(
            "SELECT started_at, ended_at, outcome, reason FROM attempts WHERE ended_at >= ?", (since,))]

    def goodput_totals(self) -> dict[str, float]:
        """Every batch's goodput figures summed (trainerd/supervisor/ledger/goodput.py names them), its crashes and the
        crashes it survived: the running totals (trainerd/supervisor/ledger/aggregates.py), one indexed read at any size."""
        try:
            g, f = self.totals("goodput:"), self.totals("faults:")
        except sqlite3.OperationalError:  # a reader on a ledger the daemon has not brought to schema 4 yet
            g, f = {}, {}
        return {**{k: g.get(f"{k}_ms", 0) / 1000.0 for k in aggregates.GOODPUT_FIGURES},
                "crashes": f.get("crashes", 0), "faults_survived": f.get("survived", 0)}

    def open_attempts(self) -> list[Attempt]:
        return [Attempt.from_row(r) for r in self.db.execute(
            "SELECT * FROM attempts WHERE ended_at IS NULL ORDER BY batch_id, n")]

    def adapter_versions(self) -> list[AdapterVersion]:
        return [AdapterVersion.from_row(r) for r in self.db.execute("SELECT * FROM adapter_versions ORDER BY n")]

    def latest_version(self) -> AdapterVersion | None:
        r = self.db.execute("SELECT * FROM adapter_versions ORDER BY n DESC LIMIT 1").fetchone()
        return AdapterVersion.from_row(r) if r else None

    def counter(self, name: str) -> int:
        r = self.db.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
        return int(r["value"]) if r else 0

    def counts(self) -> dict[str, int]:
        """Batches by state (non-zero only): the running totals, one indexed read at any size."""
        try:
            return self.totals("batches:")
        except sqlite3.OperationalError:  # a reader on a ledger the daemon has not brought to schema 4 yet
            return {r["state"]: r["c"] for r in self.db.execute(
                "SELECT state, count(*) AS c FROM batches GROUP BY state")}

    def totals(self, prefix: str = "") -> dict[str, int]:
        """The running totals named ``prefix...`` (trainerd/supervisor/ledger/aggregates.py), the prefix cut off."""
        return aggregates.read(self.db, prefix)

    def batch_progress(self, batch_id: int) -> tuple[int, int]:
        """(tokens, steps): the furthest any recorded attempt of the batch got (its attempts only)."""
        r = self.db.execute("SELECT max(coalesce(json_extract(result_json, '$.tokens'), 0)),"
                            " max(coalesce(json_extract(result_json, '$.step'), 0)) FROM attempts"
                            " WHERE batch_id=? AND json_valid(result_json)", (batch_id,)).fetchone()
        return int(r[0] or 0), int(r[1] or 0)

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

    def unfinished(self) -> list[Batch]:
        """Batches not at their end yet (live, or decided and not filed): the queue's size, not the chain's."""
        live = [s.value for s in BatchState if s not in FINAL_STATES]
        return [Batch.from_row(r) for r in self.db.execute(
            f"SELECT * FROM batches WHERE state IN ({','.join('?' * len(live))}) ORDER BY id", live)]

    def batches_by_id(self, ids: set[int] | list[int]) -> dict[int, Batch]:
        """The rows of these batches (a page's worth: one query)."""
        ids = sorted(set(ids))
        if not ids:
            return {}
        return {r["id"]: Batch.from_row(r) for r in self.db.execute(
            f"SELECT * FROM batches WHERE id IN ({','.join('?' * len(ids))})", ids)}

    def batches_between(self, lo: int, hi: int, *states: BatchState) -> list[Batch]:
        """Batches with ``lo < id < hi`` in ``states``, by id (retention's pages past its mark)."""
        return [Batch.from_row(r) for r in self.db.execute(
            f"SELECT * FROM batches WHERE id > ? AND id < ? AND state IN ({','.join('?' * len(states))}) ORDER BY id",
            (lo, hi, *(s.value for s in states)))]

    def recently_finished(self, limit: int, *states: BatchState, offset: int = 0, oldest_first: bool = False) -> list[Batch]:
        """The ``limit`` batches that ended last (by ``finished_at``; ``states``: only those), after
        skipping the ``offset`` last (``oldest_first``: the first to end, for paging forward)."""
        sql, args = "SELECT * FROM batches WHERE finished_at IS NOT NULL", []
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args = [s.value for s in states]
        return [Batch.from_row(r) for r in self.db.execute(
            sql + f" ORDER BY finished_at {'' if oldest_first else 'DESC'}, id LIMIT {int(limit)} OFFSET {int(offset)}",
            args)]

    # --- writes --------------------------------------------------------------------------

    def bump(self, name: str, by: int = 1) -> int:
        with self.transaction() as db:
            db.execute("INSERT INTO counters(name, value) VALUES (?, ?) "
                       "ON CONFLICT(name) DO UPDATE SET value=value+excluded.value", (name, by))
            return int(db.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()[0])

    def begin_claim(self, name: str, size_bytes: int, now: float, priority: int = 0) -> Batch:
        """Insert a CLAIMING row; committed before the file is touched, so a crash leaves a trace.
        ``priority``: the lane it was dropped in (contract.LANES), which also says where it lies."""
        return self.begin_claims([(name, size_bytes, priority)], now)[0]

    def begin_claims(self, files: list[tuple[str, int, int]], now: float) -> list[Batch]:
        """:meth:`begin_claim` for several ``(name, size_bytes, priority)`` in one commit (one
        fsync for a whole slice of a burst), in that order."""
        with self.transaction() as db:
            ids = [int(db.execute(
                "INSERT INTO batches(name, size_bytes, state, created_at, updated_at, priority) VALUES (?,?,?,?,?,?)",
                (name, size, BatchState.CLAIMING.value, now, now, priority)).lastrowid) for name, size, priority in files]
            return [self._get(db, i) for i in ids]

    def finish_claims(self, hashed: list[tuple[int, str, int]], now: float) -> list[Batch]:
        """:meth:`finish_claim` for several ``(batch_id, sha256, size_bytes)`` in one commit."""
        with self.transaction() as db:
            # CLAIMING -> QUEUED, each
            return [self._transition(db, bid, BatchState.CLAIMING, BatchState.QUEUED, now, sha256=sha, size_bytes=size)
                    for bid, sha, size in hashed]

    def forget_claim(self, batch_id: int) -> None:
        """Drop a CLAIMING row whose file vanished before it was renamed (nothing was taken)."""
        with self.transaction() as db:
            cur = db.execute("DELETE FROM batches WHERE id=? AND state=?", (batch_id, BatchState.CLAIMING.value))
            if cur.rowcount != 1:
                raise LedgerConflict(f"batch {batch_id}: forget_claim needs state claiming")

    def finish_claim(self, batch_id: int, sha256: str, size_bytes: int, now: float) -> Batch:
        return self.finish_claims([(batch_id, sha256, size_bytes)], now)[0]  # CLAIMING -> QUEUED

    def set_plan(self, batch_id: int, micro_batch_size: int, grad_accum_steps: int,
                 gradient_checkpointing: bool, now: float, base_weights: str | None = None) -> Batch:
        """Record the memory rung the next attempt runs with (planning)."""
        with self.transaction() as db:
            db.execute("UPDATE batches SET micro_batch_size=?, grad_accum_steps=?, gradient_checkpointing=?,"
                       " base_weights=?, updated_at=? WHERE id=?",
                       (micro_batch_size, grad_accum_steps, int(gradient_checkpointing), base_weights, now, batch_id))
            return self._get(db, batch_id)

    def start_attempt(self, batch_id: int, now: float, init_adapter: str | None) -> Batch:
        """QUEUED -> RUNNING and a new attempt row (pid still unknown); the attempt number is
        the returned row's ``attempts``."""
        with self.transaction() as db:
            n = self._get(db, batch_id).attempts + 1
            # QUEUED -> RUNNING
            b = self._transition(db, batch_id, BatchState.QUEUED, BatchState.RUNNING, now, attempts=n)
            db.execute("INSERT INTO attempts(batch_id, n, started_at, init_adapter) VALUES (?,?,?,?)",
                       (batch_id, n, now, init_adapter))
            return b

    def set_attempt_pid(self, batch_id: int, n: int, pid: int, pid_started_at: float | None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE attempts SET pid=?, pid_started_at=? WHERE batch_id=? AND n=?",
                       (pid, pid_started_at, batch_id, n))

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

    def requeue(self, batch_id: int, now: float, *, reason: str, next_attempt_at: float = 0.0,
                attempt: AttemptRecord | None = None, **fields: Any) -> Batch:
        """RUNNING -> QUEUED after a stop or a crash with retries left (``fields``: counters, plan),
        closing ``attempt`` in the same transaction."""
        with self.transaction() as db:
            self._end_attempt(db, batch_id, attempt, now)
            # RUNNING -> QUEUED
            return self._transition(db, batch_id, BatchState.RUNNING, BatchState.QUEUED, now,
                                    last_reason=reason, next_attempt_at=next_attempt_at, **fields)

    # --- ends: decide, file, finish ------------------------------------------------------
    # A final state in the ledger means its files are in place: the end is first *decided*
    # (finished_at set, with what filing needs: the version, the duplicate, the reason), then
    # the folders are filed, then the state is *finished*. A crash in between leaves a decided,
    # unfinished batch, which reconcile files and finishes.

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

    def decide_rejected(self, batch_id: int, reason: str, gate_json: str, now: float, *,
                        attempt: AttemptRecord | None = None) -> Batch:
        """A RUNNING batch whose candidate the gate refused: it will be filed as rejected."""
        with self.transaction() as db:
            self._end_attempt(db, batch_id, attempt, now)
            return self._decide(db, batch_id, BatchState.RUNNING, now, last_reason=reason, decision="rejected",
                                gate_json=gate_json, next_attempt_at=0)

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

    # --- recovery: rows put back from the folders' copies (supervisor/recovery.py) ---------

    def restore_batch(self, row: dict[str, Any]) -> Batch:
        """Insert or replace a batch row from its manifest (the same columns as :class:`Batch`)."""
        fields = dataclasses.fields(Batch)
        cols = [f.name for f in fields]
        # A manifest written before a column existed: that column's default (NOT NULL ones too).
        vals = [row.get(f.name, None if f.default is dataclasses.MISSING else f.default) for f in fields]
        vals[cols.index("state")] = BatchState(row["state"]).value
        if row.get("gradient_checkpointing") is not None:
            vals[cols.index("gradient_checkpointing")] = int(bool(row["gradient_checkpointing"]))
        with self.transaction() as db:
            # Update, else insert (not INSERT OR REPLACE: its implicit delete fires no trigger, and
            # the running totals must follow the row).
            self._upsert(db, "batches", "id", dict(zip(cols, vals)))
            return self._get(db, row["id"])

    def restore_version(self, v: AdapterVersion) -> None:
        with self.transaction() as db:
            self._upsert(db, "adapter_versions", "n", dataclasses.asdict(v))

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

    def set_parent(self, batch_id: int, version: int | None, now: float) -> Batch:
        """The batch's champion and init adapter, fixed at its first start."""
        with self.transaction() as db:
            db.execute("UPDATE batches SET parent_version=?, updated_at=? WHERE id=?", (version, now, batch_id))
            return self._get(db, batch_id)

    def decide_skipped(self, batch_id: int, sha256: str, duplicate_of: int, now: float) -> Batch:
        """A CLAIMING batch whose content is already trained or queued: it will be skipped."""
        with self.transaction() as db:
            return self._decide(db, batch_id, BatchState.CLAIMING, now, sha256=sha256, duplicate_of=duplicate_of,
                                last_reason=f"same content as batch {duplicate_of}")

    def decide_cancelled(self, batch_id: int, from_state: BatchState, reason: str, now: float, *,
                         attempt: AttemptRecord | None = None) -> Batch:
        """A QUEUED or RUNNING batch an operator withdraws (`trainerd cancel`): filed as cancelled."""
        with self.transaction() as db:
            self._end_attempt(db, batch_id, attempt, now)
            return self._decide(db, batch_id, from_state, now, last_reason=reason, decision="cancelled",
                                next_attempt_at=0)

    def set_counter(self, name: str, value: int) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                       (name, int(value)))

    def delete_attempts(self, lo: int, hi: int, states: tuple[BatchState, ...], *, mark: str) -> int:
        """Retention of ledger rows: the attempt rows of batches ``lo < id < hi`` in ``states`` go,
        and counter ``mark`` becomes ``hi - 1``, in one transaction. The running totals stay."""
        with self.transaction() as db:
            cur = db.execute(
                f"DELETE FROM attempts WHERE batch_id > ? AND batch_id < ? AND batch_id IN (SELECT id FROM batches"
                f" WHERE id > ? AND id < ? AND state IN ({','.join('?' * len(states))}))",
                (lo, hi, lo, hi, *(s.value for s in states)))
            db.execute("INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                       (mark, hi - 1))
            return cur.rowcount

    def mark_removed(self, versions: list[int], now: float) -> None:
        """Retention is about to delete these versions' folders (recorded first: fsck and history
        then know the folder is gone on purpose; a crash before the delete repeats it)."""
        if not versions:
            return
        with self.transaction() as db:
            db.executemany("UPDATE adapter_versions SET removed_at=? WHERE n=? AND removed_at IS NULL",
                           [(now, n) for n in versions])

    def decide_failed(self, batch_id: int, from_state: BatchState, reason: str, now: float, *,
                      attempt: AttemptRecord | None = None, **fields: Any) -> Batch:
        """A batch that will fail (quarantined to failed/) with ``reason`` (``fields``: counters)."""
        with self.transaction() as db:
            self._end_attempt(db, batch_id, attempt, now)
            return self._decide(db, batch_id, from_state, now, last_reason=reason, **fields)

    def _decide(self, db: sqlite3.Connection, batch_id: int, state: BatchState, now: float, **fields: Any) -> Batch:
        cols = ", ".join(f"{k}=?" for k in fields)
        cur = db.execute(f"UPDATE batches SET finished_at=?, updated_at=?, {cols} WHERE id=? AND state=?"
                         " AND finished_at IS NULL", (now, now, *fields.values(), batch_id, state.value))
        if cur.rowcount != 1:
            b = self._get(db, batch_id)
            raise LedgerConflict(f"batch {batch_id}: expected an undecided {state.value} batch, found "
                                 f"{b.state.value}{' (decided)' if b.finished_at is not None else ''}")
        return self._get(db, batch_id)

    def finish(self, batch: Batch, now: float) -> Batch:
        """The decided end of ``batch`` becomes its state, once its files are filed."""
        if batch.finished_at is None:
            raise LedgerConflict(f"batch {batch.id}: finish() before an end was decided")
        with self.transaction() as db:
            # CLAIMING | QUEUED | RUNNING -> DONE | SKIPPED | FAILED | CANCELLED
            return self._transition(db, batch.id, batch.state, decided_end(batch), now)
