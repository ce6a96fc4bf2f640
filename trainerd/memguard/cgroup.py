"""The memory cgroup (v1 or v2) a worker is charged to, and the few files read from it.

Under a cgroup with a limit the kernel compares the *cgroup's* usage with its limit, so that
is what the guard compares too (see :mod:`trainerd.memguard.sampler`). v2: ``memory.current``,
``memory.max``/``memory.high``, ``memory.events``, ``memory.pressure``; v1:
``memory.usage_in_bytes``, ``memory.limit_in_bytes`` (+ memsw, + the hierarchical limit in
``memory.stat``), ``memory.oom_control``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainerd.memguard.procfs import NO_LIMIT, OpenFiles, read_int, read_text

__all__ = ["Cgroup", "find_memory_cgroup", "parse_keyed", "parse_psi"]


def parse_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (memory.stat, memory.events, memory.oom_control) -> dict."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        try:
            out[k] = int(v)
        except ValueError:
            pass
    return out


def parse_psi(text: str) -> dict[str, dict[str, float]]:
    """Parse a PSI file (``/proc/pressure/memory``, ``memory.pressure``) into
    ``{"some": {"avg10": .., "avg60": .., "avg300": .., "total": ..}, "full": {...}}``."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        vals: dict[str, float] = {}
        for kv in parts[1:]:
            k, _, v = kv.partition("=")
            try:
                vals[k] = float(v)
            except ValueError:
                pass
        out[parts[0]] = vals
    return out


def _mounts() -> list[tuple[str, str, str, str]]:
    """(root, mountpoint, fstype, superopts) of cgroup mounts from /proc/self/mountinfo."""
    out: list[tuple[str, str, str, str]] = []
    try:
        text = read_text("/proc/self/mountinfo", 1 << 20)
    except OSError:
        return out
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f = left.split()
        r = right.split()
        if len(f) >= 5 and r and r[0] in ("cgroup", "cgroup2"):
            out.append((f[3], f[4].replace("\\040", " "), r[0], r[2] if len(r) > 2 else ""))
    return out


def _join(mount_root: str, mountpoint: str, cg_path: str) -> Path:
    # With a cgroup namespace (containers) the mount's root is our own cgroup and
    # /proc/self/cgroup already shows "/", or the mount root is a prefix of our path.
    if mount_root != "/" and (cg_path == mount_root or cg_path.startswith(mount_root + "/")):
        cg_path = cg_path[len(mount_root):]
    return Path(mountpoint) / cg_path.lstrip("/")


@dataclass
class Cgroup:
    """One memory cgroup directory, v1 or v2, and the few files the guard reads from it."""

    version: int
    path: Path
    top: Path | None = None  # the hierarchy's mountpoint (limits are inherited up to here)

    @classmethod
    def at(cls, path: str | Path) -> Cgroup | None:
        """The cgroup at ``path``; the version is told by its files (v2 memory.current)."""
        p = Path(path)
        if (p / "memory.current").exists():
            return cls(2, p)
        if (p / "memory.usage_in_bytes").exists():
            return cls(1, p)
        return None

    def usage(self) -> tuple[int, int]:
        """(usage, inactive_file) in bytes. v1 usage is hierarchical, so is total_inactive_file."""
        return self.raw_usage(), self.inactive_file()

    def raw_usage(self, files: OpenFiles | None = None) -> int:
        """One counter: cheap."""
        path = self.path / ("memory.current" if self.version == 2 else "memory.usage_in_bytes")
        if files is None:
            return read_int(path) or 0
        try:
            return int(files.read(str(path), 64))
        except (OSError, ValueError):
            return read_int(path) or 0

    def inactive_file(self) -> int:
        """From memory.stat: the kernel flushes per-CPU statistics to format it — the costly read."""
        stat = parse_keyed(read_text(self.path / "memory.stat"))
        if self.version == 2:
            return stat.get("inactive_file", 0)
        return stat.get("total_inactive_file", stat.get("inactive_file", 0))

    def limit(self) -> tuple[int | None, str]:
        """The smallest limit that applies to this cgroup (its own or an ancestor's) and where."""
        return self._limit_v1() if self.version == 1 else self._limit_v2()

    def _limit_v1(self) -> tuple[int | None, str]:
        best: tuple[int | None, str] = (None, "")
        for name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
            v = read_int(self.path / name)
            if v is not None and (best[0] is None or v < best[0]):
                best = (v, f"cgroup_v1:{self.path / name}")
        try:
            stat = parse_keyed(read_text(self.path / "memory.stat"))
        except OSError:
            stat = {}
        v = stat.get("hierarchical_memory_limit")
        if v is not None and v < NO_LIMIT and (best[0] is None or v < best[0]):
            best = (v, f"cgroup_v1:{self.path}/memory.stat:hierarchical_memory_limit")
        return best

    def _limit_v2(self) -> tuple[int | None, str]:
        best: tuple[int | None, str] = (None, "")
        p = self.path
        while True:
            # memory.high is a throttling point, not a kill point; but a worker held at it
            # crawls, so for the guard it is a limit too.
            for name in ("memory.max", "memory.high"):
                v = read_int(p / name)
                if v is not None and (best[0] is None or v < best[0]):
                    best = (v, f"cgroup_v2:{p / name}")
            if self.top is None or p == self.top or p.parent == p or not (p.parent / "memory.max").exists():
                break
            p = p.parent
        return best

    def oom_kills(self) -> int | None:
        try:
            if self.version == 2:
                return parse_keyed(read_text(self.path / "memory.events")).get("oom_kill")
            return parse_keyed(read_text(self.path / "memory.oom_control")).get("oom_kill")
        except OSError:
            return None

    def pressure_path(self) -> Path | None:
        p = self.path / "memory.pressure"
        return p if self.version == 2 and p.exists() else None


def find_memory_cgroup(pid: int | str = "self") -> tuple[Cgroup | None, Path | None]:
    """The memory cgroup of ``pid`` (v2 where it has the memory controller, else v1), and the
    v2 directory whose ``memory.pressure`` is the pid's PSI (may exist without the controller)."""
    try:
        lines = read_text(f"/proc/{pid}/cgroup").splitlines()
    except OSError:
        return None, None
    v1_path = v2_path = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_path = parts[2]
        elif "memory" in parts[1].split(","):
            v1_path = parts[2]
    mounts = _mounts()
    v2_dir = None
    if v2_path is not None:
        for root, mp, fstype, _ in mounts:
            if fstype == "cgroup2":
                d = _join(root, mp, v2_path)
                if d.is_dir():
                    v2_dir = d
                    cg = Cgroup.at(d)
                    if cg is not None and cg.version == 2:
                        cg.top = Path(mp)
                        return cg, d
                    break
    if v1_path is not None:
        for root, mp, fstype, opts in mounts:
            if fstype == "cgroup" and "memory" in opts.split(","):
                d = _join(root, mp, v1_path)
                found = Cgroup.at(d) or Cgroup.at(mp)
                if found is not None:
                    found.top = Path(mp)
                    return found, v2_dir
    return None, v2_dir
