"""The one test daemon: a real ``python -m trainerd run --config FILE`` subprocess on its own root.

``Daemon(tmp, model_dir, **overrides)`` writes ``tmp/trainerd.yaml`` (tests/support/config.py's
``config_dict`` with the overrides) for the root ``tmp/root``; ``start()`` launches the daemon
with its output appended to ``tmp/daemon.out`` and waits until it says it runs. Options say how
it is launched: extra environment (``env``; a value of None unsets it), an argv prefix that runs
it as another user (``argv_prefix``, see ``unprivileged_prefix``), a umask, a memory cgroup to
start it in. The ``daemon_factory`` fixture (tests/conftest.py) stops every daemon it made.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from conftest import subprocess_env
from support.config import config_dict
from trainerd.supervisor.views.status import collect_status

__all__ = ["NOBODY", "Daemon", "unprivileged_prefix"]

NOBODY = 65534


class Daemon:
    """A trainerd daemon subprocess on its own root, ``tmp/root``."""

    def __init__(self, tmp: Path, model_dir: str | os.PathLike[str], *, env: dict[str, str | None] | None = None,
                 argv_prefix: Sequence[str] | None = None, umask: int | None = None, cgroup: Any = None,
                 out: Path | None = None, ready_timeout_s: float = 60.0, **overrides: Any):
        self.tmp = Path(tmp)
        self.root = self.tmp / "root"
        self.config_data = config_dict(self.root, model_dir, **overrides)
        self.config = self.tmp / "trainerd.yaml"
        self.config.write_text(json.dumps(self.config_data))  # JSON is YAML
        self.out = out or self.tmp / "daemon.out"
        self.env = dict(env or {})
        self.argv_prefix = list(argv_prefix or ())
        self.umask = umask
        self.cgroup = cgroup
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None

    # --- the process --------------------------------------------------------------------------

    def start(self, *, env: dict[str, str | None] | None = None, wait: bool = True) -> Daemon:
        """Launch the daemon (with ``env`` on top of the instance's, for this start only: a fault
        injection, say) and, unless ``wait`` is false, wait until its pid file and status say
        it runs."""
        argv = [*self.argv_prefix, sys.executable, "-m", "trainerd", "run", "--config", str(self.config)]
        full_env = subprocess_env()
        for k, v in {**self.env, **(env or {})}.items():
            if v is None:
                full_env.pop(k, None)
            else:
                full_env[k] = v
        # preexec_fn is unsafe while the parent runs other threads (a lock held at fork stays
        # held in the child): only a umask or a cgroup needs it, and those tests start none.
        preexec = self._preexec if self.umask is not None or self.cgroup is not None else None
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(argv, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=preexec)
        if wait:
            self.wait_for(lambda: (self.root / "trainerd.pid").exists() and self.status()["daemon"]["running"],
                          self.ready_timeout_s)
        return self

    def _preexec(self) -> None:
        # Runs in the child between fork and exec: the daemon starts with this umask, inside
        # this cgroup (so every byte it and its workers touch is charged there).
        if self.umask is not None:
            os.umask(self.umask)
        if self.cgroup is not None:
            self.cgroup.enter()

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 60) -> int:
        """Wait for the daemon to exit (after a signal, or by itself) and return its exit status."""
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        self.proc = None
        return rc

    def terminate(self, timeout: float = 90) -> int:
        """SIGTERM (the worker checkpoints, the daemon exits 0) and return the exit status."""
        self.send(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        """After a failed test: stop gracefully (the worker goes with it), kill only if that hangs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    # --- what it says -------------------------------------------------------------------------

    def wait_for(self, cond: Callable[[], Any], timeout: float = 120.0) -> Any:
        """Poll ``cond`` until it is truthy and return its value; fail with the daemon's output
        if the daemon exits or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            v = cond()
            if v:
                return v
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self._tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; daemon log tail:\n{self._tail()}")
            time.sleep(0.1)

    def _tail(self) -> str:
        try:
            return self.out.read_text(errors="replace")[-4000:]
        except OSError as e:
            return f"(no output: {e})"

    def status(self) -> dict[str, Any]:
        """``trainerd status`` as data, every batch in it (not a page: tests look batches up by name)."""
        st = collect_status(self.root, limit=None)
        return {**st, **{k: list(st[k]) for k in ("queue", "recent", "batches")}}

    def batch(self, name: str) -> dict[str, Any] | None:
        return next((b for b in self.status()["batches"] if b["file"] == name), None)

    def state_of(self, name: str) -> str | None:
        b = self.batch(name)
        return b["state"] if b else None

    def progress_step(self, batch_id: int) -> int:
        """The step in the batch's progress.json, or -1 before there is one."""
        try:
            return int(json.loads((self.root / "batches" / f"{batch_id:06d}" / "progress.json").read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return -1

    def worker_pid(self) -> int | None:
        try:
            st = json.loads((self.root / "daemon.json").read_text())
        except (OSError, ValueError):  # not written yet by a daemon that just started
            return None
        return (st.get("running") or {}).get("pid")

    def logs(self) -> list[dict[str, Any]]:
        """Every line of the daemon's log file (its own and its workers', relayed)."""
        text = (self.root / "logs" / "trainerd.jsonl").read_text()
        return [json.loads(x) for x in text.splitlines() if x.startswith("{")]

    def events(self, event: str) -> list[dict[str, Any]]:
        return [x for x in self.logs() if x.get("event") == event]

    # --- the inbox ----------------------------------------------------------------------------

    def drop(self, name: str, data: bytes | str | Sequence[str], *, mode: int | None = None) -> Path:
        """Put a file into the inbox as an operator should: write a dotfile, then rename it in.
        ``data`` is bytes, text, or lines; ``mode`` (say 0o644, for a daemon running as another
        user) is set before the rename."""
        if isinstance(data, str):
            data = data.encode()
        elif not isinstance(data, bytes):
            data = ("\n".join(data) + "\n").encode()
        part = self.root / "inbox" / f".{name}.part"
        part.write_bytes(data)
        if mode is not None:
            os.chmod(part, mode)
        os.rename(part, self.root / "inbox" / name)
        return self.root / "inbox" / name


# --- running as nobody ----------------------------------------------------------------------------


def _blocking_ancestor(path: str) -> tuple[str, str] | None:
    """(ancestor without o+x, its child on the way to ``path``) or None when others can reach it."""
    parts = Path(path).parts
    for i in range(1, len(parts) - 1):
        anc = os.path.join(*parts[: i + 1])
        if not os.stat(anc).st_mode & stat.S_IXOTH:
            return anc, os.path.join(anc, parts[i + 1])
    return None


def unprivileged_prefix(stash: Path) -> tuple[list[str] | None, str]:
    """argv prefix that runs a command as nobody with no capabilities, or (None, why not).

    Root bypasses file permissions, so only an unprivileged daemon proves it never needs root.
    When the interpreter lives under a folder others cannot enter (/root, mode 0700), the
    command gets a private mount namespace where that folder is a tmpfs with only the
    interpreter's tree bind-mounted in (``stash``, an empty folder, is the bind's waypoint);
    nothing changes outside that namespace."""
    if os.geteuid() != 0:
        return None, f"not root (uid {os.geteuid()}): cannot switch to another user"
    for tool in ("unshare", "setpriv"):
        if shutil.which(tool) is None:
            return None, f"{tool} is not installed"
    script = "set -e\n"
    block = _blocking_ancestor(os.path.realpath(sys.executable))
    if block is not None:
        anc, keep = block
        script += (f"mount --bind '{keep}' '{stash}'\n"
                   f"mount -t tmpfs -o mode=0755,size=64k tmpfs '{anc}'\n"
                   f"mkdir -p '{keep}'\nmount --bind '{stash}' '{keep}'\n")
    script += (f'exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups --inh-caps=-all '
               '--bounding-set=-all -- "$@"\n')
    prefix = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import os; print(os.geteuid())"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0 or probe.stdout.strip() != str(NOBODY):
        return None, f"cannot run as nobody here: {probe.stderr.strip()[-300:]}"
    return prefix, ""
