"""Boot a throw-away Debian container with a real systemd as PID 1, for the integration test.

Recipe (measured, see ../shared/FACTS.md): systemd-nspawn with ``--register=no --keep-unit``
(there is no host systemd to register with), a tiny init wrapper as the command that remounts
the container's v1 memory hierarchy read-write (else ``MemoryMax=`` is silently not enforced)
and then execs systemd, and ``--kill-signal=SIGRTMIN+3`` so that stopping nspawn is a clean
poweroff. The container is driven with ``nsenter -t <init pid> -a`` (``machinectl`` needs a host
systemd). The root filesystem is an overlay: the cached, read-only lower layer built by
``scripts/nspawn-rootfs`` and an upper layer under the test's tmp_path, so every test boots a
pristine system and nothing it does survives.

nspawn runs in cgroups of our own (name=systemd, the v2 ``unified`` one, and a child of our
memory cgroup), so cleanup can kill everything that ever ran in the container and remove them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil

CGROOT = Path("/sys/fs/cgroup")
INIT = """#!/bin/sh
# nspawn mounts the v1 memory hierarchy read-only: systemd could not write memory.limit_in_bytes
# and MemoryMax= would be ignored without a word.
mount -o remount,bind,rw /sys/fs/cgroup/memory 2>/dev/null || true
exec /lib/systemd/systemd "$@"
"""
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def missing_prerequisites() -> str | None:
    """A sentence saying why the container cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, overlayfs mounts, cgroups)"
    for tool in ("systemd-nspawn", "nsenter", "debootstrap"):
        if shutil.which(tool) is None:
            pkg = {"systemd-nspawn": "systemd-container", "nsenter": "util-linux"}.get(tool, tool)
            return f"{tool} not found (apt-get install -y {pkg})"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    if not (CGROOT / "memory" / "cgroup.procs").exists() and not (CGROOT / "cgroup.controllers").exists():
        return "no memory cgroup hierarchy to put the container in"
    return None


def _own_cgroup(controller: str) -> str:
    """Our path in a v1 hierarchy ('memory', 'name=systemd') or v2 ('' ) per /proc/self/cgroup."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(","):
            return path
    return "/"


class Container:
    """One booted container. Use as a context manager; cleanup never raises."""

    def __init__(self, rootfs: Path, workdir: Path, *, binds_ro: list[str] = (), name: str | None = None,
                 boot_timeout_s: float = 60.0):
        self.rootfs = Path(rootfs)
        self.workdir = Path(workdir)
        self.name = name or f"trainerd-{uuid.uuid4().hex[:8]}"
        self.binds_ro = list(binds_ro)
        self.boot_timeout_s = boot_timeout_s
        self.merged = self.workdir / "merged"
        self.console_log = self.workdir / "console.log"
        self.nspawn: subprocess.Popen | None = None
        self.init_pid: int | None = None
        self.cgroups: list[Path] = []
        self._mounted = False
        self.boot_s: float | None = None

    # --- life cycle ----------------------------------------------------------------------------

    def __enter__(self) -> "Container":
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def start(self) -> None:
        upper, work = self.workdir / "upper", self.workdir / "ovl-work"
        for d in (upper, work, self.merged):
            d.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.rootfs},upperdir={upper},workdir={work}", str(self.merged)],
                       check=True, capture_output=True, text=True)
        self._mounted = True
        init = self.merged / "usr/local/sbin/trainerd-test-init"
        init.parent.mkdir(parents=True, exist_ok=True)
        init.write_text(INIT)
        init.chmod(0o755)

        self.cgroups = self._make_cgroups()
        enter = "".join(f'echo $$ > "{cg}/cgroup.procs" && ' for cg in self.cgroups)
        cmd = ["systemd-nspawn", "-q", "-D", str(self.merged), "-M", self.name, "--register=no",
               "--keep-unit", "--console=read-only", "--kill-signal=SIGRTMIN+3",
               *(f"--bind-ro={b}" for b in self.binds_ro),
               "/usr/local/sbin/trainerd-test-init"]
        t0 = time.monotonic()
        with open(self.console_log, "wb") as log:
            # Our own session: the test's Ctrl-C must not reach the container's init directly.
            self.nspawn = subprocess.Popen(["/bin/sh", "-c", enter + 'exec "$@"', "sh", *cmd],
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        deadline = t0 + self.boot_timeout_s
        while self.init_pid is None:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.nspawn.returncode}: {self.console()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no container init after {self.boot_timeout_s} s: {self.console()[-2000:]}")
            try:
                # nspawn forks an intermediate child (also named systemd-nspawn) that forks the
                # container's PID 1 and exits: wait for the one that has exec'ed systemd.
                for kid in psutil.Process(self.nspawn.pid).children():
                    if kid.name() == "systemd":
                        self.init_pid = kid.pid
            except psutil.Error:
                pass
            time.sleep(0.05)
        state = ""
        while True:
            r = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
            state = r.stdout.strip() or r.stderr.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"container stuck in {state!r}: {self.console()[-2000:]}")
            time.sleep(0.1)
        self.boot_s = time.monotonic() - t0

    def cleanup(self) -> None:
        """Power off (SIGTERM -> nspawn -> SIGRTMIN+3 -> systemd), kill leftovers, unmount, rmdir."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            try:
                self.nspawn.terminate()
                self.nspawn.wait(timeout=20)
            except (subprocess.TimeoutExpired, OSError):
                self.nspawn.kill()
                try:
                    self.nspawn.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        for cg in reversed(self.cgroups):
            _kill_cgroup_tree(cg)
        if self._mounted:
            for _ in range(50):
                if subprocess.run(["umount", str(self.merged)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                subprocess.run(["umount", "-l", str(self.merged)], capture_output=True)
            self._mounted = False
        for cg in reversed(self.cgroups):
            _rmdir_tree(cg)
        self.cgroups = []

    # --- driving it -----------------------------------------------------------------------------

    def run(self, argv: list[str], *, check: bool = True, timeout: float = 120,
            env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
        """Run a command inside every namespace of the container (as root there)."""
        if self.init_pid is None:
            raise RuntimeError("container not started")
        envl = [f"{k}={v}" for k, v in {"PATH": PATH, "LANG": "C.UTF-8", **(env or {})}.items()]
        if cwd:  # nsenter --wd resolves the path outside the container's mount namespace
            argv = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', cwd, *argv]
        cmd = ["nsenter", "-t", str(self.init_pid), "-a", "env", "-i", *envl, *argv]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"in container: {' '.join(argv)} -> {r.returncode}\n"
                                 f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}")
        return r

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["/bin/sh", "-c", script], **kw)

    def path(self, inside: str) -> Path:
        """The host path of a file inside the container (through the overlay mount)."""
        return self.merged / inside.lstrip("/")

    def show(self, unit: str, *props: str) -> dict[str, str]:
        r = self.run(["systemctl", "show", unit, "-p", ",".join(props)])
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def journal(self, unit: str, lines: int = 200) -> str:
        return self.run(["journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "short-precise"],
                        check=False).stdout

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except OSError:
            return ""

    # --- cgroups ----------------------------------------------------------------------------------

    def _make_cgroups(self) -> list[Path]:
        made = []
        for hier, ctrl in (("systemd", "name=systemd"), ("unified", ""), ("memory", "memory")):
            base = CGROOT / hier
            if not (base / "cgroup.procs").exists():
                continue
            own = _own_cgroup(ctrl) if ctrl else _own_v2()
            cg = base / own.lstrip("/") / self.name
            try:
                cg.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            made.append(cg)
        return made


def _own_v2() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return "/"


def _kill_cgroup_tree(cg: Path) -> None:
    # Everything still in there (a wedged container): SIGKILL, a few rounds (a fork may race).
    for _ in range(20):
        pids = []
        for procs in cg.rglob("cgroup.procs"):
            try:
                pids += [int(p) for p in procs.read_text().split()]
            except (OSError, ValueError):
                pass
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _rmdir_tree(cg: Path) -> None:
    if not cg.exists():
        return
    dirs = sorted((d for d in cg.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True)
    for d in dirs + [cg]:
        for _ in range(20):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)
