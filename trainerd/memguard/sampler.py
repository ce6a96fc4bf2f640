"""Measuring: the effective limit and one :class:`~trainerd.memguard.decision.Sample` per poll.

Under a cgroup with a limit the kernel compares the *cgroup's* usage with its limit, so that
is what we compare too: v2 ``memory.current`` / v1 ``memory.usage_in_bytes`` minus
reclaimable page cache (``inactive_file``, as kubelet does — otherwise reading a big file
looks like a leak). Without a cgroup limit we use the worker tree's unreclaimable resident
memory (RssAnon + RssShmem of the worker and every descendant: DataLoader workers,
torchrun ranks) against the headroom ``MemAvailable`` leaves. The effective limit is the
smallest of the configured ``memory.limit``, the cgroup limit (including ancestors'),
physical memory, and usage + MemAvailable (the host may run out before the cgroup does).

Cost: a poll preads two or three small procfs/cgroupfs files kept open (no psutil per
poll); memory.stat (a kernel stats flush) and PSI once a second, memory.stat every poll only
near the thresholds; the worker's process tree is re-discovered at most once a second through
``/proc/<pid>/task/<tid>/children`` (psutil's full /proc walk only where that file is
missing). Measured: ~0.35% of a core at 100 ms on a loaded 2-core VM.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import psutil

from trainerd.core.settings import MemorySettings
from trainerd.memguard.cgroup import Cgroup, parse_psi
from trainerd.memguard.procfs import OpenFiles, mem_available, meminfo, proc_status, process_tree, read_text
from trainerd.memguard.decision import Sample
from trainerd.memguard.rules import predict_from

__all__ = ["AVAILABLE_SOURCE", "Sampler"]

# Where the limit came from when MemAvailable is the tighter bound.
AVAILABLE_SOURCE = "available:/proc/meminfo:MemAvailable"

_TREE_REFRESH_S = 1.0       # re-discover the worker's descendants at most this often
# Re-read cgroup limits this often: `systemctl set-property MemoryMax=` takes effect in the
# kernel at once, and in a container test a limit lowered under a running worker killed it
# 1.7 s later while a 5 s refresh still had the guard on the old limit. Three small reads.
_LIMIT_REFRESH_S = 0.5
_STAT_REFRESH_S = 1.0       # re-read memory.stat (inactive_file) at least this often
_PSI_REFRESH_S = 1.0        # PSI averages change every 2 s in the kernel


class Sampler:
    """The limits that apply, and what one worker's tree (or its cgroup) uses now."""

    def __init__(self, settings: MemorySettings, cgroup: Cgroup | None, psi_path: Path | None, log: Any):
        self.settings = settings
        self.cgroup = cgroup
        self.psi_path = psi_path
        self.log = log
        self.physical_bytes = meminfo().get("MemTotal", 0) or psutil.virtual_memory().total
        self.configured_bytes = None if settings.limit == "auto" else int(settings.limit)
        self.limit_bytes = 0
        self.source = ""
        self.cgroup_limit_bytes: int | None = None
        self._files = OpenFiles()
        self._pid: int | None = None
        self._tree: list[int] = []
        self._tree_at = -math.inf
        self._psi: float | None = None
        self._psi_at = -math.inf
        self._inactive = 0
        self._inactive_at: float | None = None
        # Below this fraction of the limit nothing can fire (the stop prediction starts at
        # predict_from); keep a margin under it.
        self._stat_every_poll_from = max(0.05, predict_from(settings) - 0.05)
        self._limit_at = -math.inf
        self.refresh_limit(force=True)

    # --- limits ------------------------------------------------------------------------

    def refresh_limit(self, force: bool = False, now: float | None = None) -> None:
        """Re-read the cgroup limit (every _LIMIT_REFRESH_S at most unless ``force``)."""
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
        old = self.limit_bytes or None
        self.limit_bytes, self.source = limit, source
        if old is not None and old != limit:
            # e.g. `systemctl set-property trainerd MemoryMax=...` while running
            self.log.info("memory_limit_changed", limit_bytes=limit, previous_limit_bytes=old, source=source)

    def baseline_bytes(self) -> int:
        """What the limited cgroup already holds (the supervisor, anything else); 0 without one."""
        if self.cgroup is None or self.cgroup_limit_bytes is None:
            return 0
        u, inact = self.cgroup.usage()
        return max(0, u - inact)

    # --- the worker --------------------------------------------------------------------

    def watch(self, pid: int | None) -> None:
        """Measure this worker's tree from now on (None: no worker)."""
        self._pid = None if pid is None else int(pid)
        self._tree = [] if pid is None else [int(pid)]
        self._tree_at = -math.inf
        if pid is None:
            self._files.close_all("/proc/")  # the tree's status files (meminfo reopens on the next poll)

    def _tree_usage(self, now: float) -> tuple[bool, int, int, int]:
        """(alive, unreclaimable bytes, VmRSS bytes, live pids) of the watched worker's tree."""
        if self._pid is None:
            return False, 0, 0, 0
        if now - self._tree_at >= _TREE_REFRESH_S:
            self._tree = process_tree(self._pid)
            self._tree_at = now
        alive = False
        tree_bytes = tree_rss = 0
        live = []
        for i, pid in enumerate(self._tree):
            ok, unrecl, rss = proc_status(pid, self._files)
            if i == 0:
                alive = ok
            if ok:
                live.append(pid)
                tree_bytes += unrecl
                tree_rss += rss
            else:
                self._files.close(f"/proc/{pid}/status")
        self._tree = live if alive else live or [self._pid]
        return alive, tree_bytes, tree_rss, len(live)

    # --- sampling ----------------------------------------------------------------------

    def sample(self, now: float) -> Sample:
        """Measure once. Cheap: a few small file reads; the process tree at most once a second."""
        self.refresh_limit(now=now)
        alive, tree_bytes, tree_rss, npids = self._tree_usage(now)
        avail = mem_available(self._files)
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
            limit, source = usage + avail, AVAILABLE_SOURCE
        return Sample(t=now, usage_bytes=usage, limit_bytes=limit, source=source, tree_bytes=tree_bytes,
                      tree_rss_bytes=tree_rss, tree_pids=npids, cgroup_usage_bytes=cg_usage,
                      inactive_file_bytes=inactive, mem_available_bytes=avail, psi_some_avg10=self._read_psi(now),
                      alive=alive)

    def _read_psi(self, now: float) -> float | None:
        # The kernel updates the PSI averages every 2 s: reading them ten times a second is waste.
        if self.psi_path is not None and self.settings.psi_threshold > 0 \
                and now - self._psi_at >= min(_PSI_REFRESH_S, self.settings.psi_sustain_s / 4):
            self._psi_at = now
            try:
                self._psi = parse_psi(read_text(self.psi_path, 512)).get("some", {}).get("avg10")
            except OSError:
                self._psi = None
        return self._psi
