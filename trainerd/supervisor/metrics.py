"""Prometheus metrics as a textfile for node_exporter's textfile collector (supervisor side).

The daemon calls :meth:`Metrics.tick` once per loop turn. Most turns cost a few attribute reads
(is anything different: the ledger's change count, paused, the running attempt, the guard's
actions on it); the file is rewritten when something changed and every ``metrics.interval_s``
otherwise. Gathering the figures is here, from what the daemon already has (its ledger, guard,
layout, settings, the running attempt) and small files (progress.json, the current version's
lineage.json): the daemon keeps no state for us.

The series, and how each is derived: prometheus.py.

No timestamps on samples (the textfile convention); the time figures are gauges holding Unix
seconds. Never fatal: a failure to gather or write is logged once per kind and retried at the
next interval.
"""

from __future__ import annotations

import grp
import math
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from trainerd.supervisor.ledger import goodput
from trainerd.core.contract import RootLayout
from trainerd.core.fsutil import read_json_or_none
from trainerd.supervisor.views.health import HealthWatch
from trainerd.supervisor.inbox import is_candidate_name
from trainerd.supervisor.prometheus import GUARD_ACTIONS, Collector, Snapshot, eval_series, restart_reason

__all__ = ["Metrics", "textfile_path"]

MIN_WRITE_GAP_S = 1.0  # between two writes on changes (issue 23: a burst changes the ledger every turn)


def textfile_path(settings: Any) -> Path | None:
    """Where the metrics go (``metrics.textfile`` relative to the root), or None when off."""
    name = settings.metrics.textfile
    return None if not name else Path(settings.root) / name


class Metrics:
    """The textfile: when to write it, what goes in, and the folder's group."""

    def __init__(self, log: Any):
        self.log = log
        self.collector = Collector()
        self.registry: Any = None  # prometheus_client's, made at the first write: off costs no import (~2 MB)
        self.next_write = 0.0
        self.writes = 0
        self._seen: Any = None
        self._prepared: tuple[Path, str] | None = None  # (path, group) the folder was last set up for
        self._gid: int | None = None
        self._warned: set[str] = set()
        self._totals_key: Any = None          # the ledger change count the derived totals are from
        self._totals: dict[str, Any] = {}
        self._recorded_key: Any = None        # (batch, ledger change count) of _recorded_val
        self._recorded_val: tuple[int, int] = (0, 0)
        self._lineage_key: Any = None
        self._lineage: dict[str, Any] = {}
        self._ended_progress: Path | None = None  # an attempt reaped since the last look: its progress.json
        self._checkpoint: tuple[float | None, float | None] | None = None  # (seconds, at); None: not looked
        self._health = HealthWatch()
        self._written_at = -math.inf

    # --- the daemon's one call ---------------------------------------------------------------

    def tick(self, now: float, daemon: Any, *, force: bool = False) -> float:
        """Write the file if something changed or it is due; return when to be called next
        (``math.inf`` while metrics are off). A burst of changes (a claim every few ms) is
        written once a second at most; ``force`` writes now (the daemon's last word)."""
        path = textfile_path(daemon.settings)
        if path is None or daemon.ledger is None:
            return math.inf
        r = daemon.running
        seen = (daemon.ledger.db.total_changes, daemon.paused, None if r is None else (r.batch.id, r.attempt),
                daemon.stopping)
        if seen == self._seen and now < self.next_write:
            return self.next_write
        if not force and now < self._written_at + MIN_WRITE_GAP_S:
            return self._written_at + MIN_WRITE_GAP_S
        self._seen, self._written_at = seen, now
        interval = daemon.settings.metrics.interval_s
        self.next_write = now + interval
        try:
            self.collector.snap = self.gather(daemon, now)
            self._write(path, daemon.settings.metrics.group)
            self.writes += 1
        except (OSError, sqlite3.Error, ValueError) as e:
            self._warn_once(f"write:{type(e).__name__}", "metrics_write_failed", path=str(path), error=str(e),
                            retry_in_s=interval)
        return self.next_write

    # --- gathering -----------------------------------------------------------------------------

    def gather(self, daemon: Any, now: float | None = None) -> Snapshot:
        led, layout = daemon.ledger, daemon.layout
        s = Snapshot(batches=led.counts(), paused=daemon.paused, worker_running=daemon.running is not None,
                     kernel_oom_kills=led.counter("kernel_oom_kills"),
                     guard_actions={a: led.counter(f"guard_actions:{a}") for a in GUARD_ACTIONS})
        s.inbox_files = _count_inbox(layout)
        if s.paused:
            try:
                s.paused_since = os.lstat(layout.stop).st_mtime
            except OSError:
                pass
        totals = self._derived_totals(led)
        s.trained_tokens, s.training_steps, s.restarts = totals["tokens"], totals["steps"], totals["restarts"]
        s.goodput, s.faults_survived = totals["goodput"], totals["faults_survived"]
        s.crashes_without_progress, s.fault_lost_s = totals["crashes_without_progress"], totals["fault_lost_s"]
        r = daemon.running
        if self._ended_progress is not None:
            # That attempt's last checkpoint (the final one, a stop's) came after our last look.
            self._note_checkpoint(read_json_or_none(self._ended_progress) or {})
            self._ended_progress = None
        if r is not None:
            prog = read_json_or_none(r.files.progress) or {}
            if prog.get("pid") == r.child.pid:  # this attempt's, not the previous one's leftovers
                done = self._recorded(led, r.batch.id)
                s.trained_tokens += max(0, int(prog.get("tokens") or 0) - done[0])
                s.training_steps += max(0, int(prog.get("step") or 0) - done[1])
                s.tokens_per_s = float(prog.get("tokens_per_s") or 0.0)
                s.loss = float(prog["loss"]) if prog.get("loss") is not None else math.nan
                self._note_checkpoint(prog)
        if self._checkpoint is None:
            self._checkpoint = _newest_checkpoint(led, layout)
        s.checkpoint_seconds, s.checkpoint_at = self._checkpoint
        # Counters never step back within one daemon's life (a resumed attempt restarts its
        # live progress at the checkpoint it resumed from).
        prev = self.collector.snap
        s.trained_tokens = max(s.trained_tokens, prev.trained_tokens)
        s.training_steps = max(s.training_steps, prev.training_steps)
        self._gather_memory(daemon, s)
        latest = led.latest_version()
        if latest is not None:
            s.publish_at = latest.created_at
        self._gather_current(layout, daemon.settings, s)
        s.health = [(c.name, int(c.severity)) for c in
                    self._health.conditions(daemon, time.time() if now is None else now)]
        figures = getattr(daemon, "loop_figures", None)
        s.loop = figures() if figures is not None else {}
        return s

    def _recorded(self, led: Any, batch_id: int) -> tuple[int, int]:
        """What the ledger already counts of the running batch (its earlier attempts), per ledger change."""
        key = (batch_id, led.db.total_changes)
        if self._recorded_key != key:
            self._recorded_key, self._recorded_val = key, led.batch_progress(batch_id)
        return self._recorded_val

    def attempt_ended(self, progress: Path) -> None:
        """Told by the daemon as it reaps a worker. An event, not an edge between two looks: an
        attempt that began and ended between them (a fast one) would not be seen at all."""
        self._ended_progress = progress

    def _note_checkpoint(self, progress: dict[str, Any]) -> None:
        ck = progress.get("checkpoint") or {}
        at = ck.get("at")
        # The newest wins: an attempt that wrote nothing leaves an older attempt's progress.json.
        if at and (self._checkpoint is None or self._checkpoint[1] is None or at >= self._checkpoint[1]):
            self._checkpoint = (ck.get("seconds"), at)

    def _derived_totals(self, led: Any) -> dict[str, Any]:
        """Tokens, steps and restarts by reason from the ledger's running totals (trainerd/supervisor/ledger/aggregates.py:
        kept by triggers as attempts end, so this is one indexed read at any ledger size); re-read
        only when the ledger changed."""
        key = led.db.total_changes
        if key == self._totals_key:
            return self._totals
        restarts: dict[str, int] = {}
        for name, n in led.totals("restarts:").items():
            outcome, _, reason = name.partition(":")
            label = restart_reason(outcome, reason)
            restarts[label] = restarts.get(label, 0) + int(n)
        g = led.goodput_totals()
        self._totals_key = key
        self._totals = {"tokens": led.totals("trained_tokens").get("", 0),
                        "steps": led.totals("training_steps").get("", 0), "restarts": restarts,
                        "goodput": goodput.goodput(g), "faults_survived": int(g["faults_survived"]),
                        "crashes_without_progress": int(g["crashes"]) - int(g["faults_survived"]),
                        "fault_lost_s": {p: g[f"{p}_s"] for p in ("recomputed", "restart", "backoff")}}
        return self._totals

    def _gather_memory(self, daemon: Any, s: Snapshot) -> None:
        guard = daemon.guard
        try:
            # The guard's own measurement (cgroup usage less page cache, or the worker's tree).
            sample = guard.sample(time.monotonic())
            s.memory_usage_bytes, s.memory_limit_bytes = int(sample.usage_bytes), int(sample.limit_bytes)
        except Exception as e:  # noqa: BLE001 - a figure is not worth a broken loop
            s.memory_limit_bytes = getattr(guard, "limit_bytes", None)
            self._warn_once("memory", "metrics_memory_unavailable", error=f"{type(e).__name__}: {e}")

    def _gather_current(self, layout: RootLayout, settings: Any, s: Snapshot) -> None:
        """The version ``current`` points at and its lineage's gate figures (re-read when either changes)."""
        try:
            target = os.readlink(layout.current)
            lin_path = layout.adapters / target / "lineage.json"
            key = (target, os.stat(lin_path).st_mtime_ns)
        except OSError:
            return
        if key != self._lineage_key:
            self._lineage_key, self._lineage = key, read_json_or_none(lin_path) or {}
        lin = self._lineage
        try:
            s.adapter_version = int(lin.get("version") or target)
        except ValueError:
            return
        base = lin.get("base_model") or settings.model.path
        s.base_model = str(base.get("name") or base.get("path")) if isinstance(base, dict) else str(base)
        s.eval_losses = eval_series(lin.get("eval") or [])

    # --- writing -------------------------------------------------------------------------------

    def _write(self, path: Path, group: str) -> None:
        if (path, group) != self._prepared or (group and self._gid is None and f"group:{group}" not in self._warned):
            self._prepare_folder(path, group)
        data = self._render()
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"  # not *.prom: the collector skips it
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            # Mode and group before the rename, so node_exporter never meets a file it may not read.
            os.fchmod(fd, 0o640)
            if self._gid is not None:
                try:
                    os.fchown(fd, -1, self._gid)
                except OSError as e:
                    self._warn_once(f"group:{group}", "metrics_group_not_set", group=group, error=str(e))
                    self._gid = None
            os.write(fd, data)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        # No fsync: rewritten every few seconds; after a power cut the next write replaces it.
        os.replace(tmp, path)

    def _render(self) -> bytes:
        from prometheus_client import CollectorRegistry, ProcessCollector
        from prometheus_client.exposition import generate_latest

        if self.registry is None:
            self.registry = CollectorRegistry(auto_describe=False)
            self.registry.register(self.collector)
            # The supervisor's own RSS and CPU (the 40 MB budget), under its own prefix: node_exporter
            # merges every textfile, and bare process_* names would collide with other services'.
            ProcessCollector(namespace="trainerd_supervisor", registry=self.registry)
        return generate_latest(self.registry)

    def _prepare_folder(self, path: Path, group: str) -> None:
        """Create the folder; with ``metrics.group``: chgrp + 0750 on it, so node_exporter (in that
        group, not the daemon's user) can read it. Where that is not allowed, log why once."""
        self._prepared, self._gid = (path, group), None
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        if not group:
            return
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
            os.chown(path.parent, -1, gid)
            os.chmod(path.parent, 0o750)
        except (KeyError, OSError) as e:
            why = "no such group" if isinstance(e, KeyError) else str(e)
            self._warn_once(f"group:{group}", "metrics_group_not_set", group=group, folder=str(path.parent),
                            error=why, hint="node_exporter must be able to read this folder some other way")
            return
        self._gid = gid
        self.log.info("metrics_folder_ready", folder=str(path.parent), group=group, gid=gid)

    def _warn_once(self, key: str, event: str, **fields: Any) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        self.log.warning(event, **fields)


def _count_inbox(layout: RootLayout) -> int:
    try:
        with os.scandir(layout.inbox) as it:
            return sum(1 for e in it if is_candidate_name(e.name))
    except OSError:
        return 0


def _newest_checkpoint(led: Any, layout: RootLayout) -> tuple[float | None, float | None]:
    """After a restart: the last checkpoint recorded in the progress.json of the newest batches
    (a failed or skipped batch may have none; 20 is plenty to look back)."""
    for b in led.batches(limit=20, newest_first=True):
        ck = (read_json_or_none(layout.batch(b.id).progress) or {}).get("checkpoint") or {}
        if ck.get("at"):
            return ck.get("seconds"), ck["at"]
    return None, None


