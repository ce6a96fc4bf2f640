"""The operator's desk: every state-changing request, whoever carries it out.

``trainerd promote | rollback | rebase | cancel | gc`` reach the one writer of the root either as a
request the running daemon serves in its loop (:mod:`.requests`), or, with no daemon, under the
root's lock (:func:`trainerd.cli.change.change`). Both hand them here: the adapter chain's to
:class:`.chain.Chain`, a cancel to :meth:`Desk.cancel`, a garbage collection to
:class:`.retention.Retention`. Each answers with a dict (``message`` and extra fields) or raises
:class:`~.chain.Refused` (never possible) / :class:`~.chain.Waiting` (possible later; the request
stays and is served again).

Cancelling a running batch is a stop through its Escalation (``.stop`` says cancelled, SIGKILL
to its group after the stop grace) with cause CANCELLED, so the exit policy files it as cancelled
whatever the worker's exit; the request stays waiting until the batch is filed, which also makes
it survive a restart of the daemon (the next one finds the batch queued and withdraws it).
"""

from __future__ import annotations

from typing import Any

from trainerd.core.contract import RootLayout
from trainerd.supervisor.ledger import Ledger
from trainerd.supervisor.ledger.states import FINAL_STATES, BatchState
from trainerd.supervisor.chain import Chain, Refused, Waiting

__all__ = ["Desk"]

CANCEL_REASON = "cancelled by an operator (`trainerd cancel`)"


class Desk:
    def __init__(self, layout: RootLayout, ledger: Ledger, attempts: Any, chain: Chain, log: Any, *,
                 retention: Any = None):
        self.layout, self.ledger, self.attempts, self.chain, self.log = layout, ledger, attempts, chain, log
        self.retention = retention  # supervisor.retention.Retention; None: gc is refused

    def apply(self, op: str, arg: int, now: float, *, running: Any = None, base: Any = None) -> dict[str, Any]:
        if op == "cancel":
            return self.cancel(arg, now, running=running)
        if op == "gc":
            if self.retention is None:
                raise Refused("gc needs the retention settings (run it with --config, or with the daemon running)")
            return self.retention.request(dry_run=bool(arg), now=now, running=running)
        if op not in ("promote", "rollback", "rebase"):
            raise Refused(f"unknown request {op!r} (promote, rollback, rebase, cancel, gc)")
        if self.retention is not None and self.retention.busy():
            # Its plan protected the requests waiting when it was made, not one that came since:
            # a promote or rollback now could publish from a folder the child is deleting.
            raise Waiting("retention is deleting what its plan removes (seconds); the request is served after it")
        return self.chain.apply(op, arg, now, running=running, base=base)

    def cancel(self, batch_id: int, now: float, *, running: Any = None) -> dict[str, Any]:
        """Withdraw a queued batch now; ask a running one to stop with a checkpoint (Waiting
        until it has, then it is filed as cancelled by the exit policy)."""
        try:
            b = self.ledger.batch(batch_id)
        except KeyError:
            raise Refused(f"no batch {batch_id}")
        if running is not None and running.batch.id == batch_id:
            grace = self.attempts.settings.supervisor.stop_grace_s
            if running.stop.cancel(now, grace):
                running.log.warning("cancel_requested", file=b.name, stop_grace_s=grace,
                                    action="checkpoint, exit, then the batch is withdrawn")
            raise Waiting(f"batch {batch_id} ({b.name}) is stopping with a checkpoint; it is withdrawn when its "
                          "worker exits")
        if b.state is BatchState.CANCELLED:
            return {"message": f"batch {batch_id} ({b.name}) is cancelled; its original is in done/", "batch": batch_id}
        if b.state in FINAL_STATES:
            raise Refused(f"batch {batch_id} ({b.name}) is {b.state.value}: only a queued or running batch can be "
                          "cancelled")
        if b.finished_at is not None:
            raise Waiting(f"batch {batch_id} ({b.name}) is being filed; ask again in a moment")
        if b.state is BatchState.CLAIMING:
            raise Waiting(f"batch {batch_id} ({b.name}) is being claimed; it is cancelled once it is queued")
        if b.state is BatchState.RUNNING:
            # No worker of ours runs it: the daemon that ran it died. Its next start requeues it
            # (reconcile), then serves this request again.
            raise Waiting(f"batch {batch_id} ({b.name}) was running when its daemon stopped; the next daemon "
                          "requeues it and then withdraws it")
        b = self.attempts.cancel(b, BatchState.QUEUED, CANCEL_REASON, now)  # QUEUED -> CANCELLED
        self.log.warning("batch_cancelled", batch=batch_id, file=b.name, attempts=b.attempts,
                         moved_to=str(self.layout.done))
        return {"message": f"batch {batch_id} ({b.name}) cancelled; its original is in done/ with "
                           f"a .cancelled.json note", "batch": batch_id}
