"""The ledger's batch rows, read: one batch, the queue's head, the live part, pages of the finished
ones, the light summaries ``trainerd status`` reads; and a row put back from its folder's copy
(supervisor/recovery.py).
"""

from __future__ import annotations

import dataclasses
import sqlite3
from typing import Any

from trainerd.supervisor.ledger.rows import Batch, BatchSummary
from trainerd.supervisor.ledger.states import FINAL_STATES, BatchState
from trainerd.supervisor.ledger.store import Store

__all__ = ["BatchRows"]


# BatchSummary's columns whose default is NULL, not 0 (a reader on an older ledger).
_NULLABLE_SUMMARY = frozenset({"goodput_json", "gradient_checkpointing", "base_weights"})


class BatchRows(Store):
    """The batches table, read (and restored)."""

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
            cols = self._summary_cols = ", ".join(
                c if c in have else f"{'NULL' if c in _NULLABLE_SUMMARY else 0} AS {c}" for c in BatchSummary._fields)
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

    def counts(self) -> dict[str, int]:
        """Batches by state (non-zero only): the running totals, one indexed read at any size."""
        try:
            return self.totals("batches:")
        except sqlite3.OperationalError:  # a reader on a ledger the daemon has not brought to schema 4 yet
            return {r["state"]: r["c"] for r in self.db.execute(
                "SELECT state, count(*) AS c FROM batches GROUP BY state")}

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
