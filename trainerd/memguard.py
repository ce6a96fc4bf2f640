"""The memory guard: stop the worker gracefully before the kernel OOM killer can.

Lives in the supervisor (stdlib + psutil only; never torch). It measures what the kernel
measures, decides, and writes ``batch_dir/.stop``; the supervisor sends the signals.

Measuring
    Under a cgroup with a limit the kernel compares the *cgroup's* usage with its limit, so
    that is what we compare too: v2 ``memory.current`` / v1 ``memory.usage_in_bytes`` minus
    reclaimable page cache (``inactive_file``, as kubelet does — otherwise reading a big file
    looks like a leak). Without a cgroup limit we use the worker tree's unreclaimable resident
    memory (RssAnon + RssShmem of the worker and every descendant: DataLoader workers,
    torchrun ranks) against the headroom ``MemAvailable`` leaves. The effective limit is the
    smallest of the configured ``memory.limit``, the cgroup limit (including ancestors'),
    physical memory, and usage + MemAvailable (the host may run out before the cgroup does).

Deciding (one ``poll(now)`` per ``memory.interval_ms``)::

    usage >= soft; or, above soft - 2 x (hard - soft): growing so fast that hard is < 3 polls
    away, or growing over the last second and over a full robust 10 s trend so that the learned
    stop time (+ 2 polls) would carry it past hard; or PSI sustained
        -> "stop"     (.stop = "memory", written once, atomically)
    usage >= hard                    -> "term"      (the supervisor sends SIGTERM)
    term + kill_grace_s, usage >= hard + half the rest, or (at/after hard) the limit is
    under two polls away at the last second's rate
                                     -> "kill"      (the supervisor sends SIGKILL)
    peaks growing steadily (both halves of leak_window_s) to reach soft within
    leak_horizon_s, or age > max_worker_age_s
                                     -> "recycle"   (.stop = "recycle", once)

Every non-"none" decision is logged with the numbers behind it.

Cost: a poll preads two or three small procfs/cgroupfs files kept open (no psutil per
poll); memory.stat (a kernel stats flush) and PSI once a second, memory.stat every poll only
near the thresholds; the worker's process tree is re-discovered at most once a second through
``/proc/<pid>/task/<tid>/children`` (psutil's full /proc walk only where that file is
missing). Measured: ~0.35% of a core at 100 ms on a loaded 2-core VM.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from trainerd.config import LoraSettings, MemorySettings, TrainSettings
from trainerd.fsutil import atomic_write_bytes

__all__ = [
    "Cgroup",
    "Decision",
    "MemoryGuard",
    "Plan",
    "Sample",
    "estimate_training_bytes",
    "find_memory_cgroup",
    "parse_psi",
    "read_model_shape",
]

ACTIONS = ("none", "stop", "recycle", "term", "kill")

# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 on x86-64);
# anything this large is not a limit.
_NO_LIMIT = 1 << 62

# Worker runtime before any model: python + torch + transformers + peft + tokenizers
# (measured 340 MiB for the imports alone on CPU; rounded up for the data pipeline).
RUNTIME_BYTES = 400 << 20
# Estimates are padded by this much: allocator fragmentation, temporaries we do not model.
ESTIMATE_MARGIN = 1.10
# Copies of the (micro x seq x vocab) fp32 logits alive at the peak: logits, the float
# upcast / log-softmax inside the loss, and their gradients. Calibrated against SmolLM2-135M
# (seq 256 x micro-batch 4 peaked at 3.3-3.4 GiB RSS; this model says 3.5 GiB).
LOGIT_COPIES = 4

_TREE_REFRESH_S = 1.0       # re-discover the worker's descendants at most this often
# Re-read cgroup limits this often: `systemctl set-property MemoryMax=` takes effect in the
# kernel at once, and in a container test a limit lowered under a running worker killed it
# 1.7 s later while a 5 s refresh still had the guard on the old limit. Three small reads.
_LIMIT_REFRESH_S = 0.5
_STAT_REFRESH_S = 1.0       # re-read memory.stat (inactive_file) at least this often
_PSI_REFRESH_S = 1.0        # PSI averages change every 2 s in the kernel
# Two growth rates. The trend spans several training steps and is a Theil-Sen fit (the
# median of the slopes between every pair of samples): a one-off jump (loading the model, the
# first forward pass) moves only the pairs that straddle it, so the median stays at the
# plateau's zero where a least-squares line would tilt for the whole window. The recent rate
# (least squares over the last second) is what is happening now. The sustained prediction
# uses the smaller of the two, and only when both say "growing"; the fast one the recent.
_TREND_WINDOW_S = 10.0
_TREND_SAMPLE_S = 0.25      # the trend keeps one sample per quarter second (<= 40 points)
_RECENT_WINDOW_S = 1.0
_RATE_MIN_SPAN_S = 0.3      # the recent fit needs samples spanning at least this long
_TREND_MIN_SPAN_S = 0.95 * _TREND_WINDOW_S  # the trend, a (nearly) full window
_KILL_REPEAT_S = 1.0        # re-issue "kill" while the process is still there
_LEAK_BINS = 8              # the leak fit: the peak of each 1/8 of leak_window_s (steps must be shorter)
_LEAK_MIN_RISE = 0.02       # a leak must have grown >= 2% of the limit across its window


# --- small readers ------------------------------------------------------------------------


def _read(path: str | Path, limit: int = 1 << 16) -> str:
    # os.open/os.read: no Python file object, no buffering layer — this runs ten times a
    # second. procfs/cgroupfs files are generated on read; loop until EOF.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        size = 0
        while size < limit:
            b = os.read(fd, limit - size)
            if not b:
                break
            chunks.append(b)
            size += len(b)
        return b"".join(chunks).decode("ascii", "replace")
    finally:
        os.close(fd)


def _read_int(path: str | Path) -> int | None:
    try:
        text = _read(path, 256).strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        v = int(text)
    except ValueError:
        return None
    return None if v >= _NO_LIMIT else v


class _OpenFiles:
    """Hot files kept open and re-read with pread(fd, n, 0).

    Saves the path walk of open(2) on every poll (~30% of a cold read here). procfs and
    cgroupfs files are regenerated on every read from offset 0. An open /proc/<pid>/status
    stays bound to that process: once it is reaped, reads fail (ESRCH) instead of silently
    describing a new process that reused the pid.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def read(self, path: str, limit: int = 1 << 13) -> str:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self._fds[path] = fd
        try:
            data = os.pread(fd, limit, 0)
        except OSError:
            self.close(path)
            raise
        return data.decode("ascii", "replace")

    def close(self, path: str) -> None:
        fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    def close_all(self, prefix: str = "") -> None:
        for path in [p for p in self._fds if p.startswith(prefix)]:
            self.close(path)

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown
        try:
            self.close_all()
        except Exception:
            pass


def _parse_keyed(text: str) -> dict[str, int]:
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


def _meminfo(limit: int = 1 << 14) -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out: dict[str, int] = {}
    for line in _read("/proc/meminfo", limit).splitlines():
        k, _, rest = line.partition(":")
        f = rest.split()
        if f:
            try:
                out[k] = int(f[0]) * (1024 if len(f) > 1 else 1)
            except ValueError:
                pass
    return out


def _mem_available(files: _OpenFiles | None = None) -> int:
    # MemAvailable is the third line; 256 bytes cover it without formatting the whole file.
    text = files.read("/proc/meminfo", 256) if files is not None else _read("/proc/meminfo", 256)
    i = text.find("MemAvailable:")
    if i < 0:
        return _meminfo().get("MemAvailable", 0)
    return int(text[i + 13:].split(None, 1)[0]) * 1024


def _status_kib(text: str, key: str) -> int:
    i = text.find(key)
    if i < 0:
        return 0
    j = text.find("kB", i)
    return int(text[i + len(key):j]) * 1024


def _proc_status(pid: int, files: _OpenFiles | None = None) -> tuple[bool, int, int]:
    """(alive, unreclaimable_bytes, rss_bytes) from /proc/<pid>/status.

    Unreclaimable = RssAnon + RssShmem: file-backed pages (memory-mapped weights, libraries)
    are clean page cache the kernel can drop; anonymous and shmem pages are not.
    A zombie counts as dead: it holds no memory, only its pid (the supervisor reaps it).
    """
    try:
        path = f"/proc/{pid}/status"
        text = files.read(path) if files is not None else _read(path, 1 << 13)
    except OSError:
        return False, 0, 0
    i = text.find("State:")
    st = text[i + 6:i + 16].strip()[:1] if i >= 0 else "?"
    if st in ("Z", "X"):
        return False, 0, 0
    # str.find, not a loop over ~55 lines: this runs for every process of the tree, every poll.
    rss = _status_kib(text, "VmRSS:")
    if "RssAnon:" not in text:  # kernels before 4.5: all of RSS, the conservative side
        return True, rss, rss
    return True, _status_kib(text, "RssAnon:") + _status_kib(text, "RssShmem:"), rss


def _children(pid: int) -> list[int] | None:
    """Direct children through /proc/<pid>/task/*/children; None where the kernel lacks it."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    kids: list[int] = []
    for tid in tids:
        try:
            kids.extend(int(x) for x in _read(f"/proc/{pid}/task/{tid}/children", 1 << 16).split())
        except FileNotFoundError:
            if tid == str(pid) and os.path.exists(f"/proc/{pid}"):
                return None  # CONFIG_PROC_CHILDREN is off: fall back to psutil
        except OSError:
            pass
    return kids


def _tree(pid: int) -> list[int]:
    """The pid and all its descendants."""
    out = [pid]
    i = 0
    while i < len(out):
        kids = _children(out[i])
        if kids is None:
            try:
                return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
            except psutil.Error:
                return [pid]
        out.extend(k for k in kids if k not in out)
        i += 1
    return out


def _predict_from(st: MemorySettings) -> float:
    """Fraction of the limit from which growth predictions are made: soft - 2 x (hard - soft)
    (0.65 by default). Lower catches fast growth sooner (at 1 GiB/s a 100 ms poll is 100 MiB);
    higher spares bursts that level off (a model loading)."""
    return max(0.1, st.soft - 2 * (st.hard - st.soft))


def _robust_slope(points: Any) -> tuple[float, float]:
    """Theil-Sen slope (median of pairwise slopes, per second) and span of (t, y) points.

    O(n^2): keep n small (the trend holds <= 41 points: ~800 pairs, ~0.2 ms).
    """
    pts = list(points)
    n = len(pts)
    if n < 2:
        return 0.0, 0.0
    slopes = []
    for i in range(n - 1):
        ti, yi = pts[i]
        for j in range(i + 1, n):
            dt = pts[j][0] - ti
            if dt > 0:
                slopes.append((pts[j][1] - yi) / dt)
    if not slopes:
        return 0.0, 0.0
    slopes.sort()
    m = len(slopes) // 2
    med = slopes[m] if len(slopes) % 2 else 0.5 * (slopes[m - 1] + slopes[m])
    return med, pts[-1][0] - pts[0][0]


def _slope(points: Any) -> tuple[float, float]:
    """Least-squares slope (per second) and the span in seconds of (t, y) points."""
    n = len(points)
    if n < 2:
        return 0.0, 0.0
    t0 = points[0][0]
    sx = sy = sxx = sxy = 0.0
    for t, y in points:
        x = t - t0
        sx += x
        sy += y
        sxx += x * x
        sxy += x * y
    den = n * sxx - sx * sx
    span = points[-1][0] - t0
    if den <= 0:
        return 0.0, span
    return (n * sxy - sx * sy) / den, span


# --- the cgroup -------------------------------------------------------------------------


def _mounts() -> list[tuple[str, str, str, str]]:
    """(root, mountpoint, fstype, superopts) of cgroup mounts from /proc/self/mountinfo."""
    out = []
    try:
        text = _read("/proc/self/mountinfo", 1 << 20)
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

    def raw_usage(self, files: _OpenFiles | None = None) -> int:
        """One counter: cheap."""
        path = self.path / ("memory.current" if self.version == 2 else "memory.usage_in_bytes")
        if files is None:
            return _read_int(path) or 0
        try:
            return int(files.read(str(path), 64))
        except (OSError, ValueError):
            return _read_int(path) or 0

    def inactive_file(self) -> int:
        """From memory.stat: the kernel flushes per-CPU statistics to format it — the costly read."""
        stat = _parse_keyed(_read(self.path / "memory.stat"))
        if self.version == 2:
            return stat.get("inactive_file", 0)
        return stat.get("total_inactive_file", stat.get("inactive_file", 0))

    def limit(self) -> tuple[int | None, str]:
        """The smallest limit that applies to this cgroup (its own or an ancestor's) and where."""
        best: tuple[int | None, str] = (None, "")
        if self.version == 1:
            for name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
                v = _read_int(self.path / name)
                if v is not None and (best[0] is None or v < best[0]):
                    best = (v, f"cgroup_v1:{self.path / name}")
            try:
                stat = _parse_keyed(_read(self.path / "memory.stat"))
            except OSError:
                stat = {}
            v = stat.get("hierarchical_memory_limit")
            if v is not None and v < _NO_LIMIT and (best[0] is None or v < best[0]):
                best = (v, f"cgroup_v1:{self.path}/memory.stat:hierarchical_memory_limit")
            return best
        p = self.path
        while True:
            # memory.high is a throttling point, not a kill point; but a worker held at it
            # crawls, so for the guard it is a limit too.
            for name in ("memory.max", "memory.high"):
                v = _read_int(p / name)
                if v is not None and (best[0] is None or v < best[0]):
                    best = (v, f"cgroup_v2:{p / name}")
            if self.top is None or p == self.top or p.parent == p or not (p.parent / "memory.max").exists():
                break
            p = p.parent
        return best

    def oom_kills(self) -> int | None:
        try:
            if self.version == 2:
                return _parse_keyed(_read(self.path / "memory.events")).get("oom_kill")
            return _parse_keyed(_read(self.path / "memory.oom_control")).get("oom_kill")
        except OSError:
            return None

    def pressure_path(self) -> Path | None:
        p = self.path / "memory.pressure"
        return p if self.version == 2 and p.exists() else None


def find_memory_cgroup(pid: int | str = "self") -> tuple[Cgroup | None, Path | None]:
    """The memory cgroup of ``pid`` (v2 where it has the memory controller, else v1), and the
    v2 directory whose ``memory.pressure`` is the pid's PSI (may exist without the controller)."""
    try:
        lines = _read(f"/proc/{pid}/cgroup").splitlines()
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
                cg = Cgroup.at(d) or Cgroup.at(mp)
                if cg is not None:
                    cg.top = Path(mp)
                    return cg, v2_dir
    return None, v2_dir


# --- samples and decisions --------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One measurement. ``usage_bytes`` against ``limit_bytes`` is what decisions use."""

    t: float
    usage_bytes: int
    limit_bytes: int
    source: str
    tree_bytes: int                  # worker tree RssAnon + RssShmem
    tree_rss_bytes: int              # worker tree VmRSS (counts shared pages once per process)
    tree_pids: int
    cgroup_usage_bytes: int | None   # raw, before inactive_file is subtracted
    inactive_file_bytes: int | None
    mem_available_bytes: int
    psi_some_avg10: float | None
    alive: bool


@dataclass(frozen=True)
class Decision:
    """What the supervisor should do now, and the numbers behind it."""

    action: str = "none"             # none | stop | recycle | term | kill
    # soft | predicted | predicted_fast | psi | hard | grace | margin | imminent | leak | age
    reason: str = ""
    usage_bytes: int = 0
    limit_bytes: int = 0
    source: str = ""
    soft_bytes: int = 0
    hard_bytes: int = 0
    # sustained growth: min(trend, recent) when both grow, else 0; computed from soft - (hard -
    # soft) up (below that nothing is predicted, and the robust trend is not worth its cost)
    rate_bytes_per_s: float = 0.0
    recent_rate_bytes_per_s: float = 0.0  # growth over the last second
    time_to_hard_s: float | None = None  # at that rate; None when not growing
    tree_bytes: int = 0
    psi_some_avg10: float | None = None
    stop_written: bool = False       # this poll wrote batch_dir/.stop

    def fields(self) -> dict[str, Any]:
        return {
            "action": self.action, "reason": self.reason, "usage_bytes": self.usage_bytes,
            "limit_bytes": self.limit_bytes, "source": self.source, "soft_bytes": self.soft_bytes,
            "hard_bytes": self.hard_bytes, "rate_bytes_per_s": round(self.rate_bytes_per_s),
            "recent_rate_bytes_per_s": round(self.recent_rate_bytes_per_s),
            "time_to_hard_s": None if self.time_to_hard_s is None else round(self.time_to_hard_s, 3),
            "tree_bytes": self.tree_bytes, "psi_some_avg10": self.psi_some_avg10,
        }


@dataclass(frozen=True)
class Plan:
    """Where a worker should start so that it fits under the soft limit."""

    micro_batch_size: int
    grad_accum_steps: int
    gradient_checkpointing: bool
    estimate_bytes: int
    limit_bytes: int
    budget_bytes: int = 0            # soft x limit minus what the cgroup already holds
    fits: bool = True                # False: even micro-batch 1 + checkpointing is estimated over


@dataclass
class _Worker:
    pid: int
    batch_dir: Path
    started_at: float
    tree: list[int] = field(default_factory=list)
    tree_at: float = -math.inf
    trend: deque = field(default_factory=deque)   # (t, usage) over _TREND_WINDOW_S, downsampled
    recent: deque = field(default_factory=deque)  # (t, usage) over _RECENT_WINDOW_S
    long: deque = field(default_factory=deque)    # [bin start, highest usage in it], _LEAK_BINS bins
    stop_reason: str | None = None
    stop_at: float | None = None
    usage_at_stop: int = 0
    peak_after_stop: int = 0
    term_at: float | None = None
    kill_at: float | None = None
    exited_at: float | None = None
    recycled: bool = False
    psi_since: float | None = None
    last_t: float | None = None


class MemoryGuard:
    """Samples the running worker and decides none / stop / recycle / term / kill.

    ``now`` and ``started_at`` must come from the same clock; ``time.monotonic()`` is best
    (a wall-clock step would read as sudden age, or distort a growth rate).
    Not thread-safe: the supervisor's main loop owns it.
    """

    def __init__(self, settings: MemorySettings, log: Any = None, *, cgroup: Cgroup | str | Path | None = None,
                 psi_path: str | Path | None = None):
        """``cgroup`` / ``psi_path`` override detection (tests, benchmarks, a worker placed in
        its own cgroup); by default the guard watches the cgroup of this process."""
        self.settings = settings
        self.log = log if log is not None else _NullLog()
        if cgroup is None:
            self.cgroup, v2_dir = find_memory_cgroup()
            default_psi = (v2_dir / "memory.pressure") if v2_dir is not None else None
        else:
            self.cgroup = cgroup if isinstance(cgroup, Cgroup) else Cgroup.at(cgroup)
            if self.cgroup is None:
                raise ValueError(f"{cgroup}: not a memory cgroup (no memory.current / memory.usage_in_bytes)")
            default_psi = self.cgroup.pressure_path()
        if psi_path is None:
            psi_path = default_psi if default_psi is not None and default_psi.exists() else Path("/proc/pressure/memory")
        self.psi_path: Path | None = Path(psi_path) if Path(psi_path).exists() else None
        self.interval_s = settings.interval_ms / 1000.0
        self.physical_bytes = _meminfo().get("MemTotal", 0) or psutil.virtual_memory().total
        self.configured_bytes = None if settings.limit == "auto" else int(settings.limit)
        # How long "stop" takes to become an exit (finish the step + checkpoint), and how much
        # memory the checkpoint adds; learned from each graceful stop.
        self.checkpoint_s = float(getattr(settings, "checkpoint_estimate_s", 5.0))
        self.checkpoint_bytes = 0
        self._w: _Worker | None = None
        self._files = _OpenFiles()
        self._psi: float | None = None
        self._psi_at = -math.inf
        self._inactive = 0
        self._inactive_at: float | None = None
        # Below this fraction of the limit nothing can fire (the stop prediction starts at
        # _predict_from); keep a margin under it.
        self._stat_every_poll_from = max(0.05, _predict_from(settings) - 0.05)
        self._limit_at = -math.inf
        self._refresh_limit(force=True)
        self.log.info(
            "memory_limit_detected", limit_bytes=self.limit_bytes, source=self.source,
            configured_bytes=self.configured_bytes, cgroup_limit_bytes=self.cgroup_limit_bytes,
            physical_bytes=self.physical_bytes,
            cgroup=None if self.cgroup is None else f"v{self.cgroup.version}:{self.cgroup.path}",
            psi=str(self.psi_path) if self.psi_path else None,
        )

    # --- limits ------------------------------------------------------------------------

    def _refresh_limit(self, force: bool = False, now: float | None = None) -> None:
        if not force and now is not None and now - self._limit_at < _LIMIT_REFRESH_S:
            return
        if now is not None:
            self._limit_at = now
        cg_limit, cg_source = (None, "") if self.cgroup is None else self.cgroup.limit()
        if cg_limit is not None and cg_limit >= self.physical_bytes:
            cg_limit = None  # a cgroup limit above physical memory limits nothing
        self.cgroup_limit_bytes = cg_limit
        cands = [(self.physical_bytes, "physical:/proc/meminfo:MemTotal")]
        if cg_limit is not None:
            cands.append((cg_limit, cg_source))
        if self.configured_bytes is not None:
            cands.append((self.configured_bytes, "config:memory.limit"))
        limit, source = min(cands, key=lambda c: c[0])
        old = getattr(self, "limit_bytes", None)
        self.limit_bytes, self.source = limit, source
        if old is not None and old != limit:
            # e.g. `systemctl set-property trainerd MemoryMax=...` while running
            self.log.info("memory_limit_changed", limit_bytes=limit, previous_limit_bytes=old, source=source)

    # --- the worker --------------------------------------------------------------------

    def attach(self, pid: int, batch_dir: Path, started_at: float) -> None:
        """Start watching a worker (its whole process tree)."""
        self._w = _Worker(pid=int(pid), batch_dir=Path(batch_dir), started_at=float(started_at))
        self._w.tree = [int(pid)]

    def detach(self) -> None:
        """Stop watching; learn from a graceful stop how long stopping takes."""
        w, self._w = self._w, None
        self._files.close_all("/proc/")  # the tree's status files (meminfo reopens on the next poll)
        if w is None or w.stop_at is None or w.term_at is not None or w.kill_at is not None:
            return
        end = w.exited_at if w.exited_at is not None else w.last_t
        if end is None or end < w.stop_at:
            return
        dur = max(0.05, end - w.stop_at)
        grew = max(0, w.peak_after_stop - w.usage_at_stop)
        # EWMA that forgets slowly, and never below the latest: a stop that took long once
        # (a long step to finish first) will again.
        self.checkpoint_s = max(dur, 0.7 * self.checkpoint_s + 0.3 * dur)
        self.checkpoint_bytes = max(grew, int(0.7 * self.checkpoint_bytes + 0.3 * grew))
        self.log.info("memory_stop_timing_learned", stop_to_exit_s=round(dur, 3), checkpoint_added_bytes=grew,
                      checkpoint_estimate_s=round(self.checkpoint_s, 3), checkpoint_bytes=self.checkpoint_bytes)

    def kernel_oom_kills(self) -> int:
        """The cgroup's oom_kill counter (v2 memory.events, v1 memory.oom_control); 0 if unknown."""
        if self.cgroup is None:
            return 0
        return self.cgroup.oom_kills() or 0

    # --- sampling ----------------------------------------------------------------------

    def sample(self, now: float) -> Sample:
        """Measure once. Cheap: a few small file reads; the process tree at most once a second."""
        self._refresh_limit(now=now)
        w = self._w
        tree_bytes = tree_rss = 0
        alive = False
        npids = 0
        if w is not None:
            if now - w.tree_at >= _TREE_REFRESH_S:
                w.tree = _tree(w.pid)
                w.tree_at = now
            live = []
            for i, pid in enumerate(w.tree):
                ok, unrecl, rss = _proc_status(pid, self._files)
                if i == 0:
                    alive = ok
                if ok:
                    live.append(pid)
                    tree_bytes += unrecl
                    tree_rss += rss
                else:
                    self._files.close(f"/proc/{pid}/status")
            w.tree = live if alive else live or [w.pid]
            npids = len(live)
        avail = _mem_available(self._files)
        cg_usage = inactive = None
        if self.cgroup is not None and self.cgroup_limit_bytes is not None:
            cg_usage = self.cgroup.raw_usage(self._files)
            # memory.stat costs several times the usage counter (a stats flush), and
            # inactive_file moves slowly next to a 100 ms poll: re-read it once a second, and on
            # every poll once usage minus the last value is anywhere near a threshold.
            if (self._inactive_at is None or now - self._inactive_at >= _STAT_REFRESH_S
                    or cg_usage - self._inactive >= self._stat_every_poll_from * self.limit_bytes):
                self._inactive = self.cgroup.inactive_file()
                self._inactive_at = now
            inactive = self._inactive
            usage = max(0, cg_usage - inactive)
        else:
            usage = tree_bytes
        limit, source = self.limit_bytes, self.source
        if usage + avail < limit:
            limit, source = usage + avail, "available:/proc/meminfo:MemAvailable"
        # The kernel updates the PSI averages every 2 s: reading them ten times a second is waste.
        if self.psi_path is not None and self.settings.psi_threshold > 0 \
                and now - self._psi_at >= min(_PSI_REFRESH_S, self.settings.psi_sustain_s / 4):
            self._psi_at = now
            try:
                self._psi = parse_psi(_read(self.psi_path, 512)).get("some", {}).get("avg10")
            except OSError:
                self._psi = None
        psi = self._psi
        return Sample(t=now, usage_bytes=usage, limit_bytes=limit, source=source, tree_bytes=tree_bytes,
                      tree_rss_bytes=tree_rss, tree_pids=npids, cgroup_usage_bytes=cg_usage,
                      inactive_file_bytes=inactive, mem_available_bytes=avail, psi_some_avg10=psi, alive=alive)

    def poll(self, now: float) -> Decision:
        """Sample and decide. For stop/recycle the .stop file is already written."""
        if self._w is None:
            return Decision()
        return self.decide(self.sample(now), now)

    # --- deciding ----------------------------------------------------------------------

    def decide(self, s: Sample, now: float) -> Decision:
        """The rules, in order of severity. Public so that tests can feed exact samples."""
        w = self._w
        if w is None:
            return Decision()
        st = self.settings
        # A long gap between polls means the supervisor itself was starved of CPU (or stopped):
        # the log says so, since it explains a late decision.
        gap_s = None if w.last_t is None else now - w.last_t
        w.last_t = now
        if not s.alive:
            if w.exited_at is None:
                w.exited_at = now
            return Decision(usage_bytes=s.usage_bytes, limit_bytes=s.limit_bytes, source=s.source)
        if w.stop_at is not None:
            w.peak_after_stop = max(w.peak_after_stop, s.usage_bytes)

        point = (now, s.usage_bytes)
        if not w.trend or now - w.trend[-1][0] >= _TREND_SAMPLE_S:
            w.trend.append(point)
        while w.trend and now - w.trend[0][0] > _TREND_WINDOW_S:
            w.trend.popleft()
        w.recent.append(point)
        while w.recent and now - w.recent[0][0] > _RECENT_WINDOW_S:
            w.recent.popleft()
        recent, rspan = _slope(w.recent)
        recent = recent if rspan >= _RATE_MIN_SPAN_S else 0.0
        limit = s.limit_bytes
        gate = int(limit * _predict_from(st))
        trend = 0.0
        if recent > 0 and s.usage_bytes >= gate:
            # The trend costs ~0.2 ms (Theil-Sen): only near the limits, while growing. It must
            # span the whole window: a training step's rise (seconds, repeated every step) would
            # otherwise read as a runaway on the first step of every worker whose peak is above
            # the gate (simulated: every sawtooth peaking at 70% was stopped).
            trend, tspan = _robust_slope(w.trend if w.trend[-1] is point else [*w.trend, point])
            trend = trend if tspan >= _TREND_MIN_SPAN_S else 0.0
        rate = min(trend, recent) if trend > 0 and recent > 0 else 0.0
        soft_b = int(limit * st.soft)
        hard_b = int(limit * st.hard)
        margin_b = hard_b + (limit - hard_b) // 2
        if s.usage_bytes >= hard_b:
            tth: float | None = 0.0
        elif rate > 0:
            tth = (hard_b - s.usage_bytes) / rate
        else:
            tth = None

        def out(action: str, reason: str, wrote: bool = False) -> Decision:
            d = Decision(action=action, reason=reason, usage_bytes=s.usage_bytes, limit_bytes=limit,
                         source=s.source, soft_bytes=soft_b, hard_bytes=hard_b, rate_bytes_per_s=rate,
                         recent_rate_bytes_per_s=recent,
                         time_to_hard_s=tth, tree_bytes=s.tree_bytes, psi_some_avg10=s.psi_some_avg10,
                         stop_written=wrote)
            if action != "none":
                extra = {"by": "memory_guard"} if action == "kill" else {}
                log = self.log.warning if action in ("term", "kill") and hasattr(self.log, "warning") else self.log.info
                log(f"memory_{action}_decided", pid=w.pid, batch_dir=str(w.batch_dir),
                    age_s=round(now - w.started_at, 3), tree_pids=s.tree_pids, stop_written=wrote,
                    since_last_poll_s=None if gap_s is None else round(gap_s, 3),
                    checkpoint_estimate_s=round(self.checkpoint_s, 3), **d.fields(), **extra)
            return d

        # KILL: the graceful path was too slow, or there is no room left for it.
        if w.kill_at is not None:
            if now - w.kill_at >= _KILL_REPEAT_S:
                w.kill_at = now
                return out("kill", "still_alive")
            return out("none", "")
        if w.term_at is not None and now - w.term_at >= st.kill_grace_s:
            w.kill_at = now
            return out("kill", "grace")
        if s.usage_bytes >= margin_b:
            w.kill_at = now
            return out("kill", "margin")
        if (w.term_at is not None or s.usage_bytes >= hard_b) and recent > 0 \
                and s.usage_bytes + recent * 2 * self.interval_s >= limit:
            # The limit is less than two polls away at this rate: the kernel would get there first.
            w.kill_at = now
            return out("kill", "imminent")

        # TERM at the hard limit (and make sure the worker knows why, for its result.json).
        if s.usage_bytes >= hard_b and w.term_at is None:
            wrote = self._write_stop(w, "memory", now, s.usage_bytes)
            w.term_at = now
            return out("term", "hard", wrote)
        if w.stop_reason == "memory":
            return out("none", "")

        # STOP: soft limit, predicted crossing, sustained pressure.
        if s.usage_bytes >= soft_b:
            return out("stop", "soft", self._write_stop(w, "memory", now, s.usage_bytes))
        # Horizon: the stop as learned, plus two polls (this sample is up to one old; the
        # worker notices .stop only at its next check).
        # Two predictions. Fast: at the last second's rate hard is less than three polls away
        # (this sample is up to a poll old, the next poll, the worker's next check of .stop) —
        # a runaway, whatever its history. Sustained: growing over the whole trend window too,
        # and the learned stop time (plus two polls) would carry usage past hard.
        if recent > 0 and s.usage_bytes >= gate and s.usage_bytes + recent * 3 * self.interval_s >= hard_b:
            return out("stop", "predicted_fast", self._write_stop(w, "memory", now, s.usage_bytes))
        horizon_s = self.checkpoint_s + 2 * self.interval_s
        if rate > 0 and s.usage_bytes >= gate and \
                s.usage_bytes + rate * horizon_s + self.checkpoint_bytes >= hard_b:
            return out("stop", "predicted", self._write_stop(w, "memory", now, s.usage_bytes))
        if st.psi_threshold > 0 and s.psi_some_avg10 is not None and s.psi_some_avg10 > st.psi_threshold:
            if w.psi_since is None:
                w.psi_since = now
            if now - w.psi_since >= st.psi_sustain_s:
                return out("stop", "psi", self._write_stop(w, "memory", now, s.usage_bytes))
        else:
            w.psi_since = None

        # RECYCLE: age, or a steady leak that will reach soft within the horizon.
        if w.recycled:
            return out("none", "")
        if st.max_worker_age_s > 0 and now - w.started_at >= st.max_worker_age_s:
            w.recycled = True
            return out("recycle", "age", self._write_stop(w, "recycle", now, s.usage_bytes))
        if st.leak_horizon_s > 0 and now - w.started_at >= self._leak_warmup_s():
            d = self._leak_check(w, s, now, limit, soft_b, out)
            if d is not None:
                return d
        return out("none", "")

    def _leak_check(self, w: _Worker, s: Sample, now: float, limit: int, soft_b: int, out: Any) -> Decision | None:
        """Recycle on steady growth of the *peaks*.

        The window is cut into _LEAK_BINS bins and each keeps its highest usage, so a training
        step's sawtooth (period shorter than a bin) leaves a flat row of peaks, and a leak a
        rising one. A leak also grows in both halves of the window; a one-off step up
        (allocator arenas, the first checkpoint's buffers) leaves one half flat, which a single
        fit across the window would read as growth. So: Theil-Sen per half, the smaller wins.
        """
        window = self._leak_window_s()
        bin_s = window / _LEAK_BINS
        if w.long and now - w.long[-1][0] < bin_s:
            w.long[-1][1] = max(w.long[-1][1], s.usage_bytes)
            return None
        w.long.append([now, s.usage_bytes])  # closes the previous bin
        while w.long and now - w.long[0][0] > window + bin_s:
            w.long.popleft()
        closed = [(t, y) for t, y in list(w.long)[:-1]]
        if len(closed) < _LEAK_BINS:
            return None
        half = len(closed) // 2
        lrate = min(_robust_slope(closed[:half])[0], _robust_slope(closed[half:])[0])
        span = closed[-1][0] - closed[0][0]
        level = closed[-1][1]  # the latest peak: peaks reach soft first
        if lrate <= 0 or lrate * span < _LEAK_MIN_RISE * limit or level >= soft_b \
                or (soft_b - level) / lrate > self.settings.leak_horizon_s:
            return None
        w.recycled = True
        d = out("recycle", "leak", self._write_stop(w, "recycle", now, s.usage_bytes))
        self.log.info("memory_leak_detected", pid=w.pid, leak_bytes_per_s=round(lrate), window_s=round(span, 1),
                      recent_peak_bytes=level, time_to_soft_s=round((soft_b - level) / lrate, 1))
        return d

    def _leak_warmup_s(self) -> float:
        return float(getattr(self.settings, "leak_warmup_s", 300.0))

    def _leak_window_s(self) -> float:
        return float(getattr(self.settings, "leak_window_s", 600.0))

    def _write_stop(self, w: _Worker, reason: str, now: float, usage: int) -> bool:
        """Write batch_dir/.stop atomically, once ("recycle" may be upgraded to "memory")."""
        if w.stop_reason == reason or w.stop_reason == "memory":
            return False
        try:
            # durable=False: a .stop lost to a power cut is moot, and fsync here would cost
            # milliseconds of reaction time.
            atomic_write_bytes(w.batch_dir / ".stop", reason.encode(), durable=False)
        except OSError as e:
            self.log.error("memory_stop_write_failed", path=str(w.batch_dir / ".stop"), error=str(e)) \
                if hasattr(self.log, "error") else self.log.info("memory_stop_write_failed", error=str(e))
            return False
        first = w.stop_at is None
        w.stop_reason = reason
        if first or reason == "memory":
            w.stop_at = now
            w.usage_at_stop = usage
            w.peak_after_stop = usage
        return True

    # --- planning ----------------------------------------------------------------------

    def plan_micro_batch(self, model_dir: Path, train: TrainSettings, lora: LoraSettings | None = None) -> Plan:
        """Start at the largest micro-batch estimated to fit under the soft limit.

        Halves the micro-batch (over the divisors of the configured one, so micro x accum stays
        exactly the same), doubling grad_accum_steps; at 1 turns gradient checkpointing on.
        """
        self._refresh_limit(force=True)
        shape = read_model_shape(model_dir)
        avail = _mem_available()
        baseline = 0
        limit, source = self.limit_bytes, self.source
        if self.cgroup is not None and self.cgroup_limit_bytes is not None:
            u, inact = self.cgroup.usage()
            baseline = max(0, u - inact)  # the supervisor (and anything else) already in the cgroup
        if baseline + avail < limit:
            limit, source = baseline + avail, "available:/proc/meminfo:MemAvailable"
        budget = int(limit * self.settings.soft) - baseline
        mb0, acc0 = train.micro_batch_size, train.grad_accum_steps
        effective = mb0 * acc0
        options = [(d, False) for d in range(mb0, 0, -1) if mb0 % d == 0 and not train.gradient_checkpointing]
        options += [(d, True) for d in range(mb0, 0, -1) if mb0 % d == 0 and train.gradient_checkpointing]
        if not train.gradient_checkpointing:
            options.append((1, True))
        chosen = None
        for mb, gc in options:
            est = estimate_training_bytes(shape, mb, train.seq_len, gradient_checkpointing=gc, lora=lora)
            if est <= budget:
                chosen = (mb, gc, est, True)
                break
        if chosen is None:
            mb, gc = options[-1]
            chosen = (mb, gc, estimate_training_bytes(shape, mb, train.seq_len, gradient_checkpointing=gc, lora=lora),
                      False)
        mb, gc, est, fits = chosen
        plan = Plan(micro_batch_size=mb, grad_accum_steps=effective // mb, gradient_checkpointing=gc,
                    estimate_bytes=est, limit_bytes=limit, budget_bytes=budget, fits=fits)
        fields = dict(micro_batch_size=mb, grad_accum_steps=plan.grad_accum_steps, gradient_checkpointing=gc,
                      estimate_bytes=est, budget_bytes=budget, limit_bytes=limit, source=source,
                      configured_micro_batch_size=mb0, configured_grad_accum_steps=acc0, effective_batch=effective,
                      seq_len=train.seq_len, params=shape["params"], fits=fits)
        if not fits:
            (self.log.warning if hasattr(self.log, "warning") else self.log.info)("memory_plan_does_not_fit", **fields)
        elif (mb, gc) != (mb0, train.gradient_checkpointing):
            self.log.info("memory_plan_reduced", **fields)
        else:
            self.log.info("memory_plan_kept", **fields)
        return plan


class _NullLog:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


# --- the estimate (no torch) ------------------------------------------------------------


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _safetensors_params(path: Path) -> int:
    """Parameter count from a safetensors header (8-byte length + JSON), without reading tensors."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 << 20:
            raise ValueError(f"{path}: implausible safetensors header size {n}")
        header = json.loads(f.read(n))
    total = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        total += math.prod(meta.get("shape", [])) if meta.get("shape") else 1
    return total


def read_model_shape(model_dir: Path) -> dict[str, int]:
    """The numbers the estimate needs, from config.json and the weight files' headers/sizes."""
    model_dir = Path(model_dir)
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    cfg = {**cfg.get("text_config", {}), **cfg} if isinstance(cfg.get("text_config"), dict) else cfg
    hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model") or 768)
    layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers") or 12)
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or max(1, hidden // 64))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    inter = int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden)
    vocab = int(cfg.get("vocab_size") or 32000)
    params = 0
    for p in sorted(model_dir.glob("*.safetensors")):
        try:
            params += _safetensors_params(p)
        except (OSError, ValueError, struct.error):
            params += p.stat().st_size // 4
    if params == 0:
        size = sum(p.stat().st_size for p in model_dir.glob("*.bin")) + sum(
            p.stat().st_size for p in model_dir.glob("*.gguf"))
        params = size // 4 if size else (
            vocab * hidden * (1 if cfg.get("tie_word_embeddings", True) else 2)
            + layers * (hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden + 3 * hidden * inter))
    return {"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "intermediate": inter, "vocab": vocab, "params": params}


def estimate_training_bytes(shape: dict[str, int], micro_batch_size: int, seq_len: int, *,
                            gradient_checkpointing: bool = False, lora: LoraSettings | None = None) -> int:
    """Peak resident bytes of a LoRA training step, fp32 on CPU (the conservative case).

    runtime + weights + adapter (weights, grads, two AdamW moments) + activations saved for
    backward + LOGIT_COPIES x the vocab logits, padded by
    ESTIMATE_MARGIN (SDPA attention: no seq x seq matrix). Per token and layer a Llama block keeps ~10 x hidden + 4 x intermediate
    floats for backward; with gradient checkpointing only the layer inputs are kept and one
    layer is recomputed at a time.
    """
    lora = lora or LoraSettings()
    h, L, inter, vocab = shape["hidden"], shape["layers"], shape["intermediate"], shape["vocab"]
    heads, kvh, hd = shape["heads"], shape["kv_heads"], shape["head_dim"]  # noqa: F841 (shape of the adapter)
    out_dims = {"q_proj": heads * hd, "k_proj": kvh * hd, "v_proj": kvh * hd, "o_proj": h,
                "gate_proj": inter, "up_proj": inter, "down_proj": h}
    in_dims = {"o_proj": heads * hd, "down_proj": inter}
    adapter = sum(lora.r * (in_dims.get(m, h) + out_dims.get(m, h)) for m in lora.target_modules) * L
    tokens = micro_batch_size * seq_len
    per_layer_token = 10 * h + 4 * inter
    if gradient_checkpointing:
        act = tokens * (L * 2 * h + per_layer_token) * 4
    else:
        act = tokens * L * per_layer_token * 4
    logits = tokens * vocab * 4 * LOGIT_COPIES
    # No seq x seq attention matrix: transformers uses SDPA, whose CPU and GPU kernels do not
    # materialize it (measured on the tiny model: seq 4096 x micro 4 peaked at 709 MiB, where a
    # materialized matrix alone would be 1 GiB per layer).
    total = RUNTIME_BYTES + shape["params"] * 4 + adapter * 4 * 4 + act + logits
    return int(total * ESTIMATE_MARGIN)
