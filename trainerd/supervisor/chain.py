"""The operator's hand on the adapter chain: promote a rejected candidate, roll back to a version.

Both publish a *new* version (never rewrite an old one), so "current = newest" and "the next
batch continues from the newest" stay true and a restart cannot undo them:

- ``promote BATCH``: the rejected candidate of BATCH becomes the next version (kind ``forced``,
  its lineage naming the champion it was judged against and the rule it failed);
- ``rollback K``: a copy of version K becomes the next version (kind ``rollback``).

They change what the daemon owns, so they run in the daemon's loop (a request through
``root/requests/``) or, with no daemon, under the root's lock; never two writers. A request
waits while a batch is in progress (started, not ended): that batch continues the adapter it
started from, and publishing it after a rollback would silently undo the rollback.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from trainerd.core.contract import RootLayout
from trainerd.core.fsutil import publish_dir
from trainerd.supervisor.ledger import AdapterVersion, Ledger
from trainerd.core.replay import Store
from trainerd.supervisor.ledger.states import BatchState
from trainerd.core.fsutil import read_json_or_none
from trainerd.supervisor import hooks
from trainerd.supervisor.lineage import abandon_sets, chain_base, write_lineage, write_rebase

__all__ = ["Chain", "Refused", "Waiting"]


class Refused(Exception):
    """The request cannot be done, ever (say why)."""


class Waiting(Exception):
    """The request can be done once a batch in progress ends."""


class Chain:
    def __init__(self, layout: RootLayout, ledger: Ledger, attempts: Any, log: Any):
        self.layout, self.ledger, self.attempts, self.log = layout, ledger, attempts, log

    def busy(self, running: Any = None) -> str | None:
        """Why a request must wait now (a batch in progress), or None."""
        if running is not None:
            return f"batch {running.batch.id} ({running.batch.name}) is training"
        for b in self.ledger.batches(BatchState.QUEUED):
            if b.attempts and b.finished_at is None:
                return f"batch {b.id} ({b.name}) is in progress (attempt {b.attempts} ended: {b.last_reason})"
        return None

    def apply(self, op: str, arg: int, now: float, *, running: Any = None, base: Any = None) -> dict[str, Any]:
        if op not in ("promote", "rollback", "rebase"):
            raise Refused(f"unknown request {op!r} (promote, rollback, rebase)")
        if op == "rebase":
            if running is not None:
                raise Waiting(f"batch {running.batch.id} ({running.batch.name}) is training on the old base; "
                              "the rebase applies when it ends")
            return self.rebase(base, now)
        why = self.busy(running)
        if why:
            raise Waiting(f"{why}; the {op} applies when it ends (pause does not end it)")
        return self.promote(arg, now) if op == "promote" else self.rollback(arg, now)

    def rebase(self, configured: dict[str, Any] | None, now: float) -> dict[str, Any]:
        """Start a new chain on the configured base model: the next version has no parent adapter.
        A batch in progress on the old base starts again from scratch (its checkpoints continue
        an adapter that means nothing on the new base)."""
        if configured is None:
            raise Refused("the configured base model cannot be read (model.path): nothing to rebase on")
        latest = self.ledger.latest_version()
        old, _ = chain_base(self.layout, latest)
        write_rebase(self.layout, configured, latest, old)
        restarted = []
        for b in self.ledger.batches(BatchState.QUEUED):
            files = self.layout.batch(b.id)
            fixed = read_json_or_none(files.parent)
            if fixed is not None and (fixed.get("base") or {}).get("id") != configured["id"]:
                shutil.rmtree(files.checkpoints, ignore_errors=True)
                for f in (files.parent, files.evalsets, files.published):
                    shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
                restarted.append(b.id)
        self.log.warning("chain_rebased", base=configured.get("path"), base_id=configured["id"],
                         previous_base=(old or {}).get("path"), after_version=latest.n if latest else None,
                         restarted_batches=restarted)
        return {"version": None, "message": f"the next version starts a new chain on {configured['path']}"
                + (f"; batches {restarted} start again on it" if restarted else "")}

    def promote(self, batch_id: int, now: float) -> dict[str, Any]:
        try:
            b = self.ledger.batch(batch_id)
        except KeyError:
            raise Refused(f"no batch {batch_id}")
        if b.state is not BatchState.REJECTED:
            raise Refused(f"batch {batch_id} is {b.state.value}, not rejected: only a rejected candidate can be promoted")
        if not self.layout.rejected_dir(batch_id).is_dir():
            raise Refused(f"batch {batch_id}'s candidate is gone from {self.layout.rejected_dir(batch_id)}")
        b = self.ledger.decide_promote(batch_id, self.layout.adapter_dir, now)
        b = self.attempts.end(b, now)  # REJECTED -> DONE
        self.log.warning("adapter_promoted", batch=batch_id, version=b.adapter_version, file=b.name,
                         champion_version=b.parent_version, rule=b.last_reason)
        return {"version": b.adapter_version,
                "message": f"batch {batch_id} ({b.name}) published as version {b.adapter_version} (forced)"}

    def rollback(self, source: int, now: float) -> dict[str, Any]:
        latest = self.ledger.latest_version()
        if latest is None or not any(v.n == source for v in self.ledger.adapter_versions()):
            raise Refused(f"no adapter version {source}")
        if source == latest.n:
            raise Refused(f"version {source} is already current")
        if not self.layout.adapter_dir(source).is_dir():
            raise Refused(f"version {source}'s folder is gone: {self.layout.adapter_dir(source)}")
        v = self.ledger.add_rollback(source, self.layout.adapter_dir, now)
        self.publish_rollback(v)
        # The versions after ``source`` made the adapter worse: their lines are not replayed again.
        abandoned = [av.batch_id for av in self.ledger.adapter_versions()
                     if source < av.n < v.n and av.kind in ("blessed", "forced")]
        Store.open(self.layout.replay).abandon(abandoned)
        abandon_sets(self.layout, abandoned, self.attempts.filing.eval_settings, self.log)
        self.log.warning("adapter_rolled_back", version=v.n, rollback_of=source, previous_version=latest.n)
        return {"version": v.n, "message": f"version {v.n} published as a copy of version {source} (rollback)"}

    def publish_rollback(self, v: AdapterVersion) -> None:
        """Copy the source version into place as ``v`` (idempotent: reconcile repeats it)."""
        dest = self.layout.adapter_dir(v.n)
        if not dest.exists():
            # Its publish hook is recorded first: a crash after the rename still runs it.
            hooks.record_version(self.layout, v.n, v.batch_id, _file_of(self.ledger, v.batch_id), "rollback")
            src = self.layout.adapter_dir(v.source)
            tmp = self.layout.adapters / f".{v.n}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            lineage = {"version": v.n, "kind": "rollback", "rollback_of": v.source, "parent": v.parent,
                       "batch": v.batch_id, "created_at": v.created_at,
                       "source_lineage": str(src / "lineage.json")}
            write_lineage(tmp, lineage)
            publish_dir(tmp, dest)  # group-readable even when the source predates that rule
            self.attempts.filing.filed("adapters", dest)
        self.attempts.filing.switch_current()


def _file_of(ledger: Ledger, batch_id: int) -> str | None:
    try:
        return ledger.batch(batch_id).name
    except KeyError:
        return None
