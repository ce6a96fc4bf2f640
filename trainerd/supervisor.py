"""The supervisor: inbox -> ledger -> one worker at a time, and everything that can go wrong.

One thread does all the work (:meth:`Supervisor.tick`); it takes ``now`` as an argument so
tests drive time without sleeping (huey style). Signal handlers only record the signal and
wake the loop through the wakeup pipe (neither logging nor killing is safe inside a handler).
Two helper threads exist: watchdog's inotify observer, which only writes a byte to the same
wakeup pipe (a hint: the folder is the truth), and the relay of the worker's stdout.

Queue discipline is strict FIFO: the oldest queued batch blocks the ones behind it, even
while it waits out a crash back-off. Each batch continues from ``adapters/current``; letting
a younger batch overtake would publish an adapter trained from an older base over it.

Never imports torch: it must stay small and never be the process the kernel kills.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import select
import shutil
import signal
import stat
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import psutil

from trainerd import config as config_mod
from trainerd.child import Child, ExitStatus, worker_command
from trainerd.config import ConfigError, Settings
from trainerd.fsutil import atomic_write_json, fsync_dir, write_ballast
from trainerd.inbox import Inbox, Rejected
from trainerd.ledger import Layout, Ledger
from trainerd.logs import get_logger
from trainerd.memguard import MemoryGuard
from trainerd.planning import back_off
from trainerd.sdnotify import Notifier
from trainerd.states import ACTIVE_STATES, BatchState

__all__ = ["AlreadyRunning", "EX_CONFIG", "EX_DATAERR", "EX_OK", "EX_TEMPFAIL", "Supervisor",
           "back_off"]

# Worker exit codes (sysexits.h), the contract in docs/architecture.md.
EX_OK = 0
EX_DATAERR = 65
EX_TEMPFAIL = 75
EX_CONFIG = 78

_HINT_SCAN_MIN_S = 0.1

# A ballast file under the root keeps this much of its file system for the ledger (see
# _keep_reserve): when the disk fills, SQLite must still be able to record what happened.
_RESERVE_BYTES = 1 << 20

# Stop reasons after which the batch resumes at once (no back-off, no retry charged).
_RESUME_AT_ONCE = ("recycle", "parent_gone", "shutdown")


class AlreadyRunning(RuntimeError):
    """Another supervisor holds the root's lock: two writers would corrupt the ledger's story."""


@dataclass
class _Running:
    batch_id: int
    attempt: int
    name: str
    batch_dir: Path
    publish_dir: Path
    child: Child
    started_at: float
    log: Any
    # Why trainerd itself asked the worker to stop ("shutdown", "memory", "recycle"), so that
    # an exit caused by our own SIGTERM/SIGKILL is not mistaken for a crash or an OOM kill.
    stop_cause: str | None = None
    kill_at: float | None = None  # SIGKILL the group at this time (stop grace expired)
    oom_kills_at_start: int | None = None  # the kernel's OOM kill count (/proc/vmstat) at start
    next_guard_poll: float = 0.0


class Supervisor:
    """Owns ``root``: the single writer of the ledger and the parent of every worker."""

    def __init__(self, settings: Settings, *, config_path: str | os.PathLike[str] | None = None,
                 worker_cmd: list[str] | str | None = None, log: Any = None,
                 env: dict[str, str] | None = None):
        settings.root = str(Path(settings.root).resolve())
        self.settings = settings
        self.config_path = config_path
        self.worker_cmd = worker_command(worker_cmd)
        self.env = env
        self.log = log if log is not None else get_logger()
        self.layout = Layout(settings.root)
        self.ledger: Ledger | None = None
        self.running: _Running | None = None
        self.paused = False
        self.stopping = False
        self.finished = False
        self._lock_fd: int | None = None
        self._pending_signals: list[int] = []
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._scan_due = 0.0  # next periodic rescan
        self._last_scan = -1e18
        self._guard_stale = False
        self._start_blocked_until = 0.0
        self._hinted = True
        self._inbox_recheck: float | None = None
        self._next_ping: float | None = None
        self._disk_low = False
        self._unmovable: set[tuple[str, Any]] = set()  # rejected inbox entries we could not move
        self._waiting_logged: int | None = None
        self._state_text = ""
        self.notifier = Notifier.from_env(unset_environment=True)
        self.guard = MemoryGuard(settings.memory, log=self.log)
        self.inbox = Inbox(self.layout.inbox, settle_s=settings.supervisor.settle_s, log=self.log)

    # --- life cycle ----------------------------------------------------------------------

    def open(self, now: float | None = None) -> None:
        """Create the folders, take the root's lock, open the ledger and reconcile."""
        now = time.time() if now is None else now
        self.layout.make()
        self._take_lock()
        self.ledger = Ledger(self.layout.db)
        self.log.info("supervisor_starting", root=str(self.layout.root), pid=os.getpid(),
                      worker_cmd=" ".join(self.worker_cmd))
        self.reconcile(now)

    def close(self) -> None:
        self.inbox.stop_watching()
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        if self._lock_fd is not None:
            try:
                os.unlink(self.layout.daemon)
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = None

    def _take_lock(self) -> None:
        import fcntl

        fd = os.open(self.layout.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise AlreadyRunning(f"another trainerd (pid {other or '?'}) is running on {self.layout.root}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code (0 after a graceful stop)."""
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The C-level handler writes to this pipe; the Python-level handler only records.
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._record_signal)
        try:
            self.open()
            try:
                self.inbox.start_watching(self._hint)
                self._watch_root()
            except OSError as e:
                # inotify unavailable (NFS, fs.inotify.max_user_watches exhausted): the
                # periodic rescan alone still finds every file, only later.
                self.log.warning("inotify_unavailable", error=str(e), rescan_s=self.settings.supervisor.rescan_s)
                self.inbox.stop_watching()
            now = time.time()
            self._scan(now)
            self.notifier.ready(status=self._describe_state())
            self.log.info("supervisor_ready", paused=self.paused,
                          watchdog_interval_s=self.notifier.watchdog_interval_s())
            while not self.finished:
                now = time.time()
                wake_at = self.tick(now)
                if self.finished:
                    break
                timeout = None if wake_at is None else max(0.0, wake_at - time.time())
                try:
                    select.select([self._wake_r], [], [], timeout)
                except InterruptedError:  # PEP 475 retries, but be explicit about EINTR
                    pass
                self._drain_wakeups()
            self.log.info("supervisor_stopped")
            return 0
        except Exception:
            self.log.exception("supervisor_crashed")
            raise
        finally:
            signal.set_wakeup_fd(-1)
            if self.running is not None:
                # Only after an exception. Let the worker checkpoint (it would also stop on its
                # lifeline, but then the next start has to wait for it); kill it if it hangs.
                child = self.running.child
                child.send(signal.SIGTERM, by="supervisor")
                if child.wait(self.settings.supervisor.stop_grace_s) is None:
                    child.kill_group(by="supervisor")
                    child.wait(5.0)
            self.close()

    def _record_signal(self, signum: int, _frame: Any) -> None:
        self._pending_signals.append(signum)

    def _hint(self) -> None:
        """Called from watchdog's thread: note it and wake the main loop (a write is thread-safe)."""
        self._hinted = True
        if self._wake_w is not None:
            try:
                os.write(self._wake_w, b"h")
            except OSError:  # EAGAIN: the pipe is full, the loop will wake anyway
                pass

    def _drain_wakeups(self) -> None:
        if self._wake_r is None:
            return
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _watch_root(self) -> None:
        """Wake at once when the operator creates or removes ``root/.stop``."""
        from watchdog.events import FileSystemEventHandler

        stop_name = self.layout.stop.name
        hint = self._hint

        class _StopFile(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                paths = (getattr(event, "src_path", ""), getattr(event, "dest_path", ""))
                if any(os.path.basename(str(p)) == stop_name for p in paths if p):
                    hint()

        observer = self.inbox._observer
        if observer is not None:
            observer.schedule(_StopFile(), str(self.layout.root), recursive=False)

    # --- the loop ------------------------------------------------------------------------

    def tick(self, now: float) -> float | None:
        """Do everything that is due at ``now``; return when to be called next (None = on an event).

        ``now`` is wall-clock seconds (it is stored in the ledger: back-off deadlines must
        survive a restart). The memory guard gets the same ``now``; it only compares its own
        samples with each other, so one consistent clock is all it needs. A wall-clock step
        (NTP) distorts one growth-rate estimate at worst.
        """
        assert self.ledger is not None, "call open() first"
        if self.running is None or self.running.child.poll() is not None:
            self._keep_reserve()  # before this tick writes: claims, an exit's settlement
        self._handle_signals(now)
        self._check_pause(now)
        if self.running is not None:
            self._supervise(now)
        if self.stopping and self.running is None:
            self.finished = True
            return None
        # inotify hints arrive per write while a big file is copied in: at most one hinted
        # scan per _HINT_SCAN_MIN_S, the periodic rescan regardless.
        hinted = self._hinted and now >= self._last_scan + _HINT_SCAN_MIN_S
        if hinted or now >= self._scan_due or (self._inbox_recheck is not None and now >= self._inbox_recheck):
            self._scan(now)
        if self.running is None and not self.stopping:
            self._maybe_start(now)
        self._ping_watchdog(now)
        self._publish_state()
        return self._next_wake(now)

    def _next_wake(self, now: float) -> float:
        times = [self._scan_due]
        if self._hinted:
            times.append(self._last_scan + _HINT_SCAN_MIN_S)
        if self._inbox_recheck is not None:
            times.append(self._inbox_recheck)
        if self._next_ping is not None:
            times.append(self._next_ping)
        r = self.running
        if r is not None:
            times.append(r.next_guard_poll)
            if r.kill_at is not None:
                times.append(r.kill_at)
            # SIGCHLD wakes us when the worker exits; this is only a backstop.
            times.append(now + 1.0)
        elif not self.paused and not self.stopping:
            head = self.ledger.next_queued() if self.ledger else None
            if head is not None and head["next_attempt_at"] > now:
                times.append(head["next_attempt_at"])
        return max(now, min(times))

    def _handle_signals(self, now: float) -> None:
        while self._pending_signals:
            sig = self._pending_signals.pop(0)
            if sig == signal.SIGCHLD:
                continue  # only a wake-up: _supervise reaps
            if sig == signal.SIGHUP:
                self.reload()
            elif sig in (signal.SIGTERM, signal.SIGINT):
                self.request_stop(now, signal.Signals(sig).name)

    def request_stop(self, now: float, why: str = "request") -> None:
        """First call: stop the worker gracefully (grace, then SIGKILL). Second call: at once."""
        r = self.running
        if not self.stopping:
            self.stopping = True
            self.log.info("shutdown_requested", signal=why, worker_running=r is not None,
                          stop_grace_s=self.settings.supervisor.stop_grace_s)
            self.notifier.stopping(status="stopping: checkpointing the running batch" if r else "stopping")
            if r is not None:
                r.stop_cause = "shutdown"
                # SIGTERM to the worker only (not its group): it checkpoints and exits 75, and
                # stops its own helpers. The whole group gets SIGKILL if the grace runs out.
                r.child.send(signal.SIGTERM, by="supervisor")
                r.kill_at = now + self.settings.supervisor.stop_grace_s
            return
        self.log.warning("shutdown_forced", signal=why)
        if r is not None:
            r.stop_cause = "shutdown"
            r.child.kill_group(by="supervisor")
            r.kill_at = None

    def reload(self) -> None:
        """SIGHUP: load the config again for the next attempts; a bad file keeps the old one."""
        if self.config_path is None:
            self.log.warning("config_reload_skipped", reason="started without a config file")
            return
        self.notifier.reloading()
        try:
            new = config_mod.load(self.config_path)
        except ConfigError as e:
            self.log.error("config_reload_failed", config=str(self.config_path), problems=e.problems)
            self.notifier.ready(status=self._describe_state())
            return
        new.root = str(Path(new.root).resolve())
        if new.root != self.settings.root:
            self.log.warning("config_root_change_ignored", root=self.settings.root, new_root=new.root,
                             hint="restart trainerd to move its root")
            new.root = self.settings.root
        self.settings = new
        self.inbox.settle_s = new.supervisor.settle_s
        self._guard_stale = True  # rebuilt with the new memory settings before the next attempt
        self.log.info("config_reloaded", config=str(self.config_path))
        self.notifier.ready(status=self._describe_state())

    def _check_pause(self, now: float) -> None:
        paused = os.path.lexists(self.layout.stop)
        if paused == self.paused:
            return
        self.paused = paused
        if paused:
            self.log.info("paused", stop_file=str(self.layout.stop), worker_running=self.running is not None)
        else:
            self.log.info("resumed")
        self._scan_due = now  # look at the queue again right away

    def _ping_watchdog(self, now: float) -> None:
        interval = self.settings.supervisor.watchdog_ping_s or None
        wd = self.notifier.watchdog_interval_s()
        if wd:
            interval = min(interval or wd / 2, wd / 2)
        if not interval:
            self._next_ping = None
            return
        if self._next_ping is None or now >= self._next_ping:
            self.notifier.watchdog()
            self._next_ping = now + interval

    # --- daemon state for status and systemd ---------------------------------------------

    def _describe_state(self) -> str:
        r = self.running
        if self.stopping:
            return "stopping"
        if r is not None:
            return f"training batch {r.batch_id} ({r.name}), attempt {r.attempt}" + (
                " (pausing)" if self.paused else "")
        if self.paused:
            return "paused (remove .stop to resume)"
        if self._disk_low:
            return "waiting for free disk space"
        head = self.ledger.next_queued() if self.ledger else None
        if head is not None and head["next_attempt_at"] > time.time():
            return f"waiting to retry batch {head['id']} ({head['name']})"
        return "idle, watching the inbox"

    def _publish_state(self) -> None:
        text = self._describe_state()
        if text == self._state_text:
            return
        self._state_text = text
        self.notifier.status(text)
        r = self.running
        # Not fsynced: a status hint, rewritten on every change; losing it on power loss is fine.
        self._guarded("daemon_state_unwritable", partial(atomic_write_json, durable=False), self.layout.daemon, {
            "pid": os.getpid(), "state": text, "paused": self.paused, "stopping": self.stopping,
            "disk_low": self._disk_low, "updated_at": time.time(),
            "running": None if r is None else {"batch": r.batch_id, "attempt": r.attempt,
                                               "pid": r.child.pid, "started_at": r.started_at},
        })

    # --- inbox ---------------------------------------------------------------------------

    def _scan(self, now: float) -> None:
        self._hinted = False
        self._last_scan = now
        self._scan_due = now + self.settings.supervisor.rescan_s
        assert self.ledger is not None
        # A claim that hit an error (disk full, EIO) stays CLAIMING; finish it when we can.
        for b in self.ledger.batches(BatchState.CLAIMING):
            self._guarded("claim_failed", self._complete_claim, b["id"], b["name"], now, file=b["name"])
        ready, rejected, recheck = self.inbox.scan(now)
        self._inbox_recheck = recheck
        for rej in rejected:
            self._guarded("inbox_entry_unmovable", self._reject_entry, rej, now, file=rej.name)
        for name in ready:
            self._guarded("claim_failed", self.claim, name, now, file=name)

    def _keep_reserve(self) -> None:
        """Hold ``root/.disk-reserve`` (1 MiB of real blocks) while space allows; release it as
        soon as the file system is nearly full, so the ledger's next commits have room (no
        SQLITE_FULL crash) and the batch can be requeued as ``disk_full``. Called only while no
        worker runs, so a worker cannot eat the released room before the ledger uses it; made
        again once free space is back above ``disk.min_free_bytes`` plus a margin."""
        path = self.layout.root / ".disk-reserve"
        try:
            st = os.statvfs(self.layout.root)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        have = os.path.exists(path)
        if have and free < _RESERVE_BYTES:
            try:
                os.unlink(path)
            except OSError:
                return
            self._disk_low = True
            self.log.error("disk_reserve_released", free_bytes=free, released_bytes=_RESERVE_BYTES,
                           action="the file system is full: no new attempt until space is back")
        elif not have and free > 4 * _RESERVE_BYTES + self.settings.disk.min_free_bytes:
            write_ballast(path, _RESERVE_BYTES)

    def _guarded(self, event: str, fn: Callable[..., Any], *args: Any, **fields: Any) -> Any:
        """Run a file-system step; an OSError (ENOSPC, EIO, EACCES) is logged, not fatal: the
        ledger says where the step stopped and the next scan or start retries it."""
        try:
            return fn(*args)
        except OSError as e:
            self.log.error(event, error=str(e), errno=errno.errorcode.get(e.errno or 0, e.errno), **fields)
            return None

    def _reject_entry(self, rej: Rejected, now: float) -> None:
        """Move a non-regular ``*.jsonl`` entry to failed/ without ever opening it."""
        dest_name = self._free_name(self.layout.failed, rej.name, f"rejected-{int(now)}")
        src = self.layout.inbox / rej.name
        try:
            os.rename(src, self.layout.failed / dest_name)  # rename never follows a symlink
        except OSError as e:
            # E.g. another user's directory (moving it needs write access to the directory
            # itself). Say so once per entry, not on every rescan; it stays, never read.
            key = (rej.name, _safe_call(lambda: os.lstat(src).st_ino))
            if key not in self._unmovable:
                self._unmovable.add(key)
                self.log.error("inbox_entry_unmovable", file=rej.name, kind=rej.kind, reason=rej.reason,
                               error=str(e), hint="it is left in the inbox, unread; remove it by hand")
            return
        atomic_write_json(self.layout.failed / f"{dest_name}.error.json", {
            "file": rej.name, "reason": rej.reason, "kind": rej.kind, "failed_at": now})
        self.log.error("inbox_entry_rejected", file=rej.name, kind=rej.kind, reason=rej.reason,
                       moved_to=str(self.layout.failed / dest_name))

    def claim(self, name: str, now: float) -> int | None:
        """Take a finished inbox file: ledger row first, then the rename, then the hash."""
        assert self.ledger is not None
        src = self.layout.inbox / name
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None  # changed under us; the next scan rejects it
        if st.st_nlink > 1:
            self.log.warning("inbox_file_hard_linked", file=name, links=st.st_nlink,
                             hint="another name can still change these bytes while they train")
        batch_id = self.ledger.begin_claim(name, st.st_size, now)
        self.inbox.forget(name)
        self._complete_claim(batch_id, name, now)
        return batch_id

    def _complete_claim(self, batch_id: int, name: str, now: float) -> None:
        """CLAIMING -> QUEUED or SKIPPED. Idempotent: reconcile calls it after a crash at any point."""
        assert self.ledger is not None
        log = self.log.bind(batch=batch_id)
        bdir = self.layout.batch_dir(batch_id)
        data = bdir / "data.jsonl"
        if not os.path.lexists(data):
            bdir.mkdir(mode=0o750, parents=True, exist_ok=True)
            try:
                # The claim itself: atomic, same file system, the bytes never copied. If the
                # entry was swapped for a symlink since lstat, rename moves the link, unread.
                os.rename(self.layout.inbox / name, data)
            except FileNotFoundError:
                self.ledger.forget_claim(batch_id)
                shutil.rmtree(bdir, ignore_errors=True)
                log.warning("claim_vanished", file=name, reason="the file left the inbox before it was claimed")
                return
            fsync_dir(self.layout.inbox)
            fsync_dir(bdir)
        try:
            sha, size = _sha256(data)
        except OSError as e:
            reason = f"cannot read the claimed file: {e.strerror or e}"
            self.ledger.fail(batch_id, BatchState.CLAIMING, reason, now)  # CLAIMING -> FAILED
            log.error("batch_failed", file=name, reason=reason)
            self._finish_failed(self.ledger.batch(batch_id))
            return
        dup = self.ledger.find_by_sha(sha, ACTIVE_STATES, batch_id)
        if dup is not None:
            self.ledger.skip_duplicate(batch_id, sha, dup["id"], now)  # CLAIMING -> SKIPPED
            log.warning("duplicate_skipped", file=name, sha256=sha, duplicate_of=dup["id"],
                        duplicate_of_file=dup["name"], duplicate_of_state=dup["state"],
                        reason="this content was already trained or is queued; not training it twice")
            self._finish_skipped(self.ledger.batch(batch_id))
            return
        self.ledger.finish_claim(batch_id, sha, size, now)  # CLAIMING -> QUEUED
        log.info("batch_queued", file=name, sha256=sha, size_bytes=size)

    # --- starting a worker ---------------------------------------------------------------

    def _maybe_start(self, now: float) -> None:
        assert self.ledger is not None
        if self.paused:
            return
        head = self.ledger.next_queued()
        if head is None or now < self._start_blocked_until:
            return
        if head["next_attempt_at"] > now:
            if self._waiting_logged != head["id"]:
                self._waiting_logged = head["id"]
                self.log.info("retry_waiting", batch=head["id"], retry_in_s=round(head["next_attempt_at"] - now, 3))
            return
        free = shutil.disk_usage(self.layout.root).free
        if free < self.settings.disk.min_free_bytes:
            if not self._disk_low:
                self._disk_low = True
                self.log.error("disk_low", free_bytes=free, min_free_bytes=self.settings.disk.min_free_bytes,
                               batch=head["id"], action="waiting; the batch stays queued")
            return
        if self._disk_low:
            self._disk_low = False
            self.log.info("disk_ok", free_bytes=free)
        if self._guard_stale:
            self._guard_stale = False
            self.guard = MemoryGuard(self.settings.memory, log=self.log)
        try:
            self.start(head, now)
        except OSError as e:
            # Before the worker exists (settings.json, folders): the batch is still QUEUED.
            self.log.error("worker_start_failed", batch=head["id"], error=str(e),
                           retry_in_s=self.settings.supervisor.rescan_s)
            self._start_blocked_until = now + self.settings.supervisor.rescan_s

    def start(self, batch: dict[str, Any], now: float) -> None:
        """QUEUED -> RUNNING: write the attempt's settings and start the worker."""
        assert self.ledger is not None
        bid = batch["id"]
        log = self.log.bind(batch=bid)
        bdir = self.layout.batch_dir(bid)
        if not (bdir / "data.jsonl").is_file():
            reason = f"the claimed data is missing: {bdir / 'data.jsonl'}"
            self.ledger.fail(bid, BatchState.QUEUED, reason, now)  # QUEUED -> FAILED
            log.error("batch_failed", file=batch["name"], reason=reason)
            self._finish_failed(self.ledger.batch(bid))
            return
        if batch["micro_batch_size"] is None:
            batch = self._plan(batch, now, log)
        settings = copy.deepcopy(self.settings)
        settings.train.micro_batch_size = batch["micro_batch_size"]
        settings.train.grad_accum_steps = batch["grad_accum_steps"]
        settings.train.gradient_checkpointing = bool(batch["gradient_checkpointing"])
        config_mod.dump_json(settings, bdir / "settings.json")
        # Leftovers of the previous attempt would be misread as this one's answer.
        publish = bdir / "published"
        for stale in (bdir / "result.json", bdir / ".stop"):
            try:
                os.unlink(stale)
            except FileNotFoundError:
                pass
        shutil.rmtree(publish, ignore_errors=True)
        latest = self.ledger.latest_version()
        init_adapter = self.layout.adapter_dir(latest["n"]) if latest else None
        n = self.ledger.start_attempt(bid, now, str(init_adapter) if init_adapter else None)  # QUEUED -> RUNNING
        alog = log.bind(attempt=n)
        argv = [*self.worker_cmd, str(bdir)]
        if init_adapter is not None:
            argv += ["--init-adapter", str(init_adapter)]
        argv += ["--publish", str(publish)]
        try:
            child = Child(argv, stderr_path=bdir / "worker.stderr", log=alog, env=self.env,
                          cwd=self.layout.root)
        except OSError as e:
            alog.error("worker_start_failed", error=str(e), argv=argv)
            self.ledger.end_attempt(bid, n, now, outcome="crashed", reason=f"cannot start the worker: {e}")
            self._crashed(self.ledger.batch(bid), n, f"cannot start the worker: {e}", now, alog)
            return
        self.ledger.set_attempt_pid(bid, n, child.pid, child.create_time)
        self.running = _Running(bid, n, batch["name"], bdir, publish, child, now, alog,
                                next_guard_poll=now, oom_kills_at_start=_vmstat_oom_kills())
        alog.info("worker_started", file=batch["name"], pid=child.pid,
                  init_adapter=str(init_adapter) if init_adapter else None,
                  init_adapter_version=latest["n"] if latest else None,
                  micro_batch_size=settings.train.micro_batch_size,
                  grad_accum_steps=settings.train.grad_accum_steps,
                  gradient_checkpointing=settings.train.gradient_checkpointing)
        # The guard gets monotonic time: it only compares its own samples (growth rates, worker
        # age), and a wall-clock step (NTP) must not read as a burst of growth or a sudden age.
        self.guard.attach(child.pid, bdir, time.monotonic())

    def _plan(self, batch: dict[str, Any], now: float, log: Any) -> dict[str, Any]:
        """Before the first attempt: ask the guard for a micro-batch that fits the memory limit."""
        assert self.ledger is not None
        train = self.settings.train
        # The guard logs the plan with its numbers (memory_plan_kept / _reduced / _does_not_fit).
        plan = self.guard.plan_micro_batch(Path(self.settings.model.path), train, self.settings.lora)
        self.ledger.set_plan(batch["id"], plan.micro_batch_size, plan.grad_accum_steps,
                             plan.gradient_checkpointing, now)
        return self.ledger.batch(batch["id"])

    # --- a running worker ----------------------------------------------------------------

    def _supervise(self, now: float) -> None:
        r = self.running
        assert r is not None
        status = r.child.poll()
        if status is None:
            if now >= r.next_guard_poll:
                r.next_guard_poll = now + self.settings.memory.interval_ms / 1000.0
                self._act_on_guard(r, self.guard.poll(time.monotonic()))
            if r.kill_at is not None and now >= r.kill_at:
                r.log.warning("worker_killed", reason="stop grace expired",
                              stop_grace_s=self.settings.supervisor.stop_grace_s)
                r.child.kill_group(by="supervisor")
                r.kill_at = None
            return
        self.guard.detach()
        self.running = None
        self._on_exit(r, status, now)

    def _act_on_guard(self, r: _Running, decision: Any) -> None:
        action = getattr(decision, "action", "none")
        if action == "none":
            return
        if action in ("stop", "recycle"):
            # The guard already wrote batch_dir/.stop; the worker checkpoints and exits 75.
            # A memory stop outranks an earlier recycle (the guard upgrades .stop the same way).
            if action == "stop" or r.stop_cause is None:
                r.stop_cause = "memory" if action == "stop" else "recycle"
        elif action == "term":
            r.stop_cause = "memory"
            r.child.send(signal.SIGTERM, by="guard")
        elif action == "kill":
            r.stop_cause = "memory"
            r.child.kill_group(by="guard")

    def _on_exit(self, r: _Running, st: ExitStatus, now: float) -> None:
        assert self.ledger is not None
        result = _read_result(r.batch_dir / "result.json")
        batch = self.ledger.batch(r.batch_id)
        log = r.log
        kill_sender = r.child.sent_by(st.signal) if st.signal is not None else None
        log.info("worker_exited", exit=st.describe(), exit_code=st.code, signal=st.signal,
                 signal_sent_by=kill_sender, result_status=(result or {}).get("status"),
                 result_reason=(result or {}).get("reason"), elapsed_s=round(now - r.started_at, 3))
        try:
            (r.batch_dir / ".stop").unlink()
        except FileNotFoundError:
            pass
        self._settle(batch, r.attempt, st, result, r.stop_cause, kill_sender, now, log,
                     oom_kills_before=r.oom_kills_at_start, pid=r.child.pid)

    def _settle(self, batch: dict[str, Any], n: int, st: ExitStatus, result: dict[str, Any] | None,
                stop_cause: str | None, kill_sender: str | None, now: float, log: Any, *,
                oom_kills_before: int | None = None, pid: int | None = None) -> None:
        """Decide what an ended attempt means for its batch (also used by reconcile)."""
        assert self.ledger is not None
        bid = batch["id"]
        end = dict(exit_code=st.code, signal=st.signal, signal_sent_by=kill_sender, result=result)
        if result:
            self.ledger.update_progress(bid, result.get("step"), result.get("total_steps"))
        if st.code == EX_OK:
            publish = self.layout.batch_dir(bid) / "published"
            if publish.is_dir():
                self.ledger.end_attempt(bid, n, now, outcome="done", reason="done", **end)
                self._publish(batch, now, log)
                return
            reason = f"the worker exited 0 but left no adapter at {publish}"
            self.ledger.end_attempt(bid, n, now, outcome="crashed", reason=reason, **end)
            self._crashed(batch, n, reason, now, log)
            return
        if st.code == EX_TEMPFAIL:
            reason = str((result or {}).get("reason") or "unknown")
            if stop_cause in ("memory", "recycle") and reason == "shutdown":
                reason = stop_cause  # our guard's SIGTERM, not an operator's shutdown
            self.ledger.end_attempt(bid, n, now, outcome="stopped", reason=reason, **end)
            self._stopped(batch, reason, result, now, log)
            return
        if st.code in (EX_DATAERR, EX_CONFIG):
            what = "data unusable" if st.code == EX_DATAERR else "settings unusable"
            reason = str((result or {}).get("reason") or what)
            self.ledger.end_attempt(bid, n, now, outcome="bad_data" if st.code == EX_DATAERR else "bad_config",
                                    reason=reason, **end)
            self._fail(batch, BatchState.RUNNING, f"{what}: {reason}", now, log)
            return
        if st.signal is not None and kill_sender in ("guard", "supervisor"):
            if stop_cause == "memory":
                self.ledger.end_attempt(bid, n, now, outcome="stopped", reason="memory", **end)
                self._stopped(batch, "memory", result, now, log)
            else:
                # Our own SIGKILL at shutdown (grace expired or a second signal): not a crash.
                reason = stop_cause or "shutdown"
                self.ledger.end_attempt(bid, n, now, outcome="stopped", reason=reason, **end)
                self._stopped(batch, reason, result, now, log)
            return
        if st.signal == signal.SIGKILL and self.kernel_oom_killed(pid, oom_kills_before) is False:
            # Nobody in trainerd sent it and the kernel says it killed nothing for memory while
            # this attempt ran (or named another pid): an operator's `kill -9`, a chaos test. A
            # crash, not a memory problem: backing off would shrink the batch for nothing.
            reason = f"{st.describe()} sent by another process (the kernel counted no OOM kill of it)"
            log.warning("worker_killed_externally", exit=st.describe(), pid=pid,
                        kernel_oom_kills_before=oom_kills_before, kernel_oom_kills_now=_vmstat_oom_kills())
            self.ledger.end_attempt(bid, n, now, outcome="crashed", reason=reason, **end)
            self._crashed(batch, n, reason, now, log)
            return
        if st.signal == signal.SIGKILL:
            # Nobody in trainerd sent it: the kernel's OOM killer (the usual sender of a bare
            # SIGKILL). Count it: the target is zero.
            total = self.ledger.bump("kernel_oom_kills")
            log.error("kernel_oom_kill", exit=st.describe(), kernel_oom_kills=total,
                      guard_oom_kills=_safe_call(self.guard.kernel_oom_kills),
                      hint="the memory guard did not stop the worker in time; backing off")
            self.ledger.end_attempt(bid, n, now, outcome="stopped", reason="kernel_oom_kill", **end)
            self._stopped(batch, "memory", result, now, log)
            return
        reason = st.describe() + (f": {result.get('reason')}" if result and result.get("reason") else "")
        self.ledger.end_attempt(bid, n, now, outcome="crashed", reason=reason, **end)
        self._crashed(batch, n, reason, now, log)

    def _stopped(self, batch: dict[str, Any], reason: str, result: dict[str, Any] | None, now: float,
                 log: Any) -> None:
        """Exit 75 (or our own kill): the batch goes back to the queue, smaller after a memory stop."""
        assert self.ledger is not None
        bid = batch["id"]
        if reason == "memory":
            stops = batch["memory_stops"] + 1
            cur = (batch["micro_batch_size"] or self.settings.train.micro_batch_size,
                   batch["grad_accum_steps"] or self.settings.train.grad_accum_steps,
                   bool(batch["gradient_checkpointing"]))
            nxt = back_off(*cur)
            if nxt is None or stops > self.settings.retry.max_memory_stops:
                peak = (result or {}).get("peak_rss_bytes")
                limit = getattr(self.guard, "limit_bytes", None)
                why = ("needs more memory than the limit even at micro_batch_size 1 with gradient "
                       "checkpointing" if nxt is None else f"{stops} memory stops (retry.max_memory_stops)")
                self.ledger.requeue(bid, now, reason="memory", memory_stops=stops)  # RUNNING -> QUEUED
                self._fail(self.ledger.batch(bid), BatchState.QUEUED,
                           f"{why}: peak RSS {_fmt_bytes(peak)} against a limit of {_fmt_bytes(limit)}",
                           now, log)
                return
            self.ledger.requeue(bid, now, reason="memory", memory_stops=stops,  # RUNNING -> QUEUED
                                micro_batch_size=nxt[0], grad_accum_steps=nxt[1],
                                gradient_checkpointing=int(nxt[2]))
            log.warning("memory_back_off", micro_batch_size=nxt[0], grad_accum_steps=nxt[1],
                        gradient_checkpointing=nxt[2], previous_micro_batch_size=cur[0],
                        memory_stops=stops, peak_rss_bytes=(result or {}).get("peak_rss_bytes"))
            return
        if reason == "disk_full":
            # The worker could not write a checkpoint or the adapter; the previous ones are
            # intact. Wait for space: the start check (disk.min_free_bytes) holds the batch
            # back, and a short back-off keeps a too-small min_free_bytes from spinning.
            free = _safe_call(lambda: shutil.disk_usage(self.layout.root).free)
            self._disk_low = True
            self.ledger.requeue(bid, now, reason=reason,  # RUNNING -> QUEUED
                                next_attempt_at=now + self.settings.retry.backoff_s)
            log.error("disk_full", free_bytes=free, min_free_bytes=self.settings.disk.min_free_bytes,
                      step=(result or {}).get("step"), checkpoint=(result or {}).get("checkpoint"),
                      action="training paused until free space is back; resumes from the newest checkpoint")
            return
        self.ledger.requeue(bid, now, reason=reason)  # RUNNING -> QUEUED
        if reason == "paused":
            log.info("batch_paused", step=(result or {}).get("step"), total_steps=(result or {}).get("total_steps"))
        else:
            log.info("batch_requeued", reason=reason, step=(result or {}).get("step"),
                     resume="at once" if not self.stopping else "at the next start")

    def _crashed(self, batch: dict[str, Any], n: int, reason: str, now: float, log: Any) -> None:
        assert self.ledger is not None
        bid = batch["id"]
        crashes = batch["crashes"] + 1
        max_attempts = self.settings.retry.max_attempts
        if crashes >= max_attempts:
            self.ledger.requeue(bid, now, reason=reason, crashes=crashes)  # RUNNING -> QUEUED
            self._fail(self.ledger.batch(bid), BatchState.QUEUED,
                       f"crashed {crashes} times (retry.max_attempts = {max_attempts}); last: {reason}", now, log)
            return
        delay = min(self.settings.retry.backoff_s * (2 ** (crashes - 1)), self.settings.retry.backoff_max_s)
        self.ledger.requeue(bid, now, reason=reason, crashes=crashes,  # RUNNING -> QUEUED
                            next_attempt_at=now + delay)
        log.error("worker_crashed", reason=reason, crashes=crashes, max_attempts=max_attempts,
                  retry_in_s=delay, stderr=str(self.layout.batch_dir(bid) / "worker.stderr"))

    # --- the ends of a batch -------------------------------------------------------------

    def _publish(self, batch: dict[str, Any], now: float, log: Any) -> None:
        """RUNNING -> DONE: number the adapter, make it visible, switch ``current``."""
        assert self.ledger is not None
        n = self.ledger.finish_done(batch["id"], self.layout.adapter_dir, now)  # RUNNING -> DONE
        self._finish_done(self.ledger.batch(batch["id"]))
        log.info("adapter_published", version=n, path=str(self.layout.adapter_dir(n)), file=batch["name"])

    def _finish_done(self, batch: dict[str, Any]) -> None:
        """Roll a DONE batch forward on disk (idempotent: reconcile calls it after a crash)."""
        bdir = self.layout.batch_dir(batch["id"])
        n = batch["adapter_version"]
        dest = self.layout.adapter_dir(n)
        staged = bdir / "published"
        if not dest.exists() and staged.is_dir():
            # The worker wrote and fsynced it completely before renaming it to `published`;
            # this rename makes it visible as a version in one step.
            os.rename(staged, dest)
            fsync_dir(self.layout.adapters)
            _fault("supervisor_crash_in_publish")  # chaos tests: die before `current` moves
        if not dest.exists():
            self.log.error("adapter_missing", batch=batch["id"], version=n, path=str(dest))
        self._switch_current()
        data = bdir / "data.jsonl"
        if os.path.lexists(data):
            name = self._free_name(self.layout.done, batch["name"], f"{batch['id']:06d}")
            os.rename(data, self.layout.done / name)
            fsync_dir(self.layout.done)

    def _switch_current(self) -> None:
        """Point ``adapters/current`` at the newest version on disk, atomically (tmp link + rename)."""
        assert self.ledger is not None
        versions = [v["n"] for v in self.ledger.adapter_versions() if self.layout.adapter_dir(v["n"]).is_dir()]
        if not versions:
            return
        target = str(max(versions))
        try:
            if os.readlink(self.layout.current) == target:
                return
        except OSError:
            pass
        tmp = self.layout.adapters / f".current.tmp-{os.getpid()}"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(target, tmp)
        os.replace(tmp, self.layout.current)  # a reader sees the old link or the new one
        fsync_dir(self.layout.adapters)

    def _fail(self, batch: dict[str, Any], from_state: BatchState, reason: str, now: float, log: Any) -> None:
        assert self.ledger is not None
        self.ledger.fail(batch["id"], from_state, reason, now)  # QUEUED | RUNNING -> FAILED
        batch = self.ledger.batch(batch["id"])
        dest = self._finish_failed(batch)
        log.error("batch_failed", file=batch["name"], reason=reason, moved_to=str(dest) if dest else None)

    def _finish_failed(self, batch: dict[str, Any]) -> Path | None:
        """Quarantine: original to failed/ with ``<name>.error.json`` beside it (idempotent)."""
        bdir = self.layout.batch_dir(batch["id"])
        data = bdir / "data.jsonl"
        gone = not os.path.lexists(data)
        if gone:
            # The data vanished (deleted by hand while queued or training): nothing to move,
            # but the reason still goes where the operator looks. Once only (reconcile repeats).
            for cand in (batch["name"], f"{batch['id']:06d}-{batch['name']}"):
                if (_read_result(self.layout.failed / f"{cand}.error.json") or {}).get("batch") == batch["id"]:
                    return None
        name = self._free_name(self.layout.failed, batch["name"], f"{batch['id']:06d}")
        result = _read_result(bdir / "result.json") or {}
        atomic_write_json(self.layout.failed / f"{name}.error.json", {
            "file": batch["name"], "batch": batch["id"], "reason": batch["last_reason"],
            "sha256": batch["sha256"], "attempts": batch["attempts"], "crashes": batch["crashes"],
            "lines_good": result.get("lines_good"), "lines_bad": result.get("lines_bad"),
            "errors": result.get("errors") or _read_errors(bdir / "errors.jsonl"),
            "exit_code": result.get("exit_code"), "batch_dir": str(bdir), "failed_at": batch["finished_at"],
            "original": None if gone else name,
        })
        if gone:
            fsync_dir(self.layout.failed)
            return None
        os.rename(data, self.layout.failed / name)
        fsync_dir(self.layout.failed)
        return self.layout.failed / name

    def _finish_skipped(self, batch: dict[str, Any]) -> None:
        bdir = self.layout.batch_dir(batch["id"])
        data = bdir / "data.jsonl"
        if os.path.lexists(data):
            name = self._free_name(self.layout.done, batch["name"], f"{batch['id']:06d}")
            atomic_write_json(self.layout.done / f"{name}.duplicate.json", {
                "file": batch["name"], "batch": batch["id"], "sha256": batch["sha256"],
                "duplicate_of": batch["duplicate_of"], "reason": batch["last_reason"]})
            os.rename(data, self.layout.done / name)
            fsync_dir(self.layout.done)

    @staticmethod
    def _free_name(folder: Path, name: str, tag: str) -> str:
        """``name`` if free in ``folder``, else ``<tag>-name``: originals are never overwritten.

        A name near NAME_MAX (255 bytes) is shortened so that ``<tag>-`` and ``.error.json``
        still fit; the full original name is in the ledger and in the error file.
        """
        if len(name.encode()) > 200:
            name = name.encode()[:180].decode(errors="ignore") + "~.jsonl"
            return f"{tag}-{name}"
        if not os.path.lexists(folder / name) and not os.path.lexists(folder / f"{name}.error.json"):
            return name
        return f"{tag}-{name}"

    # --- reconcile after a crash of the supervisor ---------------------------------------

    def reconcile(self, now: float) -> None:
        """Make the ledger and the folders agree again, whatever instant the last life died at."""
        assert self.ledger is not None
        self._stop_leftover_workers(now)
        for b in self.ledger.batches(BatchState.CLAIMING):
            self.log.warning("claim_resumed", batch=b["id"], file=b["name"])
            self._complete_claim(b["id"], b["name"], now)
        open_attempts = {(a["batch_id"]): a for a in self.ledger.open_attempts()}
        for b in self.ledger.batches(BatchState.RUNNING):
            a = open_attempts.get(b["id"])
            log = self.log.bind(batch=b["id"], attempt=a["n"] if a else None)
            result = _read_result(self.layout.batch_dir(b["id"]) / "result.json")
            if a is None:  # cannot happen (one transaction), but never leave a batch RUNNING
                self.ledger.requeue(b["id"], now, reason="supervisor_restart")  # RUNNING -> QUEUED
                continue
            code = (result or {}).get("exit_code")
            if isinstance(code, int):
                # The worker finished its attempt while nobody was watching: honour its word.
                log.info("attempt_recovered", result_status=result.get("status"), exit_code=code)
                self._settle(b, a["n"], ExitStatus(code, None), result, None, None, now, log)
            else:
                self.ledger.end_attempt(b["id"], a["n"], now, outcome="lost", reason="supervisor_restart")
                self.ledger.requeue(b["id"], now, reason="supervisor_restart")  # RUNNING -> QUEUED
                log.warning("batch_requeued", reason="supervisor_restart",
                            hint="resumes from its newest checkpoint")
        for b in self.ledger.batches(BatchState.DONE):
            if os.path.lexists(self.layout.batch_dir(b["id"]) / "data.jsonl") or not \
                    self.layout.adapter_dir(b["adapter_version"]).exists():
                self._finish_done(b)
        for b in self.ledger.batches(BatchState.FAILED):
            self._finish_failed(b)
        for b in self.ledger.batches(BatchState.SKIPPED):
            self._finish_skipped(b)
        self._switch_current()
        for stray in self.layout.adapters.glob(".current.tmp-*"):
            stray.unlink(missing_ok=True)
        self.log.info("reconciled", counts=self.ledger.counts(),
                      adapter_version=(self.ledger.latest_version() or {}).get("n"))

    @staticmethod
    def kernel_oom_killed(pid: int | None, oom_kills_before: int | None) -> bool | None:
        """Did the kernel's OOM killer end this worker? False only on evidence: its OOM kill
        count did not move during the attempt, or it moved and the kernel log names other
        pids. None = cannot tell (then a bare SIGKILL is taken for an OOM kill, as before)."""
        if pid is None or oom_kills_before is None:
            return None
        now = _vmstat_oom_kills()
        if now is None:
            return None
        if now == oom_kills_before:
            return False
        return _kmsg_names_oom_kill(pid)

    def find_leftover_workers(self) -> list[psutil.Process]:
        """Our workers from an earlier life: a command line with ``--publish`` and a batch folder
        of this root as an argument of its own (an operator's `less batches/000001/...` is not)."""
        prefix = str(self.layout.batches) + os.sep
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = p.info["cmdline"] or []
                ours = "--publish" in cmd and any(
                    a.startswith(prefix) and a[len(prefix):].isdigit() for a in cmd[1:])
                if ours and p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def _stop_leftover_workers(self, now: float) -> None:
        """A worker from the previous life read EOF on its lifeline and is checkpointing: let it
        finish within the stop grace, then SIGKILL its whole group."""
        procs = self.find_leftover_workers()
        if not procs:
            return
        for p in procs:
            self.log.warning("leftover_worker_found", pid=p.pid, cmdline=" ".join(p.cmdline()[:6]))
        # Before READY: ask systemd for the time this may take instead of failing the start.
        self.notifier.extend_timeout(self.settings.supervisor.stop_grace_s + 30)
        deadline = time.monotonic() + self.settings.supervisor.stop_grace_s
        pending = list(procs)
        while pending and time.monotonic() < deadline:
            pending = [p for p in pending if _alive(p)]
            if pending:
                time.sleep(0.1)  # start-up, before the loop exists: nothing else to do meanwhile
        for p in procs:
            was_alive = _alive(p)
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the leader's pid is its group id
            except (ProcessLookupError, PermissionError):
                pass
            self.log.warning("leftover_worker_stopped", pid=p.pid,
                             how="SIGKILL after the stop grace" if was_alive else "exited by itself")
        deadline = time.monotonic() + 5.0
        while any(_alive(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)


# --- helpers ---------------------------------------------------------------------------


def _fault(point: str) -> None:
    """Fault injection for the chaos tests (docs/architecture.md): ``TRAINERD_FAULT=<point>``
    SIGKILLs the supervisor itself at that point, as a power cut or the OOM killer would."""
    if os.environ.get("TRAINERD_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _vmstat_oom_kills() -> int | None:
    """The kernel's count of OOM kills since boot (every kind: global and cgroup), or None."""
    try:
        with open("/proc/vmstat", "rb") as f:
            for line in f:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _kmsg_names_oom_kill(pid: int) -> bool | None:
    """Does the kernel log say the OOM killer killed ``pid``? None when it cannot be read
    (/dev/kmsg needs CAP_SYSLOG; systemd's ProtectKernelLogs hides it)."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    needle = f"Killed process {pid} ".encode()
    found = False
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # records overwritten while reading: go on
                    continue
                return None
            if not rec:
                break
            if needle in rec:
                found = True
    finally:
        os.close(fd)
    return found


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _sha256(path: Path) -> tuple[str, int]:
    """Hash a claimed file without following links (O_NOFOLLOW) or blocking on a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        h = hashlib.sha256()
        size = 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
        return h.hexdigest(), size
    finally:
        os.close(fd)


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


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


def _fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)) or n <= 0:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _safe_call(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:  # a diagnostic only; never let it break the exit handling
        return None
