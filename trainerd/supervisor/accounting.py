"""The supervisor's side of fault accounting: what it reads to decide and to count (goodput.py is
the pure arithmetic; policy.py decides).

- At a start: the fault rate over the last days (trainerd/core/cadence.py) from the ledger's ended
  attempts, handed to the worker as ``--mtbf-s`` (its Young/Daly checkpoint interval).
- At an end: the attempt's ``tally.json`` says whether it made progress and how far it got; the
  last traceback in its stderr goes into a crash's reason; its account and the batch's new goodput
  totals go into the ledger with the attempt's end (one transaction), and into the log
  (``attempt_accounted``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from trainerd.core import cadence
from trainerd.supervisor.ledger import goodput
from trainerd.core.contract import BatchFiles, ExitCode, RootLayout
from trainerd.core.fsutil import read_json_or_none
from trainerd.supervisor.ledger import AttemptRecord, Batch, Ledger
from trainerd.supervisor import forensics
from trainerd.supervisor.policy import AttemptEnd

__all__ = ["accounted", "fault_rate", "with_progress"]

_NOT_CRASHES = (ExitCode.OK, ExitCode.TEMPFAIL, ExitCode.DATAERR, ExitCode.CONFIG)


def fault_rate(ledger: Ledger, now: float) -> cadence.FaultRate:
    return cadence.estimate_mtbf(ledger.attempts_ended_since(now - cadence.WINDOW_S), now)


def with_progress(end: AttemptEnd, files: BatchFiles, batch: Batch) -> AttemptEnd:
    """``end`` with what the attempt's tally says of its progress, and a crash's last traceback."""
    p = goodput.progress_of(read_json_or_none(files.tally), batch.reached_step)
    crashed = end.status.code not in _NOT_CRASHES
    return replace(end, progressed=p.progressed, reached_step=p.reached_step,
                   traceback=forensics.last_traceback(files.stderr) if crashed else end.traceback)


def accounted(ledger: Ledger, layout: RootLayout, batch: Batch, record: AttemptRecord, now: float,
              log: Any) -> AttemptRecord:
    """``record`` with the attempt's account and the batch's goodput totals including it (``batch``:
    the row as it was while the attempt ran)."""
    this = ledger.attempt(batch.id, record.n)
    prev = ledger.attempt(batch.id, record.n - 1) if record.n > 1 else None
    after_fault = prev.ended_at if prev is not None and cadence.is_fault(prev.outcome, prev.reason) else None
    acc = goodput.account(read_json_or_none(layout.batch(batch.id).tally), before_step=batch.reached_step,
                          started_at=this.started_at if this is not None else now, ended_at=now,
                          after_fault_at=after_fault)
    fault = cadence.is_fault(str(record.outcome), record.reason)
    totals = goodput.add(batch.goodput, acc, fault=fault)
    log.info("attempt_accounted", fault=fault, **acc, batch_goodput=goodput.summary(totals))
    return replace(record, account=acc, batch_goodput=totals, reached_step=acc["reached_step"])
