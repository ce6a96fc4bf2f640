"""Claiming an inbox file: the steps, each idempotent, in the order that keeps a crash harmless.

    1. a CLAIMING row in the ledger, committed before the file is touched (a crash leaves a trace)
    2. take: inbox/<name> --rename--> batches/<id>/data.jsonl (its eval partner first), folders fsynced
    3. the sha256 of the claimed bytes
    4. settle: CLAIMING -> QUEUED with the hash, or SKIPPED (the content is already trained or
       queued), or FAILED (unreadable); each batch's manifest.json follows the commit

Reconcile repeats 2-4 for a CLAIMING row after a crash (:meth:`Claims.complete`); the daemon runs
them for a burst through :class:`~trainerd.supervisor.claimpool.ClaimPool`, which does 2-3 on a
few threads and 1 and 4 for a whole group of files per commit.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import stat
import threading
from typing import Any, Callable

from trainerd.core import faults
from trainerd.core.contract import BatchFiles, RootLayout, lane_name
from trainerd.core.fsutil import fsync_dir, open_regular
from trainerd.supervisor.inbox import eval_partner
from trainerd.supervisor.ledger import Batch, Ledger
from trainerd.supervisor.ledger.states import ACTIVE_STATES, BatchState

__all__ = ["Cancelled", "Claims", "sha256_of"]

_CHUNK = 1 << 20  # 1 MiB reads: the GIL is released for each read and each hash update


class Cancelled(Exception):
    """The daemon is stopping: a hash in progress was abandoned (reconcile redoes it)."""


def sha256_of(path: os.PathLike[str], cancelled: threading.Event | None = None) -> tuple[str, int]:
    """The sha256 and size of a claimed file, without following links or blocking on a FIFO.
    With ``cancelled``: checked between 1 MiB reads (a 16 GiB file must not hold a shutdown).

    The buffer is an anonymous mapping of its own, not a bytearray: freeing a 1 MiB malloc'ed
    block raises glibc's mmap threshold, after which every later buffer comes from the heaps of
    the claim threads and stays resident (measured: +4 MB of RSS after a 2,000-file burst)."""
    h = hashlib.sha256()
    with open_regular(path) as f, mmap.mmap(-1, _CHUNK) as buf:
        with memoryview(buf) as view:
            while n := f.readinto(view):
                if cancelled is not None and cancelled.is_set():
                    raise Cancelled(str(path))
                h.update(view[:n])
        return h.hexdigest(), os.fstat(f.fileno()).st_size


class Claims:
    """The claim steps for one root. ``fail`` and ``end`` are the attempts' (a batch failed or
    ended the one way every batch does)."""

    def __init__(self, layout: RootLayout, ledger: Ledger, log: Any, *,
                 fail: Callable[..., Batch], end: Callable[[Batch, float], Batch]):
        self.layout, self.ledger, self.log = layout, ledger, log
        self._fail, self._end = fail, end
        self._taken = 0
        self._taken_lock = threading.Lock()

    # --- the single-file path (reconcile, and a claim left half-done by an error) ----------

    def begin(self, name: str, priority: int, now: float) -> Batch | None:
        """Step 1 for one file; None when it is gone or no longer a regular file."""
        size = self.check(name, priority)
        return None if size is None else self.ledger.begin_claim(name, size, now, priority=priority)

    def complete(self, batch: Batch, now: float) -> Batch | None:
        """Steps 2-4 for a CLAIMING row: QUEUED, SKIPPED or FAILED; None when the file vanished."""
        if not self.take(batch):
            self.forget_vanished(batch)
            return None
        try:
            sha, size = sha256_of(self.layout.batch(batch.id).claimed(batch.name))
        except OSError as e:
            return self.unreadable(batch, e, now)
        return self.settle(batch, sha, size, now)

    # --- the steps -----------------------------------------------------------------------

    def check(self, name: str, priority: int) -> int | None:
        """The size of a finished inbox file about to be claimed, or None when it changed under us
        (gone, or no longer a regular file: the next scan rejects it)."""
        try:
            st = os.lstat(self.layout.lane(priority) / name)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_nlink > 1:
            self.log.warning("inbox_file_hard_linked", file=name, links=st.st_nlink,
                             hint="another name can still change these bytes while they train")
        return st.st_size

    def take(self, batch: Batch) -> bool:
        """Step 2, idempotent (any thread): False when the file left the inbox before it was taken."""
        files = self.layout.batch(batch.id)
        original = files.claimed(batch.name)  # data.jsonl, or data.jsonl.gz|zst (the worker expands it)
        if os.path.lexists(original):
            return True
        inbox = self.layout.lane(batch.priority)
        files.dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._take_eval_partner(batch, files)
        try:
            # The claim itself: atomic, same file system, the bytes never copied. If the
            # entry was swapped for a symlink since lstat, rename moves the link, unread.
            os.rename(inbox / batch.name, original)
        except FileNotFoundError:
            return False
        with self._taken_lock:
            self._taken += 1
            taken = self._taken
        if faults.number("supervisor_crash_in_claim") == taken:
            faults.die_at("supervisor_crash_in_claim")  # chaos tests: renamed, not yet hashed nor queued
        fsync_dir(inbox)
        fsync_dir(files.dir)
        return True

    def _take_eval_partner(self, batch: Batch, files: BatchFiles) -> None:
        """``name.eval.jsonl`` in the inbox goes with ``name.jsonl``, renamed first (so a crash
        between the two renames leaves the data, still in the inbox, to claim it again)."""
        partner = self.layout.lane(batch.priority) / eval_partner(batch.name)
        try:
            st = os.lstat(partner)
        except FileNotFoundError:
            return
        if stat.S_ISREG(st.st_mode) and not os.path.lexists(files.eval_file):
            os.rename(partner, files.eval_file)
            self.log.info("eval_file_claimed", file=partner.name, batch=batch.id)

    def forget_vanished(self, batch: Batch) -> None:
        self.ledger.forget_claim(batch.id)
        shutil.rmtree(self.layout.batch(batch.id).dir, ignore_errors=True)
        self.log.warning("claim_vanished", batch=batch.id, file=batch.name,
                         reason="the file left the inbox before it was claimed")

    def unreadable(self, batch: Batch, e: OSError, now: float) -> Batch:
        return self._fail(batch, BatchState.CLAIMING, f"cannot read the claimed file: {e.strerror or e}", now,
                          self.log.bind(batch=batch.id))

    def duplicate_of(self, batch: Batch, sha: str) -> Batch | None:
        return self.ledger.find_by_sha(sha, ACTIVE_STATES, batch.id)

    def settle(self, batch: Batch, sha: str, size: int, now: float) -> Batch:
        """Step 4 for one file: SKIPPED when the content is already trained or queued, else QUEUED."""
        dup = self.duplicate_of(batch, sha)
        if dup is not None:
            batch = self.ledger.decide_skipped(batch.id, sha, dup.id, now)
            batch = self._end(batch, now)  # CLAIMING -> SKIPPED
            self.log.warning("duplicate_skipped", batch=batch.id, file=batch.name, sha256=sha, duplicate_of=dup.id,
                             duplicate_of_file=dup.name, duplicate_of_state=dup.state.value,
                             reason="this content was already trained or is queued; not training it twice")
            return batch
        batch = self.ledger.finish_claim(batch.id, sha, size, now)  # CLAIMING -> QUEUED
        self.queued(batch)
        return batch

    def queued(self, batch: Batch) -> None:
        self.log.info("batch_queued", batch=batch.id, file=batch.name, sha256=batch.sha256,
                      size_bytes=batch.size_bytes, lane=lane_name(batch.priority))
