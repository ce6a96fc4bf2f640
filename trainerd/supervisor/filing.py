"""Filing: the ends of a batch on disk, each idempotent so that reconcile can repeat it.

- a DONE batch: its staged adapter becomes ``adapters/<n>``, ``current`` moves to the newest
  version, the original goes to ``done/``;
- a FAILED batch: the original goes to ``failed/`` with ``<name>.error.json`` beside it;
- a SKIPPED batch (a duplicate): the original goes to ``done/`` with ``<name>.duplicate.json``;
- a non-regular inbox entry (symlink, FIFO, directory named ``*.jsonl``): moved unread to
  ``failed/``.

The ledger says what happened; these functions make the folders say it too. Each one can be
interrupted at any instant (power cut, SIGKILL) and run again from the top. An existing name
in ``done/``/``failed/`` is never overwritten.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

from trainerd.core import faults
from trainerd.core.settings import EvalSettings
from trainerd.core.contract import RootLayout, data_suffix
from trainerd.core.fsutil import atomic_write_json, fsync_dir, read_json_or_none, unlink_quietly
from trainerd.supervisor.inbox import Rejected, eval_partner
from trainerd.supervisor.ledger import Batch, Ledger
from trainerd.core.replay import Entry, Store
from trainerd.supervisor.lineage import lineage_of, store_new_set, write_lineage

__all__ = ["Filing", "free_name"]


def free_name(folder: Path, name: str, tag: str) -> str:
    """``name`` if free in ``folder``, else ``<tag>-name``: originals are never overwritten.

    A name near NAME_MAX (255 bytes) is shortened so that ``<tag>-`` and ``.error.json``
    still fit; the full original name is in the ledger and in the error file.
    """
    if len(name.encode()) > 200:
        suffix = data_suffix(name) or ".jsonl"
        name = name.encode()[:180].decode(errors="ignore") + "~" + suffix
        return f"{tag}-{name}"
    if not any(os.path.lexists(folder / n) for n in (name, f"{name}.error.json", eval_partner(name))):
        return name
    return f"{tag}-{name}"


def _read_errors(path: Path, limit: int = 100) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        with open(path, "rb") as f:
            for line in f:
                if len(out) >= limit:
                    break
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return out


class Filing:
    """Moves batches' files to where the ledger says they belong."""

    def __init__(self, layout: RootLayout, ledger: Ledger, log: Any, *, settings_of: Any = None):
        self.layout = layout
        self.ledger = ledger
        self.log = log
        self.settings_of = settings_of  # the daemon's current settings (the memory's bounds)
        self.book: Any = None  # the daemon's disk book (supervisor/diskbook.py): what was filed where
        self._unmovable: set[tuple[str, Any]] = set()  # rejected inbox entries we could not move

    def filed(self, kind: str, path: Path, sign: int = 1) -> None:
        """``path`` was just filed as ``kind`` (``sign`` -1: it left that kind): the book counts it once."""
        if self.book is not None:
            self.book.add(kind, path, sign)

    def _move_original(self, batch: Batch, folder: Path, name: str | None = None) -> str | None:
        """Rename the batch's data file (and the eval file that came with it, as
        ``<stem>.eval.jsonl``) into ``folder`` under a free name; None if it is gone."""
        files = self.layout.batch(batch.id)
        original = files.claimed(batch.name)
        if not os.path.lexists(original):
            return None
        name = name or free_name(folder, batch.name, self.layout.batch_name(batch.id))
        if os.path.lexists(files.eval_file):
            os.rename(files.eval_file, folder / eval_partner(name))
            self.filed("originals", folder / eval_partner(name))
        os.rename(original, folder / name)
        fsync_dir(folder)
        self.filed("originals", folder / name)
        if original != files.data:
            # A compressed original is what is kept; the worker's decompressed copy is derived.
            unlink_quietly(files.data)
        return name

    def _note(self, path: Path, body: dict[str, Any]) -> None:
        """A note beside an original in done/ or failed/ (why it is there)."""
        atomic_write_json(path, body)
        self.filed("originals", path)

    def _mark_result(self, batch: Batch) -> None:
        """result.json (the worker's last word) gains the decision the supervisor took on it."""
        files = self.layout.batch(batch.id)
        result = read_json_or_none(files.result)
        if result is not None and result.get("decision") != batch.decision:
            atomic_write_json(files.result, {**result, "decision": batch.decision,
                                             "adapter_version": batch.adapter_version})

    # --- done ------------------------------------------------------------------------

    def finish_done(self, batch: Batch) -> None:
        """Roll a published batch forward on disk: its lineage written, the adapter visible as
        its version, ``current`` switched, its new set kept for later batches, the original filed.
        A promoted batch's candidate comes from adapters/rejected/ instead of the batch folder."""
        dest = self.layout.adapter_dir(batch.adapter_version)
        forced = batch.decision == "forced"
        staged = self.layout.rejected_dir(batch.id) if forced else self.layout.batch(batch.id).published
        if not dest.exists() and staged.is_dir():
            version = self.ledger.version(batch.adapter_version)
            write_lineage(staged, lineage_of(self.layout, batch, version, kind=version.kind))
            # The worker wrote and fsynced it completely before renaming it to `published`;
            # this rename makes it visible as a version in one step.
            os.rename(staged, dest)
            fsync_dir(self.layout.adapters)
            self.filed("adapters", dest)
            if forced:
                self.filed("rejected", dest, -1)  # the candidate left adapters/rejected/
            faults.die_at("supervisor_crash_in_publish")  # chaos tests: die before `current` moves
        if not dest.exists():
            self.log.error("adapter_missing", batch=batch.id, version=batch.adapter_version, path=str(dest))
        self.switch_current()
        store_new_set(self.layout, batch, self.eval_settings, self.log)
        self._replay_add(batch)
        self._mark_result(batch)
        self._move_original(batch, self.layout.done)

    @property
    def eval_settings(self) -> EvalSettings:
        return self.settings_of().eval if self.settings_of is not None else EvalSettings()

    def _replay_add(self, batch: Batch) -> None:
        """A published batch's training lines join the replay store (a rename and the index)."""
        files = self.layout.batch(batch.id)
        contrib = (read_json_or_none(files.scan) or {}).get("contrib")
        if contrib and (files.replay_contrib.exists() or self.layout.replay.joinpath(f"{batch.id:06d}.jsonl").exists()):
            Store.open(self.layout.replay).add(batch.id, files.replay_contrib, Entry(**contrib))

    def finish_rejected(self, batch: Batch) -> None:
        """A refused candidate: kept under adapters/rejected/<id>/, ``current`` untouched, the
        original in done/ with ``<name>.rejected.json`` (the figures, the rule that failed)."""
        files = self.layout.batch(batch.id)
        dest = self.layout.rejected_dir(batch.id)
        # Its lines stay out of the replay store (a promote is another decision: then they join).
        if not dest.exists() and files.published.is_dir():
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(files.published, dest)
            fsync_dir(dest.parent)
            self.filed("rejected", dest)
        self._mark_result(batch)
        if not os.path.lexists(files.claimed(batch.name)):
            return
        name = free_name(self.layout.done, batch.name, self.layout.batch_name(batch.id))
        self._note(self.layout.done / f"{name}.rejected.json", {
            "file": batch.name, "batch": batch.id, "sha256": batch.sha256, "decision": "rejected",
            "reason": batch.last_reason, "champion_version": batch.parent_version, "candidate": str(dest),
            "gate": json.loads(batch.gate_json) if batch.gate_json else None,
            "promote": f"trainerd promote {batch.id}"})
        self._move_original(batch, self.layout.done, name)

    def switch_current(self) -> None:
        """Point ``adapters/current`` at the newest version on disk, atomically (tmp link + rename).
        Looks at the newest versions retention kept, newest first: one ``is_dir`` as a rule."""
        newest = next((v.n for v in self.ledger.versions(newest_first=True, kept=True, limit=8)
                       if self.layout.adapter_dir(v.n).is_dir()), None)
        if newest is None:  # none of the newest on disk (removed by hand?): look further back
            newest = next((v.n for v in self.ledger.versions(newest_first=True, kept=True)
                           if self.layout.adapter_dir(v.n).is_dir()), None)
        if newest is None:
            return
        target = str(newest)
        try:
            if os.readlink(self.layout.current) == target:
                return
        except OSError:
            pass
        # One name, not one per pid: one writer holds the root, and a start need not list
        # adapters/ (the chain's length) to find the leftovers of earlier lives.
        tmp = self.layout.adapters / ".current.tmp"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(target, tmp)
        os.replace(tmp, self.layout.current)  # a reader sees the old link or the new one
        fsync_dir(self.layout.adapters)

    def drop_checkpoints(self, batch: Batch) -> None:
        """A finished batch's checkpoints go (``train.keep_finished_checkpoints`` keeps them): its
        adapter is published (or kept as a candidate), nothing resumes it, and each checkpoint holds
        adapter + optimizer state. Idempotent; a crash half-way leaves a part that reconcile removes."""
        ck = self.layout.batch(batch.id).checkpoints
        if os.path.lexists(ck):
            shutil.rmtree(ck, ignore_errors=True)

    # --- failed ----------------------------------------------------------------------

    def finish_failed(self, batch: Batch) -> Path | None:
        """Quarantine: original to failed/ with ``<name>.error.json`` beside it. Returns where it went."""
        files = self.layout.batch(batch.id)
        failed = self.layout.failed
        gone = not os.path.lexists(files.claimed(batch.name))
        if gone:
            # The data vanished (deleted by hand while queued or training): nothing to move,
            # but the reason still goes where the operator looks. Once only (reconcile repeats).
            for cand in (batch.name, f"{self.layout.batch_name(batch.id)}-{batch.name}"):
                if (read_json_or_none(failed / f"{cand}.error.json") or {}).get("batch") == batch.id:
                    return None
        name = free_name(failed, batch.name, self.layout.batch_name(batch.id))
        result = read_json_or_none(files.result) or {}
        self._note(failed / f"{name}.error.json", {
            "file": batch.name, "batch": batch.id, "reason": batch.last_reason,
            "sha256": batch.sha256, "attempts": batch.attempts, "crashes": batch.crashes,
            "lines_good": result.get("lines_good"), "lines_bad": result.get("lines_bad"),
            "errors": result.get("errors") or _read_errors(files.errors),
            "exit_code": result.get("exit_code"), "batch_dir": str(files.dir), "failed_at": batch.finished_at,
            "original": None if gone else name,
        })
        if gone:
            fsync_dir(failed)
            return None
        self._move_original(batch, failed, name)
        return failed / name

    # --- skipped ---------------------------------------------------------------------

    def finish_skipped(self, batch: Batch) -> None:
        data = self.layout.batch(batch.id).claimed(batch.name)
        if not os.path.lexists(data):
            return
        name = free_name(self.layout.done, batch.name, self.layout.batch_name(batch.id))
        self._note(self.layout.done / f"{name}.duplicate.json", {
            "file": batch.name, "batch": batch.id, "sha256": batch.sha256,
            "duplicate_of": batch.duplicate_of, "reason": batch.last_reason})
        self._move_original(batch, self.layout.done, name)

    # --- cancelled -------------------------------------------------------------------

    def finish_cancelled(self, batch: Batch) -> None:
        """Withdrawn by `trainerd cancel`: the original to done/ with ``<name>.cancelled.json``;
        the batch folder (its logs and figures) stays for retention to handle."""
        files = self.layout.batch(batch.id)
        if not os.path.lexists(files.claimed(batch.name)):
            return
        result = read_json_or_none(files.result) or {}
        name = free_name(self.layout.done, batch.name, self.layout.batch_name(batch.id))
        self._note(self.layout.done / f"{name}.cancelled.json", {
            "file": batch.name, "batch": batch.id, "sha256": batch.sha256, "reason": batch.last_reason,
            "attempts": batch.attempts, "step": result.get("step") if batch.attempts else None,
            "total_steps": result.get("total_steps") if batch.attempts else None,
            "checkpoint": result.get("checkpoint") if batch.attempts else None,
            "batch_dir": str(files.dir), "cancelled_at": batch.finished_at,
            "resubmit": "trainerd submit FILE (the same content is trained again: a cancelled batch is no duplicate)"})
        self._move_original(batch, self.layout.done, name)

    # --- the inbox -------------------------------------------------------------------

    def reject_entry(self, rej: Rejected, now: float) -> None:
        """Move a non-regular ``*.jsonl`` inbox entry to failed/ without ever opening it."""
        dest_name = free_name(self.layout.failed, rej.name, f"rejected-{int(now)}")
        src = (rej.folder or self.layout.inbox) / rej.name
        try:
            os.rename(src, self.layout.failed / dest_name)  # rename never follows a symlink
        except OSError as e:
            # E.g. another user's directory (moving it needs write access to the directory
            # itself). Say so once per entry, not on every rescan; it stays, never read.
            try:
                key = (rej.name, os.lstat(src).st_ino)
            except OSError:
                key = (rej.name, None)
            if key not in self._unmovable:
                self._unmovable.add(key)
                self.log.error("inbox_entry_unmovable", file=rej.name, kind=rej.kind, reason=rej.reason,
                               error=str(e), errno=errno.errorcode.get(e.errno or 0, e.errno),
                               hint="it is left in the inbox, unread; remove it by hand")
            return
        self.filed("originals", self.layout.failed / dest_name)
        self._note(self.layout.failed / f"{dest_name}.error.json", {
            "file": rej.name, "reason": rej.reason, "kind": rej.kind, "failed_at": now})
        self.log.error("inbox_entry_rejected", file=rej.name, kind=rej.kind, reason=rej.reason,
                       moved_to=str(self.layout.failed / dest_name))
