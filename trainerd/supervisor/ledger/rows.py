"""The ledger's rows as frozen values: what a transition returns, what a reader gets.

Stdlib only. ``trainerd.supervisor.ledger`` (SQLite) makes them; the supervisor, ``trainerd status`` and
the per-batch manifests (``batches/<id>/manifest.json``, the ledger's copy in the folders) use them.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from trainerd.supervisor.ledger.states import BatchState

__all__ = ["AdapterVersion", "Attempt", "AttemptRecord", "Batch", "BatchSummary", "decided_end"]


# --- rows ------------------------------------------------------------------------------


def _from_row(cls: type, row: sqlite3.Row, **convert: Callable[[Any], Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: row[k] for k in row.keys() if k in names}
    for k, fn in convert.items():
        if k in values and values[k] is not None:
            values[k] = fn(values[k])
    return cls(**values)


@dataclass(frozen=True)
class Batch:
    """One claimed file, as the ledger has it."""

    id: int
    name: str
    state: BatchState
    created_at: float
    updated_at: float
    sha256: str | None = None
    size_bytes: int | None = None
    attempts: int = 0
    crashes: int = 0
    memory_stops: int = 0
    micro_batch_size: int | None = None
    grad_accum_steps: int | None = None
    gradient_checkpointing: bool | None = None
    next_attempt_at: float = 0.0
    last_reason: str | None = None
    last_step: int | None = None
    total_steps: int | None = None
    adapter_version: int | None = None
    duplicate_of: int | None = None
    finished_at: float | None = None
    parent_version: int | None = None
    decision: str | None = None       # blessed | ungated | rejected | forced | cancelled
    gate_json: str | None = None
    priority: int = 0                 # its lane: 1 high, 0 normal, -1 low (contract.LANES)
    heals: int = 0                    # healing tries so far (refused for forgetting, trained again)
    faults_survived: int = 0          # crashes of attempts that had made progress (issue 24)
    crash_streak: int = 0             # crashes in a row without getting further: the retry budget
    reached_step: int | None = None   # the furthest step any attempt completed
    goodput_json: str | None = None   # trainerd/supervisor/ledger/goodput.py: useful and wall seconds, seconds lost to faults
    base_weights: str | None = None   # the plan's base-weight layout (trainerd/core/ladder.py)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Batch":
        return _from_row(cls, row, state=BatchState, gradient_checkpointing=bool)

    @property
    def planned(self) -> bool:
        return self.micro_batch_size is not None

    @property
    def crashes_without_progress(self) -> int:
        return self.crashes - self.faults_survived

    @property
    def goodput(self) -> dict[str, Any]:
        return json.loads(self.goodput_json) if self.goodput_json else {}


class BatchSummary(NamedTuple):
    """The columns ``trainerd status`` shows, for every batch: a tuple, not a :class:`Batch`, so a
    root with 10 000 batches is read in milliseconds (a Batch costs ~40 us to build)."""

    id: int
    name: str
    state: BatchState
    attempts: int
    adapter_version: int | None
    last_reason: str | None
    priority: int
    next_attempt_at: float
    micro_batch_size: int | None
    grad_accum_steps: int | None
    finished_at: float | None
    decision: str | None
    heals: int
    crashes: int
    faults_survived: int
    goodput_json: str | None
    gradient_checkpointing: int | None
    base_weights: str | None

    @classmethod
    def columns(cls) -> str:
        return ", ".join(cls._fields)


@dataclass(frozen=True)
class Attempt:
    """One worker start for a batch."""

    batch_id: int
    n: int
    started_at: float
    pid: int | None = None
    pid_started_at: float | None = None
    ended_at: float | None = None
    init_adapter: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    signal_sent_by: str | None = None
    outcome: str | None = None
    reason: str | None = None
    result: dict[str, Any] | None = None
    account: dict[str, Any] | None = None   # trainerd/supervisor/ledger/goodput.py: progress, restart, steps, checkpoints

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Attempt":
        a = _from_row(cls, row)
        raw = row["result_json"]
        acc = row["account_json"] if "account_json" in row.keys() else None
        return dataclasses.replace(a, result=json.loads(raw) if raw else None, account=json.loads(acc) if acc else None)


@dataclass(frozen=True)
class AdapterVersion:
    n: int
    batch_id: int
    path: str
    created_at: float
    parent: int | None = None   # the version its weights were trained from; None: the base model
    kind: str = "blessed"       # blessed (the gate's publish, blessed or ungated: see its batch) | forced | rollback
    source: int | None = None   # rollback: the version it copies
    removed_at: float | None = None  # retention deleted its folder (the row stays: history, numbering)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "AdapterVersion":
        return _from_row(cls, row)


@dataclass(frozen=True)
class AttemptRecord:
    """What the attempts row records when an attempt is over."""

    n: int
    outcome: str
    reason: str | None
    exit_code: int | None = None
    signal: int | None = None
    signal_sent_by: str | None = None
    result: dict[str, Any] | None = None
    account: dict[str, Any] | None = None       # this attempt's (trainerd/supervisor/ledger/goodput.py)
    batch_goodput: dict[str, Any] | None = None  # the batch's totals with it
    reached_step: int | None = None             # the furthest step it completed



def decided_end(batch: Batch) -> BatchState:
    """The final state a decided batch is going to: a reserved version is a publish (or a
    promote), a duplicate a skip, a refused candidate a rejection, an operator's cancel a
    cancellation, anything else a failure."""
    if batch.decision == "cancelled":
        return BatchState.CANCELLED
    if batch.adapter_version is not None:
        return BatchState.DONE
    if batch.duplicate_of is not None:
        return BatchState.SKIPPED
    if batch.decision == "rejected":
        return BatchState.REJECTED
    return BatchState.FAILED
