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
  promotable exactly while its folder is kept.

Never deleted: ``current``; an adapter a batch in progress continues (its ``parent_version``); what a
pending request needs (a rollback's version, a promote's candidate and folder); what a pending publish
hook still has to show; a batch in progress (not finished); ``evalsets/``, ``replay/``, the curves and
the logs.

Applied by the daemon: the plan is made in its loop (ledger queries and one directory listing of
``done/`` and ``failed/``: milliseconds), versions are marked removed in the ledger first, then
``python -m trainerd.diskuse`` deletes the paths and measures the disk use for ``trainerd status``.
Automatically after every worker ends and at least once an hour, between workers (it holds the next
start while it deletes, seconds at most); at once on ``trainerd gc`` (a request; it may run beside a worker: nothing it deletes is
anything a worker reads). Without a daemon, ``trainerd gc`` applies it itself under the root's lock.
The disk use alone is re-measured every 10 minutes (that child only reads).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from trainerd.child import Child
from trainerd.contract import RootLayout
from trainerd.diskuse import apply_plan, write_usage
from trainerd.fsutil import atomic_write_json, fmt_bytes, read_json_or_none, unlink_quietly
from trainerd.ledger import Ledger
from trainerd.states import FINAL_STATES, BatchState
from trainerd.supervisor import hooks
from trainerd.supervisor.chain import Waiting

__all__ = ["Item", "Retention", "plan"]

APPLY_EVERY_S = 3600.0
MEASURE_EVERY_S = 600.0
DAY_S = 86400.0


@dataclass(frozen=True)
class Item:
    kind: str            # original | adapter | batch | rejected
    path: str
    why: str
    version: int | None = None
    batch: int | None = None


def enabled(rs: Any) -> bool:
    return bool(rs.done_days or rs.failed_days or rs.keep_adapters or rs.keep_batch_dirs)


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
    items: list[Item] = []
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
    in_progress = [b for b in ledger.batches() if b.state not in FINAL_STATES or b.finished_at is None]
    if rs.keep_adapters:
        try:
            current = int(os.readlink(layout.current))
        except (OSError, ValueError):
            current = None
        keep = {current, *req_versions, *hook_versions, *(b.parent_version for b in in_progress)}
        versions = sorted(ledger.adapter_versions(), key=lambda v: v.n, reverse=True)
        newest = {v.n for v in versions if v.removed_at is None}
        newest = set(sorted(newest, reverse=True)[: rs.keep_adapters])
        for v in versions:
            if v.n in newest or v.n in keep or not os.path.lexists(layout.adapter_dir(v.n)):
                continue
            items.append(Item("adapter", str(layout.adapter_dir(v.n)), f"older than the newest {rs.keep_adapters} "
                              f"versions (retention.keep_adapters)", version=v.n))
    if rs.keep_batch_dirs:
        finished = [b for b in ledger.batches(*FINAL_STATES, newest_first=True) if b.finished_at is not None]
        for b in finished[rs.keep_batch_dirs:]:
            if b.id in req_batches or b.id in hook_batches:
                continue
            why = f"older than the newest {rs.keep_batch_dirs} finished batches (retention.keep_batch_dirs)"
            if os.path.lexists(layout.batch_dir(b.id)):
                items.append(Item("batch", str(layout.batch_dir(b.id)), why, batch=b.id))
            if b.state is BatchState.REJECTED and os.path.lexists(layout.rejected_dir(b.id)):
                items.append(Item("rejected", str(layout.rejected_dir(b.id)), why + "; no longer promotable",
                                  batch=b.id))
    return items


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
    """The daemon's (or, with ``direct``, a command's) side of retention and disk measurement."""

    def __init__(self, layout: RootLayout, ledger: Ledger, log: Any, *, settings: Any = None,
                 settings_of: Callable[[], Any] | None = None, env: dict[str, str] | None = None,
                 direct: bool = False):
        self.layout, self.ledger, self.log, self.env, self.direct = layout, ledger, log, env, direct
        self.settings_of = settings_of or (lambda: settings)
        self.child: Child | None = None
        self._deleting = False          # the child runs a plan (no worker starts meanwhile)
        self._for_request = False       # ... asked by `trainerd gc`
        self._answer: dict[str, Any] | None = None
        self._next_apply = 0.0
        self._was_idle = True
        usage = read_json_or_none(layout.disk_usage) or {}
        self._next_measure = float(usage.get("measured_at") or 0.0) + MEASURE_EVERY_S

    # --- the loop ------------------------------------------------------------------------

    def busy(self) -> bool:
        """A deleting child runs: the daemon starts no worker until it ends (seconds)."""
        return self.child is not None and self._deleting

    def tick(self, now: float, *, idle: bool, stopping: bool) -> None:
        if self.child is not None:
            st = self.child.poll()
            if st is None:
                return
            self._ended(st, now)
        if idle and not self._was_idle:
            self._next_apply = min(self._next_apply, now)  # a worker just ended: between workers now
        self._was_idle = idle
        if stopping:
            return
        settings = self.settings_of()
        if idle and enabled(settings.retention) and now >= self._next_apply:
            self._next_apply = now + APPLY_EVERY_S
            items = plan(self.layout, self.ledger, settings.retention, now)
            if items:
                self._start(items, now)
                return
        if now >= self._next_measure:
            self._start([], now)

    def wake_times(self, now: float) -> list[float]:
        if self.child is not None:
            return [now + 1.0]  # SIGCHLD wakes the loop when it ends; a backstop
        times = [self._next_measure]
        if enabled(self.settings_of().retention):
            times.append(self._next_apply)
        return times

    def close(self) -> None:
        if self.child is not None:
            self.child.kill_group()  # every removal is one rename-free unlink/rmtree: safe to cut
            self.child.wait(5.0)
            self.child = None

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
            items = plan(self.layout, self.ledger, rs, now)
            self.ledger.mark_removed([i.version for i in items if i.version is not None], now)
            removed, freed = apply_plan(self.layout, [asdict(i) for i in items],
                                        lambda ev, **kw: self.log.info(ev, **kw))
            write_usage(self.layout, settings.disk.min_free_bytes, time.monotonic())
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
        items = plan(self.layout, self.ledger, rs, now)
        if not items:
            return {"message": "nothing to remove", "removed": 0, "freed_bytes": 0}
        self._start(items, now, for_request=True)
        raise Waiting(f"removing {len(items)} item(s)")

    # --- plumbing --------------------------------------------------------------------------

    def _start(self, items: list[Item], now: float, *, for_request: bool = False) -> None:
        settings = self.settings_of()
        argv = [sys.executable, "-m", "trainerd.diskuse", str(self.layout.root),
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
        try:
            self.child = Child(argv, stderr_path=self.layout.logs / "diskuse.stderr",
                               log=self.log.bind(task="retention" if items else "disk_usage"), env=self.env,
                               cwd=self.layout.root)
        except OSError as e:
            self.log.error("retention_start_failed", error=str(e))
            self._next_measure = now + MEASURE_EVERY_S
            return
        self._deleting, self._for_request = bool(items), for_request
        self._next_measure = now + MEASURE_EVERY_S

    def _ended(self, st: Any, now: float) -> None:
        deleting, for_request = self._deleting, self._for_request
        self.child, self._deleting, self._for_request = None, False, False
        if not deleting:
            if st.code != 0:
                self.log.error("disk_usage_failed", exit=st.describe(), stderr=str(self.layout.logs / "diskuse.stderr"))
            return
        result = read_json_or_none(self.layout.root / ".retention-result.json") or {}
        removed, freed = result.get("removed", 0), result.get("freed_bytes", 0)
        (self.log.info if st.code == 0 else self.log.error)(
            "retention_applied", exit=st.describe(), removed=removed, freed_bytes=freed, requested=for_request)
        unlink_quietly(self.layout.root / ".retention-plan.json")
        if for_request:
            self._answer = {"message": f"removed {removed} item(s), freed {fmt_bytes(freed) if freed else '0 B'}"
                            + ("" if st.code == 0 else f" (the remover ended with {st.describe()})"),
                            "removed": removed, "freed_bytes": freed}
