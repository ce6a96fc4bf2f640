"""The guard's rules from tables: samples with their times in, the sequence of decisions out.

No processes, no files, no clock: each row feeds :class:`trainerd.memguard.rules.Rules` one
worker's samples and compares every decision with an action against the expected
``(t, action, reason)`` list — the rungs, that each fires once (or, for kill, once a second),
and the shapes that must not fire at all.
"""

from __future__ import annotations

from typing import Callable

import pytest

from trainerd.core.settings import MemorySettings
from trainerd.memguard import Sample
from trainerd.memguard.rules import Rules

MiB = 1 << 20
LIMIT = 1000 * MiB
BASE = dict(interval_ms=100, kill_grace_s=2.0, psi_threshold=0.0, leak_horizon_s=0.0, checkpoint_estimate_s=5.0)
LEAK = dict(leak_horizon_s=3600.0, leak_warmup_s=0.0, leak_window_s=60.0)
PSI = dict(psi_threshold=40.0, psi_sustain_s=2.0)

Point = tuple  # (t, fraction of LIMIT[, psi some avg10[, alive]])


def span(t0: float, t1: float, frac: float | Callable[[float], float], dt: float = 0.1) -> list[Point]:
    """Samples every ``dt`` from t0 up to (not including) t1; ``frac`` a constant or f(t)."""
    n = round((t1 - t0) / dt)
    times = [round(t0 + i * dt, 6) for i in range(n)]
    return [(t, frac(t) if callable(frac) else frac) for t in times]


def sawtooth(low: float, high: float, period_s: float = 7.0) -> Callable[[float], float]:
    """A training step's memory: rises low -> high over 85% of the period, falls in the rest."""
    def f(t: float) -> float:
        ph = (t % period_s) / period_s
        return low + (high - low) * ph / 0.85 if ph < 0.85 else high - (high - low) * (ph - 0.85) / 0.15
    return f


def decisions(settings: dict, points: list[Point], started_at: float = 0.0) -> list[tuple[float, str, str]]:
    rules = Rules(MemorySettings(**{**BASE, **settings}))
    rules.start(started_at)
    out = []
    for p in points:
        t, frac = p[0], p[1]
        psi = p[2] if len(p) > 2 else None
        alive = p[3] if len(p) > 3 else True
        usage = int(frac * LIMIT)
        s = Sample(t=t, usage_bytes=usage, limit_bytes=LIMIT, source="table", tree_bytes=usage, tree_rss_bytes=usage,
                   tree_pids=1, cgroup_usage_bytes=None, inactive_file_bytes=None, mem_available_bytes=LIMIT,
                   psi_some_avg10=psi, alive=alive)
        d = rules.decide(s, t)
        if d.action != "none":
            out.append((t, d.action, d.reason))
    return out


ROWS = [
    # --- stop: .stop "memory", decided once ----------------------------------------------
    pytest.param({}, span(0, 1.1, 0.70) + span(1.1, 3, 0.86), [(1.1, "stop", "soft")], id="soft"),
    pytest.param({}, span(0, 1.0, lambda t: t), [(0.7, "stop", "predicted_fast")],
                 id="predicted_fast: 1000 MiB/s, hard under three polls away"),
    pytest.param({}, span(0, 14, lambda t: 0.4 + 0.03 * t), [(13.2, "stop", "predicted")],
                 id="predicted: 30 MiB/s, a 5 s stop would pass hard"),
    pytest.param(PSI, [(0.0, .5, 80.0), (0.6, .5, 80.0), (1.2, .5, 10.0), (1.8, .5, 80.0), (3.0, .5, 80.0),
                       (3.9, .5, 80.0), (5.0, .5, 80.0)], [(3.9, "stop", "psi")],
                 id="psi: sustained 2 s, the clock reset by a dip"),
    pytest.param(PSI, [(0.0, .5, 80.0), (1.0, .5, 80.0), (2.0, .5, 80.0), (3.0, .5, 80.0)], [(2.0, "stop", "psi")],
                 id="psi: sustained 2 s"),
    # --- term and kill -------------------------------------------------------------------
    pytest.param({}, [(0.0, .96), (0.5, .96), (1.0, .96)], [(0.0, "term", "hard")], id="hard -> term, once"),
    pytest.param({}, [(1.0, .96), (2.0, .96), (3.0, .96)], [(1.0, "term", "hard"), (3.0, "kill", "grace")],
                 id="term, then kill after kill_grace_s"),
    pytest.param({}, [(0.0, .5), (0.5, .98)], [(0.5, "kill", "margin")],
                 id="margin: past hard + half the rest, kill without a term"),
    pytest.param({}, [(0.0, .805), (0.1, .835), (0.2, .865), (0.3, .895), (0.4, .925), (0.5, .955)],
                 [(0.2, "stop", "soft"), (0.5, "kill", "imminent")],
                 id="imminent: at hard, the limit two polls away at 300 MiB/s"),
    pytest.param({}, [(0.0, .5)] + span(0.5, 2.7, 0.98),
                 [(0.5, "kill", "margin"), (1.5, "kill", "still_alive"), (2.5, "kill", "still_alive")],
                 id="kill repeated every 1 s while alive"),
    # --- recycle: .stop "recycle", once; a memory stop may follow -------------------------
    pytest.param(LEAK, span(0, 120, lambda t: 0.70 + 0.05 * t / 120), [(60.0, "recycle", "leak")],
                 id="leak: steady growth that reaches soft within the horizon"),
    pytest.param({"max_worker_age_s": 5.0}, span(0, 7, 0.5, dt=0.5), [(5.0, "recycle", "age")], id="age"),
    pytest.param({"max_worker_age_s": 5.0}, span(0, 6, 0.5, dt=0.5) + [(6.0, .86), (7.0, .86)],
                 [(5.0, "recycle", "age"), (6.0, "stop", "soft")], id="recycle upgraded to a memory stop"),
    pytest.param({"max_worker_age_s": 5.0}, [(1.0, .86)] + span(2, 8, 0.5), [(1.0, "stop", "soft")],
                 id="no recycle after a memory stop"),
    # --- shapes that must not fire -------------------------------------------------------
    pytest.param({}, span(0, 120, sawtooth(0.3, 0.8)), [], id="training sawtooth 30-80% for 2 min: no stop"),
    pytest.param(LEAK, span(0, 150, sawtooth(0.3, 0.6)), [], id="training sawtooth 30-60%: no leak"),
    pytest.param(LEAK, span(0, 150, lambda t: 0.0005 * t + sawtooth(0.3, 0.6)(t)), [(60.0, "recycle", "leak")],
                 id="a leak beneath a training sawtooth"),
    pytest.param(LEAK, span(0, 120, lambda t: 0.75 if t >= 60 else 0.70), [],
                 id="a one-off step up is not a leak"),
    pytest.param({}, span(0, 20, lambda t: 0.60 * min(1.0, t / 0.8) + (0.12 if t >= 6 else 0.0)), [],
                 id="burst to 60%, plateau, one-off jump to 72%: no prediction"),
    pytest.param({}, span(0, 30, lambda t: 0.80 + (round(t * 10) % 3) * 1e-6), [], id="flat at 80%: no stop"),
    pytest.param({}, [(0.0, .5), (0.5, .99, None, False), (1.0, .99, None, False)], [],
                 id="an exited worker gets no decision"),
]


@pytest.mark.parametrize("settings, points, expected", ROWS)
def test_rules_table(settings, points, expected):
    """Each row's samples give exactly the expected decisions, at the expected times."""
    assert decisions(settings, points) == expected


LEARN_ROWS = [
    # stop at 1.0 with 0.86 in use; the checkpoint adds 3% then the worker exits at 2.5
    pytest.param([(1.0, .86), (1.5, .89), (2.0, .87), (2.5, .87, None, False)],
                 {"stop_to_exit_s": 1.5, "checkpoint_added_bytes": int(.89 * LIMIT) - int(.86 * LIMIT),
                  "checkpoint_estimate_s": 3.95}, id="graceful stop: learned"),
    pytest.param([(1.0, .96), (2.0, .96), (2.5, .96, None, False)], None, id="terminated: nothing learned"),
    pytest.param([(1.0, .5), (2.0, .5, None, False)], None, id="never stopped: nothing learned"),
]


@pytest.mark.parametrize("points, learned", LEARN_ROWS)
def test_stop_timing_learned_only_from_a_graceful_stop(points, learned):
    """The stop-to-exit time and the checkpoint's extra memory are learned from graceful stops only."""
    rules = Rules(MemorySettings(**BASE))
    rules.start(0.0)
    for p in points:
        usage = int(p[1] * LIMIT)
        rules.decide(Sample(t=p[0], usage_bytes=usage, limit_bytes=LIMIT, source="table", tree_bytes=usage,
                            tree_rss_bytes=usage, tree_pids=1, cgroup_usage_bytes=None, inactive_file_bytes=None,
                            mem_available_bytes=LIMIT, psi_some_avg10=None, alive=p[3] if len(p) > 3 else True), p[0])
    got = rules.finish()
    assert got == (None if learned is None else {**learned, "checkpoint_bytes": learned["checkpoint_added_bytes"]})
    assert rules.history is None and rules.decide(_any_sample(), 3.0).action == "none"
    if learned is not None:
        assert rules.timing.checkpoint_s == learned["checkpoint_estimate_s"]


def _any_sample() -> Sample:
    return Sample(t=3.0, usage_bytes=LIMIT, limit_bytes=LIMIT, source="table", tree_bytes=LIMIT, tree_rss_bytes=LIMIT,
                  tree_pids=1, cgroup_usage_bytes=None, inactive_file_bytes=None, mem_available_bytes=0,
                  psi_some_avg10=None, alive=True)
