"""How often to checkpoint, from what a checkpoint costs and how often faults come (stdlib only).

A fault (a crash, a SIGKILL nobody here sent, the kernel's OOM killer) loses the steps since the
last checkpoint; a checkpoint costs the step loop ``C`` seconds. Young (1974) and Daly (2006):
the interval that loses the least time overall is about ``sqrt(2 * C * MTBF)``. With
``train.checkpoint_every_s: auto`` the worker measures ``C`` itself and the supervisor hands it
the MTBF it estimates from the faults of the last days (``--mtbf-s``); both sides use this module.

The interval is clamped: never shorter than ``C / MAX_OVERHEAD`` (checkpointing costs at most
1 % of the step loop's time), than twice the last background write (one write in flight at a
time), or than ``MIN_INTERVAL_S``; never longer than ``MAX_INTERVAL_S`` (the fixed default of
earlier releases, so ``auto`` never loses more per fault than they did).

The MTBF is an estimate with a prior worth one fault per ``PRIOR_MTBF_S`` of training:
``(PRIOR_MTBF_S + training seconds) / (1 + faults)`` over the last ``WINDOW_S``. With no faults
it starts at an hour (conservative: a single machine rarely fails that often, so checkpoints
come a little more often than needed, which costs well under 1 %), and it follows the faults
that do come: a fault every two minutes for an hour brings it to about four minutes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["FaultRate", "MAX_INTERVAL_S", "MAX_OVERHEAD", "MIN_INTERVAL_S", "PRIOR_COST_S", "PRIOR_MTBF_S",
           "WINDOW_S", "checkpoint_interval_s", "estimate_mtbf", "is_fault", "young_daly_s"]

PRIOR_MTBF_S = 3600.0      # one fault an hour until the ledger says otherwise
WINDOW_S = 3 * 86400.0     # faults of the last three days count
PRIOR_COST_S = 0.1         # a LoRA checkpoint before one was measured (SmolLM2 r8: ~0.08 s, FACTS.md)
MIN_INTERVAL_S = 2.0
MAX_INTERVAL_S = 600.0
MAX_OVERHEAD = 0.01        # checkpoint stalls <= 1 % of the step loop


def young_daly_s(cost_s: float, mtbf_s: float) -> float:
    """The first-order optimum interval between checkpoints, ``sqrt(2 C M)``."""
    return math.sqrt(2.0 * max(cost_s, 0.0) * max(mtbf_s, 0.0))


def checkpoint_interval_s(cost_s: float, mtbf_s: float, *, write_s: float = 0.0) -> tuple[float, str]:
    """(seconds between checkpoints, which rule set it: ``young_daly``, ``overhead``, ``write``,
    ``min`` or ``max``). ``cost_s``: what a checkpoint stalls the step loop; ``write_s``: how
    long the last one took to reach the disk (a background write: longer than the stall)."""
    yd = young_daly_s(cost_s, mtbf_s)
    floors = {"min": MIN_INTERVAL_S, "overhead": max(cost_s, 0.0) / MAX_OVERHEAD, "write": 2.0 * max(write_s, 0.0)}
    rule, lo = max(floors.items(), key=lambda kv: kv[1])
    interval, why = (MAX_INTERVAL_S, "max") if yd > MAX_INTERVAL_S else (yd, "young_daly")
    # A floor wins over the ceiling too: never more than 1 % overhead, never two writes at once.
    return (lo, rule) if interval < lo else (interval, why)


def is_fault(outcome: str | None, reason: str | None) -> bool:
    """An attempt that ended without the chance to checkpoint: a crash (any signal nobody in
    trainerd sent, a stall, an exception) or the kernel's OOM kill. Stops trainerd asked for
    (pause, memory, recycle, shutdown) are not faults."""
    return outcome == "crashed" or reason == "kernel_oom_kill"


@dataclass(frozen=True)
class FaultRate:
    """The supervisor's MTBF estimate, as it hands it to a worker and logs it."""

    mtbf_s: float
    faults: int          # faults in the window
    training_s: float    # seconds workers ran in the window
    window_s: float = WINDOW_S

    def as_dict(self) -> dict[str, Any]:
        return {"mtbf_s": round(self.mtbf_s, 1), "faults": self.faults, "training_s": round(self.training_s, 1),
                "window_s": self.window_s}


def estimate_mtbf(attempts: Iterable[tuple[float, float | None, str | None, str | None]], now: float, *,
                  window_s: float = WINDOW_S, prior_s: float = PRIOR_MTBF_S) -> FaultRate:
    """The MTBF from ``(started_at, ended_at, outcome, reason)`` of the attempts that ended in
    the window (their time before the window does not count)."""
    since = now - window_s
    faults, run = 0, 0.0
    for started, ended, outcome, reason in attempts:
        if ended is None or ended < since:
            continue
        run += max(0.0, ended - max(started, since))
        faults += is_fault(outcome, reason)
    return FaultRate((prior_s + run) / (1 + faults), faults, run, window_s)
