"""What the Prometheus textfile says: the :class:`Snapshot` of figures one write needs, the series it
becomes (a custom prometheus_client collector over it), and the parser tests read the file back with.

Counters survive a restart because they are derived from the ledger, not counted in memory:

- ``trainerd_trained_tokens_total`` / ``trainerd_training_steps_total``: per batch, the furthest
  any of its attempts got (result.json's ``tokens``/``step`` are cumulative over a batch's
  attempts, so summing attempts would count a resumed batch twice), plus the running attempt's
  live progress beyond that. Steps redone after a crash (lost since the last checkpoint) are not
  counted again. Only a supervisor killed while its worker trained can make it step back (the
  lost attempt's live progress was never recorded): Prometheus reads that as a counter reset.
  The ledger keeps these sums as running totals (trainerd/supervisor/ledger/aggregates.py), so reading them costs
  the same at any chain length, and pruning old attempt rows does not lower them.
- ``trainerd_worker_restarts_total{reason}``: attempts that ended before their batch was through
  (stopped, crashed, lost), by why.
- ``trainerd_kernel_oom_kills_total``: the ledger's own counter.
- ``trainerd_goodput_ratio``: useful step time over wall time, every batch together;
  ``trainerd_faults_survived_total``, ``trainerd_crashes_without_progress_total`` and
  ``trainerd_fault_lost_seconds_total{part}`` (recomputed, restart, backoff): the ledger's
  per-batch figures summed (trainerd/supervisor/ledger/goodput.py).
- ``trainerd_guard_actions_total{action}``: the guard's stop / recycle / term / kill decisions on
  a running worker, counted by the daemon as it carries them out (the ledger's counters table,
  ``guard_actions:<action>``).
- ``trainerd_health`` / ``trainerd_health_condition{condition}``: ``trainerd check``'s conditions
  (trainerd/supervisor/views/health.py) as the daemon sees them: 0 OK, 1 warning, 2 critical. ``daemon_down`` is
  always 0 here (a down daemon writes nothing): alert on the file's age for that.

Label sets are bounded: the same series every version (the per-batch gate figures are in each
version's lineage.json, not in labels; see :func:`eval_series`).

Everything here formats; gathering the figures is metrics.py's.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field
from typing import Any

from trainerd import package_version
from trainerd.core.contract import StopReason
from trainerd.supervisor.ledger.states import BatchState

__all__ = ["GUARD_ACTIONS", "Collector", "Snapshot", "eval_series", "parse", "restart_reason"]

GUARD_ACTIONS = ("stop", "recycle", "term", "kill")
_KNOWN_STOPS = {r.value for r in StopReason}


@dataclass
class Snapshot:
    """Every figure one write needs, gathered at once (plain values: the collector only formats)."""

    batches: dict[str, int] = field(default_factory=dict)
    inbox_files: int = 0
    worker_running: bool = False
    paused: bool = False
    paused_since: float | None = None
    trained_tokens: int = 0
    training_steps: int = 0
    tokens_per_s: float = 0.0
    loss: float = math.nan
    memory_usage_bytes: int | None = None
    memory_limit_bytes: int | None = None
    guard_actions: dict[str, int] = field(default_factory=dict)
    kernel_oom_kills: int = 0
    restarts: dict[str, int] = field(default_factory=dict)
    goodput: float | None = None
    faults_survived: int = 0
    crashes_without_progress: int = 0
    fault_lost_s: dict[str, float] = field(default_factory=dict)  # recomputed, restart, backoff
    checkpoint_seconds: float | None = None
    checkpoint_at: float | None = None
    publish_at: float | None = None
    adapter_version: int | None = None
    base_model: str = ""
    eval_losses: list[tuple[str, str, str, float]] = field(default_factory=list)  # set, kind, model, loss
    health: list[tuple[str, int]] = field(default_factory=list)  # trainerd check's conditions: name, severity
    loop: dict[str, Any] = field(default_factory=dict)  # the daemon's loop_figures() (issue 23)


def restart_reason(outcome: str, reason: str | None) -> str:
    """A bounded label for why an attempt ended early: a stop reason, ``crash`` or ``lost``."""
    if outcome == "crashed":
        return "crash"
    if outcome == "lost":
        return "lost"
    return reason if reason in _KNOWN_STOPS else "other"


class Collector:
    """A prometheus_client collector over the last :class:`Snapshot` (a custom collector: the
    counters are derived totals, set whole, which Counter objects cannot be)."""

    def __init__(self) -> None:
        self.snap = Snapshot()
        self.build = {"version": package_version(), "python": platform.python_version()}

    def collect(self) -> Any:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        s = self.snap
        info = InfoMetricFamily("trainerd_build", "trainerd's version and the supervisor's python")
        info.add_metric([], self.build)
        yield info
        g = GaugeMetricFamily("trainerd_batches", "Batches in the ledger by state", labels=["state"])
        for st in BatchState:
            g.add_metric([st.value], s.batches.get(st.value, 0))
        yield g
        yield GaugeMetricFamily("trainerd_inbox_files", "Data files waiting in the inbox, not yet claimed",
                                value=s.inbox_files)
        yield GaugeMetricFamily("trainerd_worker_running", "1 while a worker trains", value=int(s.worker_running))
        yield GaugeMetricFamily("trainerd_paused", "1 while root/.stop exists", value=int(s.paused))
        if s.paused_since is not None:
            yield GaugeMetricFamily("trainerd_paused_since_timestamp_seconds",
                                    "When root/.stop was last written (Unix time)", value=s.paused_since)
        yield CounterMetricFamily("trainerd_trained_tokens", "Real (unpadded) tokens trained, each batch "
                                  "position counted once", value=s.trained_tokens)
        yield CounterMetricFamily("trainerd_training_steps", "Optimizer steps trained, each batch position "
                                  "counted once", value=s.training_steps)
        yield GaugeMetricFamily("trainerd_training_tokens_per_second", "The running attempt's training speed "
                                "(0 when no worker trains)", value=s.tokens_per_s)
        yield GaugeMetricFamily("trainerd_training_loss", "The running attempt's last step loss (NaN when none)",
                                value=s.loss)
        if s.memory_limit_bytes is not None:
            yield GaugeMetricFamily("trainerd_memory_usage_bytes", "Memory use as the guard measures it",
                                    value=s.memory_usage_bytes or 0)
            yield GaugeMetricFamily("trainerd_memory_limit_bytes", "The memory limit the guard applies",
                                    value=s.memory_limit_bytes)
        c = CounterMetricFamily("trainerd_guard_actions", "Memory guard actions on workers", labels=["action"])
        for a in GUARD_ACTIONS:
            c.add_metric([a], s.guard_actions.get(a, 0))
        yield c
        yield CounterMetricFamily("trainerd_kernel_oom_kills", "Workers the kernel's OOM killer took (target 0)",
                                  value=s.kernel_oom_kills)
        c = CounterMetricFamily("trainerd_worker_restarts", "Attempts that ended before their batch was "
                                "through, by why", labels=["reason"])
        for reason, n in sorted(s.restarts.items()):
            c.add_metric([reason], n)
        yield c
        if s.goodput is not None:
            yield GaugeMetricFamily("trainerd_goodput_ratio", "Useful training step time over wall time, all "
                                    "batches (wall: attempts and the waits after faults)", value=s.goodput)
        yield CounterMetricFamily("trainerd_faults_survived", "Crashes after which the batch had made progress "
                                  "(retried at once, no retry budget spent)", value=s.faults_survived)
        yield CounterMetricFamily("trainerd_crashes_without_progress", "Crashes of attempts that got no further "
                                  "than an earlier one (these count against retry.max_attempts)",
                                  value=s.crashes_without_progress)
        c = CounterMetricFamily("trainerd_fault_lost_seconds", "Seconds faults cost: steps recomputed, restarts, "
                                "back-off", labels=["part"])
        for part in ("recomputed", "restart", "backoff"):
            c.add_metric([part], s.fault_lost_s.get(part, 0.0))
        yield c
        if s.checkpoint_at is not None:
            yield GaugeMetricFamily("trainerd_last_checkpoint_duration_seconds", "How long the last checkpoint "
                                    "write took", value=s.checkpoint_seconds or 0.0)
            yield GaugeMetricFamily("trainerd_last_checkpoint_timestamp_seconds", "When the last checkpoint was "
                                    "written (Unix time)", value=s.checkpoint_at)
        if s.publish_at is not None:
            yield GaugeMetricFamily("trainerd_last_publish_timestamp_seconds", "When the newest adapter version "
                                    "was published (Unix time)", value=s.publish_at)
        if s.adapter_version is not None:
            yield GaugeMetricFamily("trainerd_adapter_version", "The version adapters/current points at",
                                    value=s.adapter_version)
            # No version label: it would start a new series with every version (the gauge above says it).
            info = InfoMetricFamily("trainerd_adapter", "The current adapter's base model")
            info.add_metric([], {"base_model": s.base_model})
            yield info
        yield GaugeMetricFamily("trainerd_health", "trainerd check's verdict from inside the daemon: 0 OK, "
                                "1 warning, 2 critical (a stale file means the daemon is down)",
                                value=max((v for _, v in s.health), default=0))
        g = GaugeMetricFamily("trainerd_health_condition", "Each condition of trainerd check: 0 OK, 1 warning, "
                              "2 critical", labels=["condition"])
        for name, v in s.health:
            g.add_metric([name], v)
        yield g
        yield from _loop_metrics(s.loop)
        g = GaugeMetricFamily("trainerd_current_eval_loss", "The current version's gate figures: mean loss "
                              "per token of the candidate it was and the champion it beat, on its new set, "
                              "the earlier batches' sets together, and each standing suite",
                              labels=["set", "kind", "model"])
        for name, kind, model, loss in s.eval_losses:
            g.add_metric([name, kind, model], loss)
        yield g


def _loop_metrics(loop: dict[str, Any]) -> Any:
    """The supervisor loop's health over the last minute: its longest turn, and the memory guard's
    measured sampling interval (median and max; only while a worker was watched)."""
    from prometheus_client.core import GaugeMetricFamily

    if loop.get("longest_turn_s") is not None:
        yield GaugeMetricFamily("trainerd_loop_turn_seconds", "The longest turn of the supervisor's loop in "
                                "the last minute (signals, requests and the watchdog wait for a turn)",
                                value=loop["longest_turn_s"])
    g = loop.get("guard_interval_s") or {}
    if g.get("count"):
        fam = GaugeMetricFamily("trainerd_guard_poll_interval_seconds", "Time between two memory guard samples "
                                "over the last minute, as measured (configured: memory.interval_ms)",
                                labels=["quantile"])
        fam.add_metric(["0.5"], g["p50"])
        fam.add_metric(["1"], g["max"])
        yield fam


def eval_series(sets: list[dict[str, Any]]) -> list[tuple[str, str, str, float]]:
    """(set, kind, model, loss) with bounded labels: a standing suite keeps its name (the operator's
    files), every other kind is one series (``new``; ``earlier``: all earlier batches' sets together,
    their losses averaged by the examples used). The per-set figures stay in lineage.json: a label per
    batch would add series with every version, and Prometheus keeps every series it ever saw."""
    sums: dict[tuple[str, str, str], list[float]] = {}
    for e in sets:
        kind = str(e.get("kind"))
        name = str(e.get("name")) if kind == "suite" else kind
        weight = float(e.get("used") or 1)
        for model in ("candidate", "champion"):
            v = e.get(model)
            if isinstance(v, (int, float)) and math.isfinite(v):
                acc = sums.setdefault((name, kind, model), [0.0, 0.0])
                acc[0] += weight * float(v)
                acc[1] += weight
    return [(name, kind, model, acc[0] / acc[1]) for (name, kind, model), acc in sorted(sums.items()) if acc[1]]


def parse(text: str) -> dict[str, Any]:
    """``{name: {labels tuple: value}}`` from textfile content (prometheus_client's own parser);
    for tests and ``benchmarks/``."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            out.setdefault(smp.name, {})[tuple(sorted(smp.labels.items()))] = smp.value
    return out
