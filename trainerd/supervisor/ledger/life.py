"""A batch's life in the ledger: claimed (CLAIMING -> QUEUED), planned, requeued, and its end.

A final state in the ledger means its files are in place: the end is first *decided*
(finished_at set, with what filing needs: the version, the duplicate, the reason), then
the folders are filed, then the state is *finished*. A crash in between leaves a decided,
unfinished batch, which reconcile files and finishes. (A published end, :meth:`decide_done`,
reserves a version: versions.py.)
"""

from __future__ import annotations

from typing import Any

from trainerd.supervisor.ledger.rows import AttemptRecord, Batch, decided_end
from trainerd.supervisor.ledger.states import BatchState
from trainerd.supervisor.ledger.store import LedgerConflict, Store

__all__ = ["BatchLife"]


class BatchLife(Store):
    """The transitions of a batch: claim, plan, requeue, decide, finish."""

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

    def set_parent(self, batch_id: int, version: int | None, now: float) -> Batch:
        """The batch's champion and init adapter, fixed at its first start."""
        with self.transaction() as db:
            db.execute("UPDATE batches SET parent_version=?, updated_at=? WHERE id=?", (version, now, batch_id))
            return self._get(db, batch_id)

    def requeue(self, batch_id: int, now: float, *, reason: str, next_attempt_at: float = 0.0,
                attempt: AttemptRecord | None = None, **fields: Any) -> Batch:
        """RUNNING -> QUEUED after a stop or a crash with retries left (``fields``: counters, plan),
        closing ``attempt`` in the same transaction."""
        with self.transaction() as db:
            self._end_attempt(db, batch_id, attempt, now)
            # RUNNING -> QUEUED
            return self._transition(db, batch_id, BatchState.RUNNING, BatchState.QUEUED, now,
                                    last_reason=reason, next_attempt_at=next_attempt_at, **fields)

    def decide_rejected(self, batch_id: int, reason: str, gate_json: str, now: float, *,
                        attempt: AttemptRecord | None = None) -> Batch:
        """A RUNNING batch whose candidate the gate refused: it will be filed as rejected."""
        with self.transaction() as db:
            self._end_attempt(db, batch_id, attempt, now)
            return self._decide(db, batch_id, BatchState.RUNNING, now, last_reason=reason, decision="rejected",
                                gate_json=gate_json, next_attempt_at=0)

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

    def decide_failed(self, batch_id: int, from_state: BatchState, reason: str, now: float, *,
                      attempt: AttemptRecord | None = None, **fields: Any) -> Batch:
        """A batch that will fail (quarantined to failed/) with ``reason`` (``fields``: counters)."""
        with self.transaction() as db:
            self._end_attempt(db, batch_id, attempt, now)
            return self._decide(db, batch_id, from_state, now, last_reason=reason, **fields)

    def finish(self, batch: Batch, now: float) -> Batch:
        """The decided end of ``batch`` becomes its state, once its files are filed."""
        if batch.finished_at is None:
            raise LedgerConflict(f"batch {batch.id}: finish() before an end was decided")
        with self.transaction() as db:
            # CLAIMING | QUEUED | RUNNING -> DONE | SKIPPED | FAILED | CANCELLED
            return self._transition(db, batch.id, batch.state, decided_end(batch), now)
