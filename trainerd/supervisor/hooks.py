"""Publish hooks: ``publish.hook`` run after every publish (promote and rollback too) and every
rejection, outside the supervisor's loop.

Recorded, then run. The moment a publish or a rejection is filed — in :meth:`.attempts.Attempts.end`
before the ledger finishes the batch, and in :meth:`.chain.Chain.publish_rollback` before the copy —
the event is written to ``root/hooks/pending/<ns>-<event>-<n>.json`` (atomically; the name is its
identity, so reconcile repeating a filing records it once). The daemon's loop runs the pending
events one at a time, oldest first, each as a child process in its own session that the loop only
polls (``Popen.poll``; SIGCHLD wakes it): a slow hook never delays the memory guard or systemd's
watchdog. The file is removed when the hook has ended — succeeded, failed, or killed at
``publish.hook_timeout_s`` — so a daemon that dies while a hook runs, or between a publish and its
hook, runs it at its next start: at least once, in order. A hook should therefore be idempotent
(loading an adapter already loaded is no error). A command that publishes with no daemon running
(``trainerd promote`` under the root's lock) records the event too; the next daemon runs it.

A hook's failure (an exit other than 0, a signal, the timeout, a missing executable) is logged with
its output and counted (ledger counter ``hook_failures``); it never undoes the publish. The hook
gets the daemon's environment (less its own TRAINERD_* settings) plus::

    TRAINERD_EVENT          published | rejected
    TRAINERD_ADAPTER_DIR    the new version's folder, absolute and resolved (a rejection: the candidate's)
    TRAINERD_VERSION        the new version ("" for a rejection)
    TRAINERD_PREVIOUS_VERSION the version that was current before it ("" for the first one or a rejection)
    TRAINERD_CURRENT_VERSION  the version current points at when the hook starts
    TRAINERD_BATCH, TRAINERD_FILE   the batch (for a rollback: the batch of the version copied) and its file
    TRAINERD_DECISION       blessed | ungated | forced | rollback | rejected
    TRAINERD_ROOT           the root

Its stdout and stderr go to ``root/hooks/output.log`` (each run replaces it) and, when it ends, its
last lines into the daemon's log (``hook_output``). A hook left running by a daemon that was killed
is killed by the next one (its pid is in ``hooks/running.json``) before the event runs again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from trainerd.core.contract import RootLayout
from trainerd.core.fsutil import atomic_write_json, read_json_or_none, unlink_quietly
from trainerd.supervisor.ledger.rows import Batch, decided_end
from trainerd.supervisor.ledger.states import BatchState

__all__ = ["Hooks", "pending", "pending_refs", "record_end", "record_version"]

KILL_GRACE_S = 5.0        # SIGTERM at the timeout, SIGKILL this much later
OUTPUT_TAIL_BYTES = 16 << 10
OUTPUT_TAIL_LINES = 40


def _pending_dir(layout: RootLayout) -> Path:
    return layout.hooks / "pending"


def _record(layout: RootLayout, identity: str, body: dict[str, Any]) -> Path | None:
    """Write one pending event, unless an event of this identity is already pending."""
    folder = _pending_dir(layout)
    folder.mkdir(mode=0o750, parents=True, exist_ok=True)
    if any(p.name.endswith(f"-{identity}.json") for p in folder.iterdir()):
        return None
    path = folder / f"{time.time_ns():020d}-{identity}.json"
    atomic_write_json(path, {**body, "recorded_at": time.time()})
    return path


def record_end(layout: RootLayout, batch: Batch) -> Path | None:
    """A decided end being filed: a publish (blessed, forced) or a rejection records its event."""
    final = batch.state if batch.finished_at is None else decided_end(batch)
    if final is BatchState.DONE and batch.adapter_version is not None:
        n = batch.adapter_version
        return _record(layout, f"published-{n}", {
            "event": "published", "version": n, "previous_version": n - 1 if n > 1 else None,
            "batch": batch.id, "file": batch.name, "decision": batch.decision or "blessed",
            "adapter_dir": str(layout.adapter_dir(n))})
    if final is BatchState.REJECTED:
        return _record(layout, f"rejected-{batch.id}", {
            "event": "rejected", "version": None, "previous_version": None, "batch": batch.id,
            "file": batch.name, "decision": "rejected", "adapter_dir": str(layout.rejected_dir(batch.id))})
    return None


def record_version(layout: RootLayout, n: int, batch_id: int, file: str | None, decision: str) -> Path | None:
    """A version published outside a batch's end (a rollback's copy)."""
    return _record(layout, f"published-{n}", {
        "event": "published", "version": n, "previous_version": n - 1 if n > 1 else None, "batch": batch_id,
        "file": file, "decision": decision, "adapter_dir": str(layout.adapter_dir(n))})


def pending(layout: RootLayout) -> list[Path]:
    """Pending events, oldest first."""
    try:
        return sorted(p for p in _pending_dir(layout).iterdir() if p.suffix == ".json" and not p.name.startswith("."))
    except FileNotFoundError:
        return []


def pending_refs(layout: RootLayout) -> tuple[set[int], set[int]]:
    """(versions, batches) a pending hook still has to show its folder to: retention keeps them."""
    versions, batches = set(), set()
    for p in pending(layout):
        ev = read_json_or_none(p) or {}
        if ev.get("event") == "published" and isinstance(ev.get("version"), int):
            versions.add(ev["version"])
        elif ev.get("event") == "rejected" and isinstance(ev.get("batch"), int):
            batches.add(ev["batch"])
    return versions, batches


def _group_lives(pid: int, create_time: float | None) -> bool:
    """Whether the hook's process group still has a member: its leader (the same process, by
    start time), or — the leader gone — any process still in group ``pid``. While a member
    lives the kernel reuses ``pid`` neither as a process nor as a group id, so those are the
    hook's; a live process with that pid but another start time is a stranger, and so is its group."""
    try:
        leader = psutil.Process(pid)
        if create_time is not None and abs(leader.create_time() - create_time) >= 0.01:
            return False
        if leader.status() != psutil.STATUS_ZOMBIE:
            return True
    except psutil.NoSuchProcess:
        pass
    except psutil.Error:
        return False
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pid:
                return True
        except OSError:
            pass
    return False


class _Run:
    def __init__(self, event_file: Path, event: dict[str, Any], proc: subprocess.Popen, started: float,
                 deadline: float, create_time: float | None):
        self.event_file, self.event, self.proc = event_file, event, proc
        self.started, self.deadline, self.create_time = started, deadline, create_time
        self.killed_at: float | None = None
        self.timed_out = False


class Hooks:
    """The daemon's side: run pending events one at a time; poll, never wait."""

    def __init__(self, layout: RootLayout, log: Any, *, settings_of: Callable[[], Any],
                 bump: Callable[[str], int] | None = None, env: dict[str, str] | None = None):
        self.layout, self.log = layout, log
        self.settings_of = settings_of      # the daemon's current Settings (reload replaces them)
        self.bump = bump                    # ledger.bump: counts runs and failures
        self.env = env
        self.run: _Run | None = None
        self._stop_leftover()

    # --- the loop's calls ------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Poll the running hook (kill it at its timeout); start the next pending one."""
        if self.run is not None:
            self._poll(now)
        if self.run is None:
            self._start_next(now)

    def wake_times(self, now: float) -> list[float]:
        r = self.run
        if r is None:
            return []
        # SIGCHLD wakes the loop when it ends; these are the timeout's steps and a backstop.
        return [r.deadline if r.killed_at is None else r.killed_at + KILL_GRACE_S, now + 1.0]

    def close(self) -> None:
        """The daemon stops: end a running hook (its event stays pending and runs next start)."""
        r = self.run
        if r is None:
            return
        self._signal(r, signal.SIGTERM)
        try:
            r.proc.wait(2.0)
        except subprocess.TimeoutExpired:
            pass
        # The whole group, also when its leader ended on SIGTERM: a helper of the hook that
        # ignores SIGTERM would otherwise outlive running.json and race the event's rerun. (A
        # group id is not reused while any member lives, so this reaches no stranger.)
        self._signal(r, signal.SIGKILL)
        try:
            r.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        self.log.warning("hook_interrupted", **_fields(r.event),
                         hint="the daemon is stopping; the hook runs again at its next start")
        unlink_quietly(self.layout.hooks / "running.json")
        self.run = None

    # --- running one -----------------------------------------------------------------------

    def _start_next(self, now: float) -> None:
        queue = pending(self.layout)
        if not queue:
            return
        path = queue[0]
        event = read_json_or_none(path)
        settings = self.settings_of()
        argv = list(settings.publish.hook or [])
        if event is None:
            self.log.error("hook_event_unreadable", file=str(path))
            unlink_quietly(path)
            return
        fields = _fields(event)
        if not argv:
            self.log.debug("hook_skipped", reason="no publish.hook configured", **fields)
            unlink_quietly(path)
            return
        adapter_dir = Path(event.get("adapter_dir") or "")
        if not adapter_dir.is_dir():
            self.log.error("hook_skipped", reason=f"the adapter folder is gone: {adapter_dir}", **fields)
            self._count_failure()
            unlink_quietly(path)
            return
        # The daemon's environment without its own TRAINERD_* settings (a worker command, a fault
        # injection): the hook's TRAINERD_* are exactly the ones describing its event.
        env = {k: v for k, v in (self.env if self.env is not None else os.environ).items()
               if not k.startswith("TRAINERD_")}
        env.update(_environment(self.layout, event, adapter_dir))
        out = self.layout.hooks / "output.log"
        try:
            with open(out, "wb") as f:
                # Own session: the loop signals the whole group at the timeout; stdin is /dev/null
                # (a hook that waits for input would only hang until its timeout).
                proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                        cwd=self.layout.root, start_new_session=True, close_fds=True)
        except OSError as e:
            self.log.error("hook_failed", argv=argv, error=str(e), **fields, hint="the publish stands; fix publish.hook")
            self._count_failure()
            unlink_quietly(path)
            return
        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            create_time = None
        timeout = settings.publish.hook_timeout_s
        self.run = _Run(path, event, proc, now, now + timeout, create_time)
        atomic_write_json(self.layout.hooks / "running.json",
                          {"pid": proc.pid, "create_time": create_time, "event_file": path.name}, durable=False)
        if self.bump:
            self.bump("hook_runs")
        self.log.info("hook_started", pid=proc.pid, argv=argv, timeout_s=timeout, **fields)

    def _poll(self, now: float) -> None:
        r = self.run
        assert r is not None
        rc = r.proc.poll()
        if rc is None:
            if r.killed_at is None and now >= r.deadline:
                r.timed_out, r.killed_at = True, now
                self.log.error("hook_timed_out", pid=r.proc.pid, timeout_s=round(r.deadline - r.started, 3),
                               **_fields(r.event), action="SIGTERM to its group, SIGKILL after 5 s")
                self._signal(r, signal.SIGTERM)
            elif r.killed_at is not None and now >= r.killed_at + KILL_GRACE_S:
                self._signal(r, signal.SIGKILL)
            return
        # Its group may hold a grandchild it left behind: it goes with the hook.
        self._signal(r, signal.SIGKILL)
        self.run = None
        elapsed = round(now - r.started, 3)
        fields = _fields(r.event)
        for line in _tail(self.layout.hooks / "output.log"):
            self.log.info("hook_output", text=line, **fields)
        if rc == 0 and not r.timed_out:
            self.log.info("hook_succeeded", elapsed_s=elapsed, **fields)
        else:
            how = f"timed out after {elapsed} s (publish.hook_timeout_s)" if r.timed_out else (
                f"exit code {rc}" if rc >= 0 else f"signal {-rc}")
            total = self._count_failure()
            self.log.error("hook_failed", reason=how, elapsed_s=elapsed, hook_failures=total, **fields,
                           output=str(self.layout.hooks / "output.log"), hint="the publish stands")
        unlink_quietly(self.layout.hooks / "running.json")
        unlink_quietly(r.event_file)

    def _count_failure(self) -> int | None:
        return self.bump("hook_failures") if self.bump else None

    @staticmethod
    def _signal(r: _Run, sig: int) -> None:
        try:
            os.killpg(r.proc.pid, sig)  # the hook leads its own group (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass

    def _stop_leftover(self) -> None:
        """A hook a killed daemon left running would race the rerun of its event: end it first."""
        info = read_json_or_none(self.layout.hooks / "running.json")
        if not info or not isinstance(info.get("pid"), int):
            return
        pid = info["pid"]
        if _group_lives(pid, info.get("create_time")):
            self.log.warning("leftover_hook_stopped", pid=pid, event_file=info.get("event_file"))
            for sig, wait_s in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
                try:
                    os.killpg(pid, sig)
                except (ProcessLookupError, PermissionError):
                    break
                deadline = time.monotonic() + wait_s
                while _group_lives(pid, info.get("create_time")) and time.monotonic() < deadline:
                    time.sleep(0.05)  # start-up, before the loop exists
        unlink_quietly(self.layout.hooks / "running.json")


def _fields(event: dict[str, Any]) -> dict[str, Any]:
    return {"hook_event": event.get("event"), "version": event.get("version"), "batch": event.get("batch"),
            "decision": event.get("decision")}


def _environment(layout: RootLayout, event: dict[str, Any], adapter_dir: Path) -> dict[str, str]:
    try:
        current = os.readlink(layout.current)
    except OSError:
        current = ""
    blank = lambda v: "" if v is None else str(v)  # noqa: E731
    return {"TRAINERD_EVENT": str(event.get("event")), "TRAINERD_ADAPTER_DIR": os.path.realpath(adapter_dir),
            "TRAINERD_VERSION": blank(event.get("version")),
            "TRAINERD_PREVIOUS_VERSION": blank(event.get("previous_version")),
            "TRAINERD_CURRENT_VERSION": current, "TRAINERD_BATCH": blank(event.get("batch")),
            "TRAINERD_FILE": blank(event.get("file")), "TRAINERD_DECISION": blank(event.get("decision")),
            "TRAINERD_ROOT": str(layout.root)}


def _tail(path: Path) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - OUTPUT_TAIL_BYTES))
            data = f.read()
    except OSError:
        return []
    lines = [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return [ln[:1000] for ln in lines[-OUTPUT_TAIL_LINES:]]
