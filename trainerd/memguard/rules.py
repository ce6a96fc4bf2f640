"""The guard's rules: samples and ``now`` in, a :class:`Decision` out. Pure.

No file or process I/O and no clock: time is an argument, so tests feed tables of samples.
The per-worker history (growth windows, what was already decided and when) and the stop
timing learned across workers are plain state here. Nothing here writes ``.stop`` or sends
a signal: the supervisor's ``Escalation`` carries a decision out.

Deciding (one decision per ``memory.interval_ms``)::

    usage >= soft; or, above soft - 2 x (hard - soft): growing so fast that hard is < 3 polls
    away, or growing over the last second and over a full robust 10 s trend so that the learned
    stop time (+ 2 polls) would carry it past hard; or PSI sustained
        -> "stop"     (.stop = "memory"; decided once)
    usage >= hard                    -> "term"      (.stop = "memory", then SIGTERM; once)
    term + kill_grace_s, usage >= hard + half the rest, or (at/after hard) the limit is
    under two polls away at the last second's rate
                                     -> "kill"      (SIGKILL; repeated each second while alive)
    peaks growing steadily (both halves of leak_window_s) to reach soft within
    leak_horizon_s, or age > max_worker_age_s
                                     -> "recycle"   (.stop = "recycle", once; a later
                                                      "stop" upgrades it to "memory")
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from trainerd.core.settings import MemorySettings
from trainerd.core.contract import StopReason
from trainerd.memguard.decision import Decision, Leak, Sample

__all__ = ["History", "Rules", "StopTiming", "predict_from"]

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


def predict_from(st: MemorySettings) -> float:
    """Fraction of the limit from which growth predictions are made: soft - 2 x (hard - soft)
    (0.65 by default). Lower catches fast growth sooner (at 1 GiB/s a 100 ms poll is 100 MiB);
    higher spares bursts that level off (a model loading)."""
    return max(0.1, st.soft - 2 * (st.hard - st.soft))


def robust_slope(points: Any) -> tuple[float, float]:
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


def slope(points: Any) -> tuple[float, float]:
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


@dataclass
class History:
    """One worker, as the rules remember it: its samples, and what was decided when."""

    started_at: float
    trend: deque = field(default_factory=deque)   # (t, usage) over _TREND_WINDOW_S, downsampled
    recent: deque = field(default_factory=deque)  # (t, usage) over _RECENT_WINDOW_S
    long: deque = field(default_factory=deque)    # [bin start, highest usage in it], _LEAK_BINS bins
    stop_reason: StopReason | None = None         # what .stop was asked to say
    stop_at: float | None = None
    usage_at_stop: int = 0
    peak_after_stop: int = 0
    term_at: float | None = None
    kill_at: float | None = None
    exited_at: float | None = None
    recycled: bool = False
    psi_since: float | None = None
    last_t: float | None = None

    def ask_stop(self, reason: StopReason, now: float, usage: int) -> None:
        """Remember that .stop was asked for (once; "recycle" may be upgraded to "memory")."""
        if self.stop_reason == reason or self.stop_reason is StopReason.MEMORY:
            return
        first = self.stop_at is None
        self.stop_reason = reason
        if first or reason is StopReason.MEMORY:
            self.stop_at = now
            self.usage_at_stop = usage
            self.peak_after_stop = usage


@dataclass
class StopTiming:
    """How long "stop" takes to become an exit (finish the step + checkpoint), and how much
    memory the checkpoint adds; learned from each graceful stop, kept across workers."""

    checkpoint_s: float
    checkpoint_bytes: int = 0

    def learn(self, h: History) -> dict[str, Any] | None:
        """Learn from a worker that ended after a graceful stop; the numbers to log, or None."""
        if h.stop_at is None or h.term_at is not None or h.kill_at is not None:
            return None
        end = h.exited_at if h.exited_at is not None else h.last_t
        if end is None or end < h.stop_at:
            return None
        dur = max(0.05, end - h.stop_at)
        grew = max(0, h.peak_after_stop - h.usage_at_stop)
        # EWMA that forgets slowly, and never below the latest: a stop that took long once
        # (a long step to finish first) will again.
        self.checkpoint_s = max(dur, 0.7 * self.checkpoint_s + 0.3 * dur)
        self.checkpoint_bytes = max(grew, int(0.7 * self.checkpoint_bytes + 0.3 * grew))
        return {"stop_to_exit_s": round(dur, 3), "checkpoint_added_bytes": grew,
                "checkpoint_estimate_s": round(self.checkpoint_s, 3), "checkpoint_bytes": self.checkpoint_bytes}


class Rules:
    """The rungs, in order of severity, over one worker's :class:`History` at a time."""

    def __init__(self, settings: MemorySettings):
        self.settings = settings
        self.interval_s = settings.interval_ms / 1000.0
        self.timing = StopTiming(checkpoint_s=float(settings.checkpoint_estimate_s))
        self.history: History | None = None

    def start(self, started_at: float) -> None:
        """A new worker: a fresh history (what was learned about stopping is kept)."""
        self.history = History(started_at=float(started_at))

    def finish(self) -> dict[str, Any] | None:
        """The worker is gone: forget it, learning from a graceful stop; the learned numbers or None."""
        h, self.history = self.history, None
        return None if h is None else self.timing.learn(h)

    def decide(self, s: Sample, now: float) -> Decision:
        h = self.history
        if h is None:
            return Decision()
        gap_s = None if h.last_t is None else now - h.last_t
        h.last_t = now
        if not s.alive:
            if h.exited_at is None:
                h.exited_at = now
            return Decision(usage_bytes=s.usage_bytes, limit_bytes=s.limit_bytes, source=s.source)
        if h.stop_at is not None:
            h.peak_after_stop = max(h.peak_after_stop, s.usage_bytes)
        base = self._measure(h, s, now, gap_s)
        for rung in (self._kill, self._term, self._stop, self._recycle):
            d = rung(h, s, base, now)
            if d is not None:
                return d
        return base

    # --- the numbers ---------------------------------------------------------------------

    def _measure(self, h: History, s: Sample, now: float, gap_s: float | None) -> Decision:
        """Update the growth windows; the "none" decision carrying this poll's numbers."""
        point = (now, s.usage_bytes)
        if not h.trend or now - h.trend[-1][0] >= _TREND_SAMPLE_S:
            h.trend.append(point)
        while h.trend and now - h.trend[0][0] > _TREND_WINDOW_S:
            h.trend.popleft()
        h.recent.append(point)
        while h.recent and now - h.recent[0][0] > _RECENT_WINDOW_S:
            h.recent.popleft()
        recent, rspan = slope(h.recent)
        recent = recent if rspan >= _RATE_MIN_SPAN_S else 0.0
        limit = s.limit_bytes
        trend = 0.0
        if recent > 0 and s.usage_bytes >= int(limit * predict_from(self.settings)):
            # The trend costs ~0.2 ms (Theil-Sen): only near the limits, while growing. It must
            # span the whole window: a training step's rise (seconds, repeated every step) would
            # otherwise read as a runaway on the first step of every worker whose peak is above
            # the gate (simulated: every sawtooth peaking at 70% was stopped).
            trend, tspan = robust_slope(h.trend if h.trend[-1] is point else [*h.trend, point])
            trend = trend if tspan >= _TREND_MIN_SPAN_S else 0.0
        rate = min(trend, recent) if trend > 0 and recent > 0 else 0.0
        soft_b = int(limit * self.settings.soft)
        hard_b = int(limit * self.settings.hard)
        if s.usage_bytes >= hard_b:
            tth: float | None = 0.0
        elif rate > 0:
            tth = (hard_b - s.usage_bytes) / rate
        else:
            tth = None
        return Decision(usage_bytes=s.usage_bytes, limit_bytes=limit, source=s.source, soft_bytes=soft_b,
                        hard_bytes=hard_b, rate_bytes_per_s=rate, recent_rate_bytes_per_s=recent,
                        time_to_hard_s=tth, tree_bytes=s.tree_bytes, psi_some_avg10=s.psi_some_avg10,
                        since_last_poll_s=gap_s)

    # --- the rungs: each returns the final decision, or None to go on to the next ----------

    def _kill(self, h: History, s: Sample, d: Decision, now: float) -> Decision | None:
        """KILL: the graceful path was too slow, or there is no room left for it."""
        if h.kill_at is not None:
            if now - h.kill_at >= _KILL_REPEAT_S:
                h.kill_at = now
                return _as(d, "kill", "still_alive")
            return d
        limit, hard_b = d.limit_bytes, d.hard_bytes
        reason = None
        if h.term_at is not None and now - h.term_at >= self.settings.kill_grace_s:
            reason = "grace"
        elif s.usage_bytes >= hard_b + (limit - hard_b) // 2:
            reason = "margin"
        elif (h.term_at is not None or s.usage_bytes >= hard_b) and d.recent_rate_bytes_per_s > 0 \
                and s.usage_bytes + d.recent_rate_bytes_per_s * 2 * self.interval_s >= limit:
            # The limit is less than two polls away at this rate: the kernel would get there first.
            reason = "imminent"
        if reason is None:
            return None
        h.kill_at = now
        return _as(d, "kill", reason)

    def _term(self, h: History, s: Sample, d: Decision, now: float) -> Decision | None:
        """TERM at the hard limit (and .stop "memory" first, so the worker's result.json says why)."""
        if s.usage_bytes >= d.hard_bytes and h.term_at is None:
            h.ask_stop(StopReason.MEMORY, now, s.usage_bytes)
            h.term_at = now
            return _as(d, "term", "hard")
        if h.stop_reason is StopReason.MEMORY:
            return d  # stopping already: nothing more until hard
        return None

    def _stop(self, h: History, s: Sample, d: Decision, now: float) -> Decision | None:
        """STOP: soft limit, predicted crossing, sustained pressure."""
        st, usage = self.settings, s.usage_bytes
        gate = int(d.limit_bytes * predict_from(st))
        reason = None
        if usage >= d.soft_bytes:
            reason = "soft"
        # Two predictions. Fast: at the last second's rate hard is less than three polls away
        # (this sample is up to a poll old, the next poll, the worker's next check of .stop) —
        # a runaway, whatever its history. Sustained: growing over the whole trend window too,
        # and the learned stop time plus two polls (this sample is up to one old; the worker
        # notices .stop only at its next check) would carry usage past hard.
        elif d.recent_rate_bytes_per_s > 0 and usage >= gate \
                and usage + d.recent_rate_bytes_per_s * 3 * self.interval_s >= d.hard_bytes:
            reason = "predicted_fast"
        elif d.rate_bytes_per_s > 0 and usage >= gate and usage + d.rate_bytes_per_s * (
                self.timing.checkpoint_s + 2 * self.interval_s) + self.timing.checkpoint_bytes >= d.hard_bytes:
            reason = "predicted"
        elif st.psi_threshold > 0 and s.psi_some_avg10 is not None and s.psi_some_avg10 > st.psi_threshold:
            if h.psi_since is None:
                h.psi_since = now
            if now - h.psi_since >= st.psi_sustain_s:
                reason = "psi"
        else:
            h.psi_since = None
        if reason is None:
            return None
        h.ask_stop(StopReason.MEMORY, now, usage)
        return _as(d, "stop", reason)

    def _recycle(self, h: History, s: Sample, d: Decision, now: float) -> Decision | None:
        """RECYCLE: age, or a steady leak that will reach soft within the horizon."""
        st = self.settings
        if h.recycled:
            return d
        if st.max_worker_age_s > 0 and now - h.started_at >= st.max_worker_age_s:
            h.recycled = True
            h.ask_stop(StopReason.RECYCLE, now, s.usage_bytes)
            return _as(d, "recycle", "age")
        if st.leak_horizon_s > 0 and now - h.started_at >= st.leak_warmup_s:
            leak = _leak_fit(h, s.usage_bytes, now, d.limit_bytes, d.soft_bytes, st)
            if leak is not None:
                h.recycled = True
                h.ask_stop(StopReason.RECYCLE, now, s.usage_bytes)
                return dataclasses.replace(_as(d, "recycle", "leak"), leak=leak)
        return None


def _as(d: Decision, action: str, reason: str) -> Decision:
    return dataclasses.replace(d, action=action, reason=reason)


def _leak_fit(h: History, usage: int, now: float, limit: int, soft_b: int, st: MemorySettings) -> Leak | None:
    """Recycle on steady growth of the *peaks*.

    The window is cut into _LEAK_BINS bins and each keeps its highest usage, so a training
    step's sawtooth (period shorter than a bin) leaves a flat row of peaks, and a leak a
    rising one. A leak also grows in both halves of the window; a one-off step up
    (allocator arenas, the first checkpoint's buffers) leaves one half flat, which a single
    fit across the window would read as growth. So: Theil-Sen per half, the smaller wins.
    """
    window = st.leak_window_s
    bin_s = window / _LEAK_BINS
    if h.long and now - h.long[-1][0] < bin_s:
        h.long[-1][1] = max(h.long[-1][1], usage)
        return None
    h.long.append([now, usage])  # closes the previous bin
    while h.long and now - h.long[0][0] > window + bin_s:
        h.long.popleft()
    closed = [(t, y) for t, y in list(h.long)[:-1]]
    if len(closed) < _LEAK_BINS:
        return None
    half = len(closed) // 2
    lrate = min(robust_slope(closed[:half])[0], robust_slope(closed[half:])[0])
    span = closed[-1][0] - closed[0][0]
    level = closed[-1][1]  # the latest peak: peaks reach soft first
    if lrate <= 0 or lrate * span < _LEAK_MIN_RISE * limit or level >= soft_b \
            or (soft_b - level) / lrate > st.leak_horizon_s:
        return None
    return Leak(bytes_per_s=lrate, window_s=span, recent_peak_bytes=level, time_to_soft_s=(soft_b - level) / lrate)
