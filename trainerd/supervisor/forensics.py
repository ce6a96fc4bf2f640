"""Kernel OOM evidence: did the kernel's OOM killer end this worker, or someone else?

A SIGKILL that trainerd did not send is usually the OOM killer, but an operator's `kill -9`,
earlyoom or a chaos test look the same from the exit status alone. Backing off after those
would shrink a healthy batch for nothing, so the kernel's own evidence decides: its OOM kill
count (/proc/vmstat ``oom_kill``, every kind, global and cgroup) and its log naming the pid.
"""

from __future__ import annotations

import errno
import os

__all__ = ["kernel_oom_killed", "kmsg_names_oom_kill", "last_traceback", "vmstat_oom_kills"]

_TAIL_BYTES = 64 << 10
_ATTEMPT_MARK = b"\n--- "  # child.py opens each attempt's section of worker.stderr with it


def vmstat_oom_kills() -> int | None:
    """The kernel's count of OOM kills since boot (every kind: global and cgroup), or None."""
    try:
        with open("/proc/vmstat", "rb") as f:
            for line in f:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def kmsg_names_oom_kill(pid: int) -> bool | None:
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


def kernel_oom_killed(pid: int | None, oom_kills_before: int | None) -> bool | None:
    """Did the kernel's OOM killer end this worker? False only on evidence: its OOM kill count
    did not move during the attempt, or it moved and the kernel log names other pids.
    None = cannot tell (then a bare SIGKILL is taken for an OOM kill)."""
    if pid is None or oom_kills_before is None:
        return None
    now = vmstat_oom_kills()
    if now is None:
        return None
    if now == oom_kills_before:
        return False
    return kmsg_names_oom_kill(pid)


def last_traceback(stderr_path: "os.PathLike[str]", max_chars: int = 2000) -> str | None:
    """The last Python traceback in the current attempt's part of ``worker.stderr`` (its end:
    the innermost frames and the exception), or None when it left none (a signal, a segfault).
    Reads only the file's last 64 KiB: a worker's library noise never makes this slow."""
    try:
        with open(stderr_path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
    except OSError:
        return None
    mark = tail.rfind(_ATTEMPT_MARK)
    if mark >= 0:
        tail = tail[mark + 1:]
    at = tail.rfind(b"Traceback (most recent call last):")
    if at < 0:
        return None
    text = tail[at:].decode("utf-8", "replace").rstrip()
    return text if len(text) <= max_chars else "...\n" + text[-max_chars:]
