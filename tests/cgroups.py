"""Create and destroy a real memory cgroup for a test (v2 where it has a memory controller,
else v1), or say exactly why not so the test can skip with that reason.

    with memory_cgroup(600 << 20) as cg:          # or the ``memcg`` fixture factory
        subprocess.Popen(cmd, preexec_fn=cg.enter)  # the child joins before exec: every byte counts
        ...
        assert cg.oom_kills() == 0

The cgroup is made under the test's own memory cgroup (limits nest) — on v2, where that
cgroup cannot delegate the memory controller, beside it — named ``trainerd-test-<pid>-<n>``. On exit every process still in it is SIGKILLed and the
directory removed — also when the test failed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from pathlib import Path
from typing import Iterator

from trainerd.memguard import Cgroup, find_memory_cgroup

_counter = itertools.count()


class CgroupUnavailable(RuntimeError):
    """Why no memory cgroup can be created here (the skip reason)."""


class TestCgroup:
    __test__ = False  # not a pytest class

    def __init__(self, path: Path, version: int, limit_bytes: int):
        self.path = path
        self.version = version
        self.limit_bytes = limit_bytes
        self.cgroup = Cgroup(version, path, top=None)

    def enter(self) -> None:
        """Move the calling process into the cgroup (use as ``preexec_fn``: runs in the child)."""
        with open(self.path / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    def add(self, pid: int) -> None:
        with open(self.path / "cgroup.procs", "w") as f:
            f.write(str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def oom_kills(self) -> int:
        return self.cgroup.oom_kills() or 0

    def usage_bytes(self) -> int:
        return self.cgroup.usage()[0]

    def max_usage_bytes(self) -> int | None:
        """v1 memory.max_usage_in_bytes (v2: memory.peak where the kernel has it)."""
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            try:
                return int((self.path / name).read_text())
            except (OSError, ValueError):
                pass
        return None

    def destroy(self) -> None:
        # Kill whatever is left, wait for the cgroup to empty, then rmdir (EBUSY while not).
        deadline = time.monotonic() + 10
        while True:
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _parent() -> tuple[Path, int]:
    if os.geteuid() != 0:
        raise CgroupUnavailable("memory cgroups need root (running as uid %d)" % os.geteuid())
    cg, _ = find_memory_cgroup()
    if cg is None:
        raise CgroupUnavailable("no memory cgroup controller mounted (neither v2 memory.current nor v1 memory)")
    if cg.version == 2:
        ctl = cg.path / "cgroup.subtree_control"
        try:
            enabled = "memory" in ctl.read_text().split()
        except OSError as e:
            raise CgroupUnavailable(f"{ctl}: {e}") from e
        if not enabled:
            # v2's "no internal processes" rule: memory cannot be enabled for children of a
            # cgroup that holds processes (ours holds pytest). Our own cgroup has the memory
            # controller, so our parent enables it: make the test cgroup our sibling instead.
            # (Not exercised on the machine these tests were written on: v2 has no memory
            # controller there.)
            parent = cg.path.parent
            if cg.top is None or not str(parent).startswith(str(cg.top)) or not os.access(parent, os.W_OK):
                raise CgroupUnavailable(f"{cg.path}: memory controller not enabled for children "
                                        f"(cgroup.subtree_control) and the parent {parent} is not usable")
            return parent, 2
    return cg.path, cg.version


def create(limit_bytes: int) -> TestCgroup:
    """Make a child memory cgroup with ``limit_bytes``; raises CgroupUnavailable with the reason."""
    parent, version = _parent()
    path = parent / f"trainerd-test-{os.getpid()}-{next(_counter)}"
    try:
        path.mkdir()
    except OSError as e:
        raise CgroupUnavailable(f"cannot create {path}: {e.strerror or e}") from e
    cg = TestCgroup(path, version, limit_bytes)
    try:
        if version == 2:
            (path / "memory.max").write_text(str(limit_bytes))
            if (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0")
        else:
            # The kernel keeps memsw (memory+swap) >= memory at every write, else EINVAL. So the
            # order depends on direction: raising, memsw goes first; lowering from the default
            # "unlimited" (this case), memory.limit_in_bytes must go first (measured: memsw
            # first fails with EINVAL on a fresh child).
            memsw = path / "memory.memsw.limit_in_bytes"
            limit = path / "memory.limit_in_bytes"
            current = int(limit.read_text())
            order = [limit, memsw] if limit_bytes <= current else [memsw, limit]
            for f in order:
                if f.exists():
                    f.write_text(str(limit_bytes))
    except OSError as e:
        cg.destroy()
        raise CgroupUnavailable(f"cannot set a limit on {path}: {e.strerror or e}") from e
    return cg


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int) -> Iterator[TestCgroup]:
    cg = create(limit_bytes)
    try:
        yield cg
    finally:
        cg.destroy()


def unavailable_reason() -> str | None:
    """None if a memory cgroup can be created here, else why not (tries once)."""
    try:
        cg = create(64 << 20)
    except CgroupUnavailable as e:
        return str(e)
    cg.destroy()
    return None
