"""A burst of inbox files claimed in groups, without ever holding the supervisor's loop.

Each claim waits on the disk: two folder fsyncs for its rename, a read of the whole file for its
hash, and a manifest (file + folder fsync) after its commit; SQLite's commits are fsynced too.
Done one file at a time in the loop, that was ~27 ms a file here (37 files/s) and a 2,000-file
burst held the loop for over a minute. So:

- the ledger's steps are taken for a **group** of up to :data:`GROUP_MAX` files at once: one
  commit inserts their CLAIMING rows, one commit queues the hashed ones (the ledger has one
  writer, the loop's thread: these stay there);
- the disk's steps run on **a few threads** (:data:`THREADS` for renames, their fsyncs and the
  hash — 1 MiB reads, the GIL released for each —, as many for the manifests). Parallel fsyncs
  are committed together by the file system's journal: measured here, a folder + file fsync pair
  cost 6.9 ms one at a time and 0.6 ms with 4 threads;
- groups are applied **in claim order**: the queue keeps arrival order, and of two equal files
  the first is queued and the second skipped as its duplicate, as before;
- the loop does at most a slice of this per turn (:meth:`ClaimPool.step` with a deadline) and is
  woken (``poke``) when the threads finish something.

Crash safety is the steps' own (claims.py): a row is committed before its file is touched, and a
CLAIMING row left by a crash at any instant — rows written, some files renamed, a hash half-read —
is finished by reconcile at the next start.
"""

from __future__ import annotations

import errno
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from trainerd.supervisor.ledger import Batch, Ledger
from trainerd.supervisor.claims import Cancelled, Claims, sha256_of

__all__ = ["ClaimPool", "GROUP_MAX", "THREADS"]

GROUP_MAX = 32      # files per group: one commit each way, a slice of the loop's turn to apply
IN_FLIGHT_MAX = 3   # groups on the threads at once (taking, being applied, writing manifests)
THREADS = 4         # per pool: enough to batch fsyncs in the journal (measured: 16 threads ~ 4)


@dataclass
class _Item:
    batch: Batch
    future: Future | None = None


@dataclass
class _Group:
    items: list[_Item]
    applied: bool = False   # its new contents are queued (one commit)
    repeated: deque[tuple[Batch, str, int]] = field(default_factory=deque)  # duplicates left to settle
    manifests: list[Future] = field(default_factory=list)

    def taken(self) -> bool:
        return all(it.future is not None and it.future.done() for it in self.items)

    def finished(self) -> bool:
        return self.applied and not self.repeated and all(f.done() for f in self.manifests)


class ClaimPool:
    """Claims ready inbox files in groups; the loop calls :meth:`offer` and :meth:`step`.
    ``manifest`` writes a batch's manifest.json after a commit (recovery.Backups.changed)."""

    def __init__(self, claims: Claims, ledger: Ledger, log: Any, poke: Callable[[], None],
                 manifest: Callable[[Batch], None] | None = None):
        self.claims, self.ledger, self.log, self.poke = claims, ledger, log, poke
        self.manifest = manifest
        self._waiting: deque[tuple[int, str]] = deque()  # (priority, name): ready, no row yet
        self._known: set[tuple[int, str]] = set()        # waiting, or in a group in flight
        self._groups: deque[_Group] = deque()
        self._pending: dict[int, Future] = {}           # batch id -> its manifest being written
        # Two pools, so that a group's manifests never queue behind the next group's renames.
        self._takers: ThreadPoolExecutor | None = None
        self._writers: ThreadPoolExecutor | None = None
        self._cancel = threading.Event()
        self._cost: dict[str, float] = {}  # seconds each kind of action took lately (EWMA)
        self.claimed = 0  # files settled (queued, skipped, failed) by this pool, for figures

    # --- the loop's side -------------------------------------------------------------------

    def offer(self, priority: int, names: list[str]) -> list[str]:
        """Queue finished files of lane ``priority`` for claiming; returns those newly taken on."""
        new = [n for n in names if (priority, n) not in self._known]
        for n in new:
            self._known.add((priority, n))
            self._waiting.append((priority, n))
        return new

    def resume(self, batches: list[Batch]) -> None:
        """CLAIMING rows not in flight (a step that hit an error): steps 2-4 again, as one group."""
        ids = self.in_flight()
        todo = [b for b in batches if b.id not in ids]
        self._known.update((b.priority, b.name) for b in todo)  # a scan must not claim them twice
        if todo:
            self._submit(_Group([_Item(b) for b in todo]))

    def knows(self, priority: int, name: str) -> bool:
        """Is this inbox file already waiting to be claimed, or being claimed?"""
        return (priority, name) in self._known

    def in_flight(self) -> set[int]:
        return {it.batch.id for g in self._groups for it in g.items}

    def wait_manifest(self, batch_id: int) -> None:
        """Before any other change of a just-queued batch is recorded: its claim's manifest is
        written first, so the folder never ends up with the older row."""
        fut = self._pending.get(batch_id)
        if fut is not None:
            fut.exception()  # waits; a failure was logged by the writer

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._groups

    def can_work(self) -> bool:
        """Something the loop can do now without waiting for the threads."""
        return self._next_action() is not None

    def step(self, now: float, deadline: float) -> None:
        """Apply taken groups (in claim order), settle duplicates, start new ones, until
        ``deadline`` (monotonic). Each action commits to the ledger (an fsync: milliseconds on a
        quiet disk, a hundred on a busy one), so one is started only when its usual cost still
        fits before the deadline — except the first of a call: every turn makes progress."""
        first = True
        while True:
            action = self._next_action()
            if action is None:
                return
            what, group = action
            t0 = time.monotonic()
            if not first and t0 + self._cost.get(what, 0.0) > deadline:
                return
            first = False
            self._act(what, group, now)
            took = time.monotonic() - t0
            self._cost[what] = 0.8 * self._cost.get(what, took) + 0.2 * took

    def _act(self, what: str, group: Any, now: float) -> None:
        if what == "apply":
            self._apply(group, now)
        elif what == "repeat":
            # One at a time: a duplicate is filed to done/ and ends its batch (a few commits).
            self.claims.settle(*group.repeated.popleft(), now)
        elif what == "pop":
            self._groups.popleft()
            for it in group.items:
                self._pending.pop(it.batch.id, None)
            self.claimed += len(group.items)
        else:
            self._begin(now)

    def close(self) -> None:
        """Stop: abandon the claims not yet taken and the hashes in progress (their rows stay
        CLAIMING: reconcile finishes them at the next start); the manifests of queued batches
        are still written."""
        self._cancel.set()
        if self._takers is not None:
            self._takers.shutdown(wait=True, cancel_futures=True)
        if self._writers is not None:
            self._writers.shutdown(wait=True)
        self._takers = self._writers = None

    # --- groups ----------------------------------------------------------------------------

    def _next_action(self) -> tuple[str, Any] | None:
        if self._groups and self._groups[0].finished():
            return "pop", self._groups[0]
        for g in self._groups:
            if g.repeated:
                return "repeat", g
            if not g.applied:
                if g.taken():
                    return "apply", g
                break  # claim order: nothing after it may be queued first
        if self._waiting and len(self._groups) < IN_FLIGHT_MAX:
            return "begin", None
        return None

    def _begin(self, now: float) -> None:
        """Step 1 for up to GROUP_MAX waiting files: their CLAIMING rows in one commit."""
        files = []
        while self._waiting and len(files) < GROUP_MAX:
            priority, name = self._waiting.popleft()
            size = self.claims.check(name, priority)
            if size is None:
                self._known.discard((priority, name))
            else:
                files.append((name, size, priority))
        if files:
            self._submit(_Group([_Item(b) for b in self.ledger.begin_claims(files, now)]))

    def _submit(self, group: _Group) -> None:
        if self._takers is None:
            self._takers = ThreadPoolExecutor(THREADS, thread_name_prefix="claim")
        self._groups.append(group)
        for it in group.items:
            it.future = self._takers.submit(self._take_and_hash, it.batch)
            it.future.add_done_callback(lambda _f: self.poke())

    def _take_and_hash(self, batch: Batch) -> tuple[Any, ...]:
        """Steps 2-3 on a thread: ("hashed", sha, size) | ("vanished",) | ("take_failed", e) |
        ("unreadable", e) | ("cancelled",)."""
        try:
            if not self.claims.take(batch):
                return ("vanished",)
        except OSError as e:
            return ("take_failed", e)
        try:
            sha, size = sha256_of(self.claims.layout.batch(batch.id).claimed(batch.name), self._cancel)
        except Cancelled:
            return ("cancelled",)
        except OSError as e:
            return ("unreadable", e)
        return ("hashed", sha, size)

    def _apply(self, group: _Group, now: float) -> None:
        """Step 4 for a taken group, in claim order: one commit queues the new contents; their
        manifests are written on the threads; the repeated contents (duplicates) are settled by
        the next steps, one at a time."""
        hashed: list[tuple[Batch, str, int]] = []
        for it in group.items:
            self._known.discard((it.batch.priority, it.batch.name))
            out = it.future.result() if it.future is not None else ("cancelled",)
            kind = out[0]
            if kind == "hashed":
                hashed.append((it.batch, out[1], out[2]))
            elif kind == "vanished":
                self.claims.forget_vanished(it.batch)
            elif kind == "unreadable":
                self.claims.unreadable(it.batch, out[1], now)
            elif kind == "take_failed":
                e = out[1]
                # ENOSPC, EIO, EACCES: the row stays CLAIMING and the next scan tries it again.
                self.log.error("claim_failed", batch=it.batch.id, file=it.batch.name, error=str(e),
                               errno=errno.errorcode.get(e.errno or 0, e.errno))
        first: dict[str, Batch] = {}
        new = []
        for b, sha, size in hashed:
            if sha in first or self.claims.duplicate_of(b, sha) is not None:
                group.repeated.append((b, sha, size))
            else:
                first[sha] = b
                new.append((b.id, sha, size))
        if new:
            for b in self._queue(group, new, now):
                self.claims.queued(b)
        group.applied = True

    def _queue(self, group: _Group, hashed: list[tuple[int, str, int]], now: float) -> list[Batch]:
        """CLAIMING -> QUEUED for a group in one commit. The manifest that follows each committed
        row is written on the threads, all at once (the ledger's ``on_change`` is held back for
        this commit; :meth:`wait_manifest` keeps a later change of the same batch after it)."""
        on_change, self.ledger.on_change = self.ledger.on_change, None
        try:
            rows = self.ledger.finish_claims(hashed, now)
        finally:
            self.ledger.on_change = on_change
        if self.manifest is not None:
            if self._writers is None:
                self._writers = ThreadPoolExecutor(THREADS, thread_name_prefix="manifest")
            for b in rows:
                fut = self._writers.submit(self._write_manifest, b)
                fut.add_done_callback(lambda _f: self.poke())
                group.manifests.append(fut)
                self._pending[b.id] = fut
        return rows

    def _write_manifest(self, batch: Batch) -> None:
        assert self.manifest is not None
        try:
            self.manifest(batch)  # a QUEUED row is not final: recovery.Backups.changed writes the file only
        except OSError as e:
            self.log.error("batch_manifest_unwritable", batch=batch.id, error=str(e),
                           hint="the ledger has the row; the manifest is rewritten at its next change")
