"""The ledger's attempt rows: one per start of a worker, opened at the start, closed with its end
(the close itself is part of the batch's transition: :meth:`Store._end_attempt`); the fault rate's
window, the goodput totals, and retention of old rows.
"""

from __future__ import annotations

import sqlite3

from trainerd.supervisor.ledger import aggregates
from trainerd.supervisor.ledger.rows import Attempt, Batch
from trainerd.supervisor.ledger.states import BatchState
from trainerd.supervisor.ledger.store import Store

__all__ = ["AttemptRows"]


class AttemptRows(Store):
    """The attempts table: read, opened, and retained."""

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

    def open_attempts(self) -> list[Attempt]:
        return [Attempt.from_row(r) for r in self.db.execute(
            "SELECT * FROM attempts WHERE ended_at IS NULL ORDER BY batch_id, n")]

    def batch_progress(self, batch_id: int) -> tuple[int, int]:
        """(tokens, steps): the furthest any recorded attempt of the batch got (its attempts only)."""
        r = self.db.execute("SELECT max(coalesce(json_extract(result_json, '$.tokens'), 0)),"
                            " max(coalesce(json_extract(result_json, '$.step'), 0)) FROM attempts"
                            " WHERE batch_id=? AND json_valid(result_json)", (batch_id,)).fetchone()
        return int(r[0] or 0), int(r[1] or 0)

    def goodput_totals(self) -> dict[str, float]:
        """Every batch's goodput figures summed (trainerd/supervisor/ledger/goodput.py names them), its crashes and the
        crashes it survived: the running totals (trainerd/supervisor/ledger/aggregates.py), one indexed read at any size."""
        try:
            g, f = self.totals("goodput:"), self.totals("faults:")
        except sqlite3.OperationalError:  # a reader on a ledger the daemon has not brought to schema 4 yet
            g, f = {}, {}
        return {**{k: g.get(f"{k}_ms", 0) / 1000.0 for k in aggregates.GOODPUT_FIGURES},
                "crashes": f.get("crashes", 0), "faults_survived": f.get("survived", 0)}

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
