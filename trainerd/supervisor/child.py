"""Start one worker in its own session, relay its output, signal it, reap it, decode its exit.

The worker gets:

- its own session and process group (``start_new_session=True``): a Ctrl-C on the daemon's
  terminal does not reach it, and ``killpg`` reaches it *and* every grandchild it started
  (DataLoader workers, torchrun ranks), so nothing survives a SIGKILL;
- stdin = a pipe whose write end only the supervisor holds and never writes to (the
  lifeline): when the supervisor dies for any reason the kernel closes it and the worker
  reads EOF, checkpoints and exits 75 (``parent_gone``);
- stdout = a pipe relayed line by line into the supervisor's log, with ``batch`` and
  ``attempt`` added (JSON lines keep their fields; anything else is logged as text);
- stderr = ``batches/<id>/worker.stderr``, appended per attempt (tracebacks, library noise).

Two threads may signal it: the supervisor's loop and the memory guard's own thread
(supervisor/guardthread.py). A signal must never reach a reaped pid (the kernel may have given
the number to a stranger), so reaping and signalling hold one lock, and the worker alone is
signalled through a pidfd where the kernel has them (Linux >= 5.3): a pidfd names the process,
not the number, and fails with ESRCH once it is gone.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import psutil

__all__ = ["Child", "ExitStatus", "describe_signal", "worker_command", "WORKER_CMD_ENV"]

# Tests (and operators with a wrapper, e.g. `nice -n 10 python -m trainerd.worker`) point
# this at another command; the batch folder and options are appended to it.
WORKER_CMD_ENV = "TRAINERD_WORKER_CMD"

_LEVELS = {"debug", "info", "warning", "error", "critical"}


def worker_command(override: Sequence[str] | str | None = None) -> list[str]:
    """The worker command prefix: ``override``, else ``$TRAINERD_WORKER_CMD``, else the real worker."""
    if override is None:
        override = os.environ.get(WORKER_CMD_ENV) or None
    if override is None:
        return [sys.executable, "-m", "trainerd.worker"]
    return shlex.split(override) if isinstance(override, str) else list(override)


def describe_signal(signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = "unknown"
    return f"Signal {signum} ({name})"


@dataclass(frozen=True)
class ExitStatus:
    """How a worker ended: an exit code, or the signal that killed it."""

    code: int | None  # exit code when it exited
    signal: int | None  # signal number when a signal killed it

    @classmethod
    def from_returncode(cls, rc: int) -> "ExitStatus":
        return cls(None, -rc) if rc < 0 else cls(rc, None)

    def describe(self) -> str:
        return describe_signal(self.signal) if self.signal is not None else f"exit code {self.code}"


# A child's stderr file is appended to at every start (logs/diskuse.stderr: every retention run
# and daily walk, for weeks): past this size it starts afresh, the previous one kept as <name>.1.
STDERR_MAX_BYTES = 4 << 20


def _bound(path: Path) -> None:
    try:
        if path.stat().st_size > STDERR_MAX_BYTES:
            os.replace(path, path.with_name(path.name + ".1"))
    except OSError:
        pass


class Child:
    """One running worker process (the leader of its own process group)."""

    def __init__(self, argv: list[str], *, stderr_path: Path, log: Any, env: dict[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None):
        self.argv = argv
        self.log = log
        stderr_path = Path(stderr_path)
        _bound(stderr_path)
        with open(stderr_path, "ab") as err:
            err.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} "
                      f"{shlex.join(argv)}\n".encode())
            err.flush()
            # Popen's fds are close-on-exec by default (the SQLite handle, the lock file and
            # other workers' pipes never leak into the worker).
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env, cwd=cwd,
                start_new_session=True, close_fds=True)
        self.pid = self.proc.pid
        self.pgid = self.pid  # start_new_session: the worker leads its own group
        # Held while reaping and while signalling (see the module docstring); taken inside an
        # Escalation's lock, never around it.
        self._lock = threading.Lock()
        self._pidfd = _pidfd_open(self.pid)  # before any reap: the pid is still ours
        try:
            self.create_time: float | None = psutil.Process(self.pid).create_time()
        except psutil.Error:
            self.create_time = None
        self.returncode: int | None = None
        self._relay = threading.Thread(target=self._relay_stdout, name=f"relay-{self.pid}", daemon=True)
        self._relay.start()

    # --- output --------------------------------------------------------------------------

    def _relay_stdout(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line.strip():
                    self._relay_line(line)

    def _relay_line(self, line: str) -> None:
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
            self.log.info("worker_output", text=line, source="worker")
            return
        level = str(obj.pop("level", "info")).lower()
        event = obj.pop("event")
        # The relaying logger's batch/attempt win: a worker cannot mislabel its lines.
        for key in ("batch", "attempt"):
            obj.pop(key, None)
        obj["source"] = "worker"
        getattr(self.log, level if level in _LEVELS else "info")(event, **obj)

    # --- signals and exit ----------------------------------------------------------------

    def descendants(self) -> list[psutil.Process]:
        """Every process the worker started, however deep (torchrun's ranks each lead a session
        of their own: the group alone does not reach them)."""
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def send(self, sig: int, *, group: bool = False) -> bool:
        """Send ``sig`` to the worker (or its whole group). False if it is gone.

        Who asked, and why, is recorded by the caller's
        :class:`trainerd.supervisor.stopping.Escalation`, the one place that stops a worker.
        """
        with self._lock:
            if self.returncode is not None:
                return False  # reaped: _after_exit has already cleared its group
            try:
                if group:
                    os.killpg(self.pgid, sig)  # the leader is not reaped: the id is still its own
                elif self._pidfd is not None:
                    signal.pidfd_send_signal(self._pidfd, sig)
                else:
                    os.kill(self.pid, sig)
            except ProcessLookupError:
                return False
            return True

    def kill_group(self) -> None:
        """SIGKILL the worker, every process left in its group, and every descendant in a session
        of its own (torchrun's ranks): taken before the worker dies, while they are its children."""
        tree = self.descendants()
        self.send(signal.SIGKILL, group=True)
        for p in tree:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass

    def poll(self) -> ExitStatus | None:
        """Reap the worker if it ended (non-blocking). On exit, clean up its group and lifeline."""
        exited = False
        with self._lock:
            if self.returncode is None:
                rc = self.proc.poll()
                if rc is None:
                    return None
                self.returncode, exited = rc, True
                if self._pidfd is not None:
                    os.close(self._pidfd)
                    self._pidfd = None
        if exited:
            self._after_exit()
        return ExitStatus.from_returncode(self.returncode)

    def wait(self, timeout: float | None = None) -> ExitStatus | None:
        """Wait up to ``timeout`` seconds for the worker to exit; reap it (through :meth:`poll`,
        under the lock) and return how it ended, or None if it still runs."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.poll()
            if st is not None:
                return st
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            fd = self._pidfd
            if fd is not None:
                try:
                    select.select([fd], [], [], left)  # readable once the process has exited
                except (OSError, ValueError):  # closed by a poll() in another thread
                    pass
            else:
                time.sleep(0.01 if left is None else min(0.01, left))

    def _after_exit(self) -> None:
        # A grandchild that outlived the worker keeps the group alive: kill it. (The pgid
        # cannot be reused while any member exists, so this never hits a stranger.)
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.close_lifeline()
        self._relay.join(timeout=5.0)

    def close_lifeline(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    @property
    def alive(self) -> bool:
        return self.poll() is None


def _pidfd_open(pid: int) -> int | None:
    """A pidfd for ``pid`` (our unreaped child), or None where the kernel or Python has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
