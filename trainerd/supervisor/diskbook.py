"""The daemon's book of disk use by kind: kept as folders are written and removed, never walked.

What a kind holds is the sum of what was *settled* in it — a finished batch's folder and its
TensorBoard run, its kept evaluation set and replay file, a published version, a refused
candidate, an original and its note in ``done/``/``failed/`` — each measured once, when it stops
changing (:meth:`DiskBook.add`, called by filing and at a batch's end), less what retention
removes (:meth:`DiskBook.take`, the bytes the deleting child reports). Only the live part is
measured again when the book is written (``trainerd.supervisor.diskuse``: the unfinished batches, the logs, the versions run):
bounded by the queue, not the chain. A queue of thousands (a burst) is not measured in one turn of
the loop: each write measures at most :data:`LIVE_SLICE` unfinished batches — every one that is not
merely queued (running, in back-off, decided: they change), then the queued ones never measured,
then the oldest measurements — and keeps the others' last figures; while some were never measured
the book stays due (short by their few bytes until then).

The book is written to ``root/disk-usage.json`` (totals by kind and the settled part; a fixed
size) whenever something was settled or removed — so ``trainerd status`` right after a publish
shows the figures with it — and every :data:`LIVE_EVERY_S` while a worker runs. A crash between
a filing and its entry leaves the book short by that entry: a full walk in a child process
(``python -m trainerd.supervisor.diskuse --measure``) replaces it every :data:`FULL_EVERY_S`, and before the
book's first use on a root. While that walk runs the book waits (its entries would be counted
twice or not at all), and takes the walk's figures when it ends.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from trainerd.core.contract import RootLayout
from trainerd.core.fsutil import atomic_write_json, free_bytes, read_json_or_none
from trainerd.core.replay import Store
from trainerd.supervisor.diskuse import KINDS, batch_live, shared_live, tree_bytes
from trainerd.supervisor.ledger import Batch, Ledger
from trainerd.supervisor.ledger.states import BatchState

__all__ = ["DiskBook"]

LIVE_EVERY_S = 60.0      # the running batch's folder grows with its checkpoints
FULL_EVERY_S = 86400.0   # the walk that corrects the book
# Unfinished batches measured per write: 2,000 queued ones took 0.83 s in one turn (load 9, 2 cores;
# supervisor_bench --only-burst), 64 take ~30 ms; a queued batch waits unchanged meanwhile.
LIVE_SLICE = 64


class DiskBook:
    def __init__(self, layout: RootLayout, ledger: Ledger, log: Any):
        self.layout, self.ledger, self.log = layout, ledger, log
        usage = read_json_or_none(layout.disk_usage) or {}
        settled = usage.get("settled")
        # No settled part (a new root, or one measured by an older trainerd): walk it first.
        self.known = isinstance(settled, dict)
        self.settled = {k: int((settled or {}).get(k) or 0) for k in KINDS}
        self.full_at = float(usage.get("full_measure_at") or 0.0)
        self.walking = False
        self.dirty = self.known
        self.next_live = 0.0
        # Unfinished batch id -> its (folder, curves) bytes as last measured, oldest measure first.
        self.live: dict[int, tuple[int, int]] = {}
        self.unmeasured = 0  # unfinished batches the last write had no figure for

    # --- entries -------------------------------------------------------------------------

    def add(self, kind: str, path: Path | None, sign: int = 1) -> None:
        """``path`` (a file or a folder, measured now) is settled in ``kind`` (``sign`` -1: it left it)."""
        if path is None or self.walking or not os.path.lexists(path):
            return
        self.settled[kind] = max(0, self.settled[kind] + sign * tree_bytes(path))
        self.dirty = True

    def take(self, freed: dict[str, int]) -> None:
        """Retention removed these bytes by kind."""
        if self.walking:
            return
        for kind, n in freed.items():
            if kind in self.settled:
                self.settled[kind] = max(0, self.settled[kind] - int(n))
        self.dirty = True

    def batch_settled(self, batch: Batch) -> None:
        """A batch reached its final state: what its worker wrote stops changing now."""
        name = self.layout.batch_name(batch.id)
        self.add("batches", self.layout.batch_dir(batch.id))
        self.add("curves", self.layout.tensorboard / name)
        if batch.state is BatchState.DONE:
            self.add("evalsets", self.layout.evalsets / "batches" / f"{name}.jsonl")  # lineage.store_new_set's copy
            self.add("replay", Store(self.layout.replay).path(batch.id))

    # --- the full walk ---------------------------------------------------------------------

    def full_due(self, now: float) -> bool:
        return not self.known or now - self.full_at >= FULL_EVERY_S

    def walk_started(self) -> None:
        self.walking = True

    def walk_ended(self, ok: bool) -> None:
        """The walk wrote disk-usage.json: its settled part is the book from now on."""
        self.walking = False
        usage = read_json_or_none(self.layout.disk_usage) or {}
        if ok and isinstance(usage.get("settled"), dict):
            self.settled = {k: int(usage["settled"].get(k) or 0) for k in KINDS}
            self.known, self.full_at = True, float(usage.get("full_measure_at") or time.time())
        elif not ok:
            self.full_at = time.time() - FULL_EVERY_S + 600.0  # try again in ten minutes
        self.dirty = self.known

    # --- writing ---------------------------------------------------------------------------

    def tick(self, now: float, *, running: bool, min_free_bytes: int) -> None:
        """Write the book if an entry changed it, or the running batch's folder is due a look."""
        if self.walking or not self.known:
            return
        if self.dirty or self.unmeasured or (running and now >= self.next_live):
            self.write(now, min_free_bytes)

    def wake_times(self, now: float, *, running: bool) -> list[float]:
        if not self.known or self.walking:
            return []
        return ([now] if self.unmeasured else []) + ([self.next_live] if running else [])

    def _measure_live(self) -> dict[str, int]:
        """The live part, with at most :data:`LIVE_SLICE` unfinished batches measured this time."""
        batches = self.ledger.unfinished()
        for gone in self.live.keys() - {b.id for b in batches}:
            del self.live[gone]
        changing = [b.id for b in batches if b.state is not BatchState.QUEUED]
        fresh = [b.id for b in batches if b.state is BatchState.QUEUED and b.id not in self.live]
        todo = changing + fresh[:max(0, LIVE_SLICE - len(changing))]
        chosen = set(todo)
        todo += [bid for bid in self.live if bid not in chosen][:max(0, LIVE_SLICE - len(todo))]
        for bid in todo:
            self.live.pop(bid, None)
            self.live[bid] = batch_live(self.layout, bid)  # to the end: the newest measure
        self.unmeasured = len(batches) - len(self.live)
        live = shared_live(self.layout)
        live["batches"] += sum(f for f, _ in self.live.values())
        live["curves"] += sum(c for _, c in self.live.values())
        return live

    def write(self, now: float, min_free_bytes: int) -> dict[str, Any]:
        live = self._measure_live()
        kinds = {k: self.settled[k] + live.get(k, 0) for k in KINDS}
        body = {"measured_at": now, "full_measure_at": self.full_at, "kinds": kinds, "total": sum(kinds.values()),
                "free_bytes": free_bytes(self.layout.root), "min_free_bytes": min_free_bytes,
                "settled": dict(self.settled)}
        try:
            atomic_write_json(self.layout.disk_usage, body, durable=False)  # a figure, rewritten often
        except OSError as e:
            self.log.warning("disk_usage_unwritable", error=str(e))
        self.dirty, self.next_live = False, now + LIVE_EVERY_S
        return body
