"""Restart recovery: make the ledger and the folders agree again, whatever instant the last
life of the supervisor died at, and stop any worker it left behind.

Runs once at start-up, before READY and before the first scan:

- a worker of the previous life is still checkpointing (it read EOF on its lifeline): let it
  finish within the stop grace, then SIGKILL its whole group (leftovers.py);
- CLAIMING: finish the claim (the rename and the hash are idempotent);
- RUNNING: the worker's result.json, if it wrote one, is its last word and is settled as if we
  had watched it exit; otherwise the attempt is ``lost`` and the batch requeued (it resumes
  from its newest checkpoint);
- an end that was decided but not finished (finished_at set, state not final yet): file it
  (adapter visible, ``current`` switched, original moved — every step idempotent), then
  finish the state. A final state in the ledger always means its files are in place.

All of it looks at the live part of the ledger only (the unfinished batches, the newest finished
ones and versions): a start costs the same after ten batches or ten thousand. ``trainerd fsck``
compares the whole.
"""

from __future__ import annotations

import os
from typing import Any

from trainerd.supervisor.child import ExitStatus
from trainerd.core.contract import Outcome, RootLayout, StopReason
from trainerd.core.fsutil import read_json_or_none
from trainerd.supervisor.ledger import AttemptRecord, Ledger, decided_end
from trainerd.supervisor.ledger.states import FINAL_STATES, BatchState
from trainerd.supervisor import accounting
from trainerd.supervisor.attempts import Attempts
from trainerd.supervisor.leftovers import stop_leftover_workers
from trainerd.supervisor.policy import AttemptEnd

__all__ = ["reconcile"]

LIVE_FINAL = 8  # the newest final batches (and versions) whose filing a start checks again


def reconcile(layout: RootLayout, ledger: Ledger, attempts: Attempts, chain: Any, log: Any, now: float, *,
              stop_grace_s: float, notifier: Any) -> None:
    """Make the ledger and the folders agree; see the module docstring for what each state gets."""
    stop_leftover_workers(layout, log, stop_grace_s, notifier)
    for b in ledger.decided():
        # Its end was decided, then the supervisor died before the files were all filed.
        log.warning("batch_end_resumed", batch=b.id, file=b.name, state=b.state.value, to=decided_end(b).value)
        attempts.end(b, now)
    for b in ledger.batches(BatchState.CLAIMING):
        log.warning("claim_resumed", batch=b.id, file=b.name)
        attempts.complete_claim(b, now)
    open_attempts = {a.batch_id: a for a in ledger.open_attempts()}
    for b in ledger.batches(BatchState.RUNNING):
        a = open_attempts.get(b.id)
        blog = log.bind(batch=b.id, attempt=a.n if a else None)
        if a is None:  # cannot happen (one transaction), but never leave a batch RUNNING
            ledger.requeue(b.id, now, reason=StopReason.SUPERVISOR_RESTART.value)  # RUNNING -> QUEUED
            continue
        result = read_json_or_none(layout.batch(b.id).result)
        code = (result or {}).get("exit_code")
        if isinstance(code, int):
            # The worker finished its attempt while nobody was watching: honour its word.
            blog.info("attempt_recovered", result_status=result.get("status"), exit_code=code)
            attempts.settle(b, a.n, AttemptEnd(ExitStatus(code, None), result,
                                               adapter_staged=layout.batch(b.id).published.is_dir()), now, blog)
        else:
            restart = StopReason.SUPERVISOR_RESTART.value
            ledger.requeue(b.id, now, reason=restart,  # RUNNING -> QUEUED
                           attempt=accounting.accounted(ledger, layout, b, AttemptRecord(a.n, Outcome.LOST, restart),
                                                        now, blog))
            blog.warning("batch_requeued", reason=StopReason.SUPERVISOR_RESTART.value,
                         hint="resumes from its newest checkpoint")
    # The newest final batches' filing is repeated where it is not complete (an original still in
    # the batch folder, a version's folder missing, a checkpoint folder half removed): the steps
    # are idempotent. Roots from before ends were decided first (schema 1) could hold older ones:
    # `trainerd fsck` finds those.
    filing = attempts.filing
    for b in ledger.batches(*FINAL_STATES, limit=LIVE_FINAL, newest_first=True):
        files = layout.batch(b.id)
        version = ledger.version(b.adapter_version) if b.state is BatchState.DONE else None
        if os.path.lexists(files.claimed(b.name)) or (
                version is not None and version.removed_at is None and not layout.adapter_dir(version.n).exists()) or (
                not attempts.settings.train.keep_finished_checkpoints and os.path.lexists(files.checkpoints)):
            attempts.end_filing(b)
    for v in ledger.versions(limit=LIVE_FINAL, newest_first=True):
        # (a rollback version retention removed is gone on purpose: never copied back)
        if v.kind == "rollback" and v.removed_at is None and not layout.adapter_dir(v.n).exists():
            log.warning("rollback_resumed", version=v.n, rollback_of=v.source)
            chain.publish_rollback(v)
    filing.switch_current()  # (a temporary link a crash left, .current.tmp, goes at the next switch)
    latest = ledger.latest_version()
    log.info("reconciled", counts=ledger.counts(), adapter_version=latest.n if latest else None)
