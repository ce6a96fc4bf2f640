"""Batch states and the transitions between them (stdlib only).

A batch is one file claimed from the inbox. Its life, as the ledger records it::

    inbox file --claim--> CLAIMING --renamed+hashed--> QUEUED --start--> RUNNING --exit 0, blessed--> DONE
                              |                          ^                 |                              ^
                              +--same content done-----> | SKIPPED         +--exit 0, not blessed--> REJECTED
                              |                          |                 |                   (promote) -+
                              +--not a regular file----> FAILED            | exit 75 (paused, memory,
                                                         +-----------------+ shutdown, recycle) or a
                                                                           | crash with retries left
                                                                           +--exit 65/78, too many
                                                                              crashes--> FAILED
    QUEUED | RUNNING --`trainerd cancel` (a running one checkpoints first)--> CANCELLED

A stopped worker (exit 75) is not a state of its own: the batch goes back to QUEUED with the
stop reason in ``last_reason``, exactly as a deliberately stopped rq job is not FAILED.
Every transition site asserts with :func:`check_transition`, which names the current and
the allowed states (supervisord style).
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "ACTIVE_STATES",
    "BatchState",
    "FINAL_STATES",
    "InvalidTransition",
    "TRANSITIONS",
    "check_transition",
]


class BatchState(str, Enum):
    CLAIMING = "claiming"  # ledger row exists, the file may still be in the inbox
    QUEUED = "queued"      # data.jsonl is in batches/<id>/, waiting for a worker
    RUNNING = "running"    # a worker (attempt) is alive for it
    DONE = "done"          # adapter published, original in done/
    FAILED = "failed"      # original in failed/ with <name>.error.json
    SKIPPED = "skipped"    # same content already trained (or in the queue); original in done/
    REJECTED = "rejected"  # trained, but the gate refused the candidate; kept in adapters/rejected/
    CANCELLED = "cancelled"  # withdrawn by `trainerd cancel`; original in done/ with <name>.cancelled.json

    def __str__(self) -> str:
        return self.value


# Final: nothing happens to the batch any more (a rejected one only by an operator's promote).
FINAL_STATES = (BatchState.DONE, BatchState.FAILED, BatchState.SKIPPED, BatchState.REJECTED,
                BatchState.CANCELLED)
# States whose content counts as "already trained or about to be" for duplicate detection.
ACTIVE_STATES = (BatchState.QUEUED, BatchState.RUNNING, BatchState.DONE, BatchState.REJECTED)

TRANSITIONS: dict[BatchState, tuple[BatchState, ...]] = {
    BatchState.CLAIMING: (BatchState.QUEUED, BatchState.SKIPPED, BatchState.FAILED),
    BatchState.QUEUED: (BatchState.RUNNING, BatchState.FAILED, BatchState.CANCELLED),
    BatchState.RUNNING: (BatchState.QUEUED, BatchState.DONE, BatchState.FAILED, BatchState.REJECTED,
                         BatchState.CANCELLED),
    BatchState.REJECTED: (BatchState.DONE,),
    BatchState.DONE: (),
    BatchState.FAILED: (),
    BatchState.SKIPPED: (),
    BatchState.CANCELLED: (),
}


class InvalidTransition(AssertionError):
    """A state change that the table above does not allow: a bug, never an operator error."""


def check_transition(current: BatchState | str, new: BatchState | str) -> None:
    """Raise InvalidTransition naming the current and allowed states unless current -> new is allowed."""
    cur, nxt = BatchState(current), BatchState(new)
    allowed = TRANSITIONS[cur]
    if nxt not in allowed:
        names = ", ".join(s.value for s in allowed) or "none (final state)"
        raise InvalidTransition(f"batch state {cur.value} -> {nxt.value} not allowed; "
                                f"from {cur.value} allowed: {names}")
