"""Retention: what may be deleted under the root, decided here; deleted by a child process.

All off by default (``retention.*`` = 0): keeping every original byte is the promise, deleting is
the operator's choice. When on:

- ``done_days`` / ``failed_days``: files in ``done/`` / ``failed/`` (originals and the notes beside
  them) filed more than that many days ago. Their age is the inode's change time, which the rename
  into ``done/``/``failed/`` sets (the modification time is the data's own, often much older);
- ``keep_adapters``: the newest N published versions stay; older folders go (the ledger keeps the
  row, marked ``removed_at``, so history, numbering and fsck stay right);
- ``keep_batch_dirs``: the folders of the newest N finished batches stay; older ones go. A rejected
  batch's candidate (``adapters/rejected/<id>``) goes with its folder, never alone: a promote needs
  both (the candidate, and the folder's figures, new set and replay lines), so a rejected batch is
  promotable exactly while its folder is kept;
- ``keep_curves``: the TensorBoard runs (``tensorboard/<id>/``) of the newest N finished batches stay;
- ``keep_attempt_rows``: the ledger's attempt rows of the newest N finished batches stay; older ones
  are deleted (the batch rows stay, and the running totals of tokens, steps and restarts do not
  move: trainerd/supervisor/ledger/aggregates.py). Done by the daemon itself, a bounded chunk at a time.

Bounded without retention: a finished batch's checkpoints (``train.keep_finished_checkpoints``),
the log (``log.rotate_bytes``, ``log.keep_files``).

A plan costs what is new since the last, not the chain's length: the versions retention has not
removed (at most the kept ones plus the newly published), and for the folders and runs the finished
batches above a mark in the ledger's counters (``retention:<kind>_through``: every finished batch at
or below it has been dealt with), which moves up as they are.

Never deleted: ``current``; an adapter a batch in progress continues (its ``parent_version``); what a
pending request needs (a rollback's version, a promote's candidate and folder); what a pending publish
hook still has to show; a batch in progress (not finished); ``evalsets/`` and ``replay/`` (the gate's
memory: their bounds are the gate's).

Applied by the daemon: the plan is made in its loop (ledger queries and one directory listing of
``done/`` and ``failed/``: milliseconds), versions are marked removed in the ledger first, then
``python -m trainerd.supervisor.diskuse`` deletes the paths and reports the bytes freed by kind, which the
daemon's disk book (supervisor/diskbook.py) takes off. Automatically after every worker ends and at
least once an hour, between workers (it holds the next start while it deletes, seconds at most); at
once on ``trainerd gc`` (a request; it may run beside a worker: nothing it deletes is anything a
worker reads). Without a daemon, ``trainerd gc`` applies it itself under the root's lock. The same
child walks the whole root once a day (``--measure``), correcting the book.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from trainerd.supervisor.child import Child
from trainerd.core.contract import RootLayout
from trainerd.supervisor.diskuse import apply_plan, write_usage
from trainerd.core.fsutil import atomic_write_json, fmt_bytes, read_json_or_none, unlink_quietly
from trainerd.supervisor.ledger import Batch, Ledger
from trainerd.supervisor.ledger.states import FINAL_STATES, BatchState
from trainerd.supervisor import hooks
from trainerd.supervisor.chain import Waiting
from trainerd.supervisor.diskbook import FULL_EVERY_S

__all__ = ["Item", "Retention", "plan"]

APPLY_EVERY_S = 3600.0
DAY_S = 86400.0


@dataclass(frozen=True)
class Item:
    kind: str            # original | adapter | batch | rejected | curves
    path: str
    why: str
    version: int | None = None
    batch: int | None = None


def enabled(rs: Any) -> bool:
    return bool(rs.done_days or rs.failed_days or rs.keep_adapters or rs.keep_batch_dirs or rs.keep_curves
                or rs.keep_attempt_rows)


def _requested(layout: RootLayout) -> tuple[set[int], set[int]]:
    """(versions, batches) named by requests still waiting in root/requests/ (rollback, promote)."""
    versions, batches = set(), set()
    try:
        names = [e.name for e in os.scandir(layout.requests)]
    except OSError:
        return versions, batches
    for name in names:
        if name.startswith(".") or not name.endswith(".json") or name.endswith(".answer.json"):
            continue
        body = read_json_or_none(layout.requests / name) or {}
        if isinstance(body.get("arg"), int):
            (versions if body.get("op") == "rollback" else batches if body.get("op") == "promote" else set()).add(body["arg"])
    return versions, batches


def plan(layout: RootLayout, ledger: Ledger, rs: Any, now: float) -> list[Item]:
    """What retention would delete now, and why (see the module docstring for the rules)."""
    return _plan(layout, ledger, rs, now)[0]


def _plan(layout: RootLayout, ledger: Ledger, rs: Any, now: float) -> tuple[list[Item], dict[str, int]]:
    """(the items, the marks to record once they are removed: ``retention:<kind>_through``)."""
    items: list[Item] = []
    marks: dict[str, int] = {}
    for folder, days, key in ((layout.done, rs.done_days, "retention.done_days"),
                              (layout.failed, rs.failed_days, "retention.failed_days")):
        if not days:
            continue
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            try:
                age = now - e.stat(follow_symlinks=False).st_ctime
            except OSError:
                continue
            if age > days * DAY_S:
                items.append(Item("original", e.path, f"filed {age / DAY_S:.1f} days ago ({key} = {days:g})"))
    req_versions, req_batches = _requested(layout)
    hook_versions, hook_batches = hooks.pending_refs(layout)
    in_progress = ledger.unfinished()
    if rs.keep_adapters:
        try:
            current = int(os.readlink(layout.current))
        except (OSError, ValueError):
            current = None
        keep = {current, *req_versions, *hook_versions, *(b.parent_version for b in in_progress)}
        versions = ledger.versions(kept=True, newest_first=True)  # the kept ones and the newly published
        for v in versions[rs.keep_adapters:]:
            if v.n in keep or not os.path.lexists(layout.adapter_dir(v.n)):
                continue
            items.append(Item("adapter", str(layout.adapter_dir(v.n)), f"older than the newest {rs.keep_adapters} "
                              f"versions (retention.keep_adapters)", version=v.n))
    floor = min((b.id for b in in_progress), default=None)  # a mark never passes a batch still to finish
    if rs.keep_batch_dirs:
        why = f"older than the newest {rs.keep_batch_dirs} finished batches (retention.keep_batch_dirs)"
        held = req_batches | hook_batches

        def batch_items(b: Batch) -> list[Item] | None:
            if b.id in held:
                return None
            out = [Item("batch", str(layout.batch_dir(b.id)), why, batch=b.id)] \
                if os.path.lexists(layout.batch_dir(b.id)) else []
            if b.state is BatchState.REJECTED and os.path.lexists(layout.rejected_dir(b.id)):
                out.append(Item("rejected", str(layout.rejected_dir(b.id)), why + "; no longer promotable", batch=b.id))
            return out

        marks["batch_dirs"] = _aged_out(ledger, rs.keep_batch_dirs, "batch_dirs", floor, batch_items, items)
    if rs.keep_curves:
        why = f"older than the newest {rs.keep_curves} finished batches (retention.keep_curves)"

        def curve_items(b: Batch) -> list[Item]:
            run = layout.tensorboard / layout.batch_name(b.id)
            return [Item("curves", str(run), why, batch=b.id)] if os.path.lexists(run) else []

        marks["curves"] = _aged_out(ledger, rs.keep_curves, "curves", floor, curve_items, items)
    return items, marks


def _cutoff(ledger: Ledger, keep: int) -> int | None:
    """The id of the keep-th newest finished batch (the older ones are past the bound), or None."""
    newest = ledger.batches(*FINAL_STATES, limit=keep, newest_first=True)
    return newest[-1].id if len(newest) == keep else None


def _aged_out(ledger: Ledger, keep: int, what: str, floor: int | None,
              items_of: Callable[[Batch], list[Item] | None], items: list[Item]) -> int:
    """Add the items of the finished batches past the newest ``keep`` and above the mark; return
    the new mark: the highest id below which every finished batch was dealt with (a held one, or a
    batch still to finish, stops it there: it is looked at again next time)."""
    through = ledger.counter(f"retention:{what}_through")
    cutoff = _cutoff(ledger, keep)
    if cutoff is None:
        return through
    mark, blocked = through, False
    for b in ledger.batches_between(through, cutoff, *FINAL_STATES):
        blocked = blocked or (floor is not None and b.id > floor)
        got = items_of(b)
        if got is None:
            blocked = True
            continue
        items.extend(got)
        mark = mark if blocked else b.id
    return mark


def prune_attempt_rows(ledger: Ledger, keep: int, *, chunk: int = 2000) -> int:
    """``retention.keep_attempt_rows``: delete the attempt rows of finished batches past the newest
    ``keep``, at most ``chunk`` batches' worth per call (the loop's turn stays short); returns the
    rows deleted. The running totals stay (they count what happened, not the rows)."""
    cutoff = _cutoff(ledger, keep)
    if cutoff is None:
        return 0
    floor = min((b.id for b in ledger.unfinished()), default=cutoff)
    through = ledger.counter("retention:attempt_rows_through")
    upto = min(cutoff, floor, through + chunk + 1)
    if upto <= through + 1:
        return 0
    return ledger.delete_attempts(through, upto, FINAL_STATES, mark="retention:attempt_rows_through")
def describe(items: list[dict[str, Any]], sizes: list[int] | None = None) -> str:
    if not items:
        return "nothing to remove"
    lines = []
    for i, it in enumerate(items):
        size = f"{fmt_bytes(sizes[i]):>10}  " if sizes is not None else ""
        lines.append(f"  {size}{it['kind']:<8} {it['path']}  ({it['why']})")
    total = f", {fmt_bytes(sum(sizes))}" if sizes is not None else ""
    return f"{len(items)} item(s){total}:\n" + "\n".join(lines)


class Retention:
    """The daemon's (or, with ``direct``, a command's) side of retention, and the child that walks
    the root for the disk book (``book``: the daemon's; supervisor/diskbook.py)."""

    def __init__(self, layout: RootLayout, ledger: Ledger, log: Any, *, settings: Any = None,
                 settings_of: Callable[[], Any] | None = None, env: dict[str, str] | None = None,
                 direct: bool = False, book: Any = None):
        self.layout, self.ledger, self.log, self.env, self.direct = layout, ledger, log, env, direct
        self.settings_of = settings_of or (lambda: settings)
        self.book = book
        self.child: Child | None = None
        self._deleting = False          # the child runs a plan (no worker starts meanwhile)
        self._for_request = False       # ... asked by `trainerd gc`
        self._marks: dict[str, int] = {}  # recorded once the plan's child succeeded
        self._answer: dict[str, Any] | None = None
        self._next_apply = 0.0

    # --- the loop ------------------------------------------------------------------------

    def busy(self) -> bool:
        """A deleting child runs: the daemon starts no worker until it ends (seconds)."""
        return self.child is not None and self._deleting

    def worker_ended(self, now: float) -> None:
        """Told by the daemon as it reaps a worker: between workers is when retention runs. An event,
        not an edge seen by ``tick``: a worker that starts and ends between two of its ticks (a fast
        attempt), or while a disk measurement of ours runs, would otherwise wait the hourly apply."""
        self._next_apply = min(self._next_apply, now)

    def tick(self, now: float, *, idle: bool, stopping: bool) -> None:
        if self.child is not None:
            st = self.child.poll()
            if st is None:
                return
            self._ended(st, now)
        if stopping:
            return
        settings = self.settings_of()
        if idle and enabled(settings.retention) and now >= self._next_apply:
            self._next_apply = now + APPLY_EVERY_S
            self._prune_rows(settings.retention)
            items, marks = _plan(self.layout, self.ledger, settings.retention, now)
            if items:
                self._start(items, now, marks=marks)
                return
            self._record(marks)
        if self.book is not None and self.book.full_due(now):
            self._start([], now, measure=True)

    def wake_times(self, now: float) -> list[float]:
        if self.child is not None:
            return [now + 1.0]  # SIGCHLD wakes the loop when it ends; a backstop
        times = [] if self.book is None else [max(now, self.book.full_at + FULL_EVERY_S)]
        if enabled(self.settings_of().retention):
            times.append(self._next_apply)
        return times

    def close(self) -> None:
        if self.child is not None:
            self.child.kill_group()  # every removal is one rename-free unlink/rmtree: safe to cut
            self.child.wait(5.0)
            self.child = None
            if self.book is not None and self.book.walking:
                self.book.walk_ended(False)

    # --- `trainerd gc` ---------------------------------------------------------------------

    def request(self, *, dry_run: bool, now: float, running: Any = None) -> dict[str, Any]:
        """``trainerd gc [--dry-run]``: the plan (dry run), or apply it now."""
        settings = self.settings_of()
        rs = settings.retention
        if dry_run:
            items = [asdict(i) for i in plan(self.layout, self.ledger, rs, now)]
            return {"message": describe(items) if enabled(rs) else "retention is off (every retention.* is 0)",
                    "items": items, "retention": asdict(rs), "min_free_bytes": settings.disk.min_free_bytes}
        if self.direct:
            self._prune_rows(rs)
            items, marks = _plan(self.layout, self.ledger, rs, now)
            self.ledger.mark_removed([i.version for i in items if i.version is not None], now)
            removed, freed_by = apply_plan(self.layout, [asdict(i) for i in items],
                                           lambda ev, **kw: self.log.info(ev, **kw))
            self._record(marks)
            write_usage(self.layout, settings.disk.min_free_bytes, time.monotonic())
            freed = sum(freed_by.values())
            self.log.info("retention_applied", removed=removed, freed_bytes=freed, requested=True)
            return {"message": f"removed {removed} item(s), freed {fmt_bytes(freed) if freed else '0 B'}",
                    "removed": removed, "freed_bytes": freed}
        if self._answer is not None and self.child is None:
            answer, self._answer = self._answer, None
            return answer
        if self.child is not None:
            raise Waiting("removing what retention allows" if self._for_request else
                          "a disk measurement or retention run is under way; gc follows it")
        if not enabled(rs):
            return {"message": "retention is off (every retention.* is 0): nothing removed", "removed": 0,
                    "freed_bytes": 0}
        self._prune_rows(rs)
        items, marks = _plan(self.layout, self.ledger, rs, now)
        if not items:
            self._record(marks)
            return {"message": "nothing to remove", "removed": 0, "freed_bytes": 0}
        self._start(items, now, for_request=True, marks=marks)
        raise Waiting(f"removing {len(items)} item(s)")

    # --- plumbing --------------------------------------------------------------------------

    def _prune_rows(self, rs: Any) -> None:
        if rs.keep_attempt_rows:
            n = prune_attempt_rows(self.ledger, rs.keep_attempt_rows)
            if n:
                self.log.info("retention_rows_removed", table="attempts", rows=n,
                              why=f"older than the newest {rs.keep_attempt_rows} finished batches "
                                  "(retention.keep_attempt_rows)")

    def _record(self, marks: dict[str, int]) -> None:
        for what, through in marks.items():
            if through > self.ledger.counter(f"retention:{what}_through"):
                self.ledger.set_counter(f"retention:{what}_through", through)

    def _start(self, items: list[Item], now: float, *, for_request: bool = False, measure: bool = False,
               marks: dict[str, int] | None = None) -> None:
        settings = self.settings_of()
        argv = [sys.executable, "-m", "trainerd.supervisor.diskuse", str(self.layout.root),
                "--min-free-bytes", str(settings.disk.min_free_bytes)]
        if items:
            # Decide, then act: the ledger says the versions are gone on purpose before they are.
            self.ledger.mark_removed([i.version for i in items if i.version is not None], now)
            plan_file = self.layout.root / ".retention-plan.json"
            result_file = self.layout.root / ".retention-result.json"
            unlink_quietly(result_file)
            atomic_write_json(plan_file, {"items": [asdict(i) for i in items], "result": str(result_file),
                                          "made_at": now})
            argv += ["--plan", str(plan_file)]
            self.log.info("retention_started", items=len(items), requested=for_request,
                          kinds=sorted({i.kind for i in items}))
        if measure:
            argv.append("--measure")
        try:
            self.child = Child(argv, stderr_path=self.layout.logs / "diskuse.stderr",
                               log=self.log.bind(task="retention" if items else "disk_usage"), env=self.env,
                               cwd=self.layout.root)
        except OSError as e:
            self.log.error("retention_start_failed", error=str(e))
            if measure and self.book is not None:
                self.book.walk_ended(False)
            return
        self._deleting, self._for_request, self._marks = bool(items), for_request, dict(marks or {})
        if measure and self.book is not None:
            self.book.walk_started()

    def _ended(self, st: Any, now: float) -> None:
        deleting, for_request = self._deleting, self._for_request
        self.child, self._deleting, self._for_request = None, False, False
        if not deleting:
            if st.code != 0:
                self.log.error("disk_usage_failed", exit=st.describe(), stderr=str(self.layout.logs / "diskuse.stderr"))
            if self.book is not None:
                self.book.walk_ended(st.code == 0)
            return
        result = read_json_or_none(self.layout.root / ".retention-result.json") or {}
        removed, freed = result.get("removed", 0), result.get("freed_bytes", 0)
        if self.book is not None:
            self.book.take(result.get("freed_by_kind") or {})
        if st.code == 0:
            self._record(self._marks)
        (self.log.info if st.code == 0 else self.log.error)(
            "retention_applied", exit=st.describe(), removed=removed, freed_bytes=freed, requested=for_request)
        unlink_quietly(self.layout.root / ".retention-plan.json")
        if for_request:
            self._answer = {"message": f"removed {removed} item(s), freed {fmt_bytes(freed) if freed else '0 B'}"
                            + ("" if st.code == 0 else f" (the remover ended with {st.describe()})"),
                            "removed": removed, "freed_bytes": freed}
