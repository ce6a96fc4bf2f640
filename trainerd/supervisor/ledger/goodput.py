"""Progress and goodput, pure: what an ended attempt did for its batch, and what each fault cost.

The worker keeps ``tally.json`` (worker/tally.py): the step it resumed from, the furthest step it
completed, its newest complete checkpoint, its time in steps and in checkpoints, and when its
first optimizer step began (with the restart's phases). Once it is gone the supervisor reads it:

- **progress** (:func:`progress_of`): the attempt wrote a checkpoint newer than the one it
  resumed from *and* completed a step further than any earlier attempt of the batch (the
  batch's ``reached_step``). Both, because either alone is fooled: without the first, work that
  no checkpoint kept; without the second, a crash loop whose redo happens to cross a timed
  checkpoint (each retry would inch its checkpoint towards the crash and look like progress).
  A crash after progress is a fault survived; it costs no retry budget (policy.crash).
- **the account** (:func:`account`) of one attempt, in seconds: its wall time; the wait before
  it when the attempt before it ended in a fault (back-off and the loop's reaction); its restart
  (spawn to the first optimizer step); its step time split into *useful* (steps no attempt had
  completed before) and *recomputed* (steps a fault had taken away); its checkpoint stalls.
- **the batch's totals** (:func:`add`): useful step time, wall time (attempts plus the waits
  after faults; a pause or a queue is not counted), faults, and what the faults cost:
  recomputed work, restarts, back-off. ``goodput = useful_s / wall_s``.

Seconds in steps are the worker's own (the tally is rewritten after every step; a SIGKILL loses
at most the step in progress, which is the fault's loss, not an error of the count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TOTAL_KEYS", "Progress", "account", "add", "goodput", "progress_of", "summary"]

TOTAL_KEYS = ("useful_s", "wall_s", "faults", "recomputed_s", "restart_s", "backoff_s", "checkpoint_s")


@dataclass(frozen=True)
class Progress:
    """Where an attempt started and how far it got (all None when it never began training)."""

    from_step: int | None
    reached_step: int | None
    checkpoint_step: int | None   # its newest complete checkpoint
    before_step: int              # the batch's furthest step before this attempt

    @property
    def progressed(self) -> bool:
        if self.reached_step is None or self.checkpoint_step is None:
            return False
        return self.checkpoint_step > (self.from_step or 0) and self.reached_step > self.before_step


def progress_of(tally: dict[str, Any] | None, before_step: int | None) -> Progress:
    t = tally or {}
    return Progress(_int(t.get("from_step")), _int(t.get("step")), _int(t.get("ckpt_step")), before_step or 0)


def account(tally: dict[str, Any] | None, *, before_step: int | None, started_at: float, ended_at: float,
            after_fault_at: float | None) -> dict[str, Any]:
    """One attempt's account. ``after_fault_at``: when the attempt before it ended, if that was a fault."""
    t = tally or {}
    p = progress_of(tally, before_step)
    wall = max(0.0, ended_at - started_at)
    ready = t.get("ready_at")
    restart = min(wall, max(0.0, float(ready) - started_at)) if isinstance(ready, (int, float)) else wall
    steps, step_s = int(t.get("steps") or 0), float(t.get("step_s") or 0.0)
    new = redone = 0
    if p.from_step is not None and p.reached_step is not None:
        new = max(0, p.reached_step - max(p.before_step, p.from_step))
        redone = max(0, min(p.reached_step, p.before_step) - p.from_step)
    per_step = step_s / steps if steps else 0.0
    return {
        "from_step": p.from_step, "reached_step": p.reached_step, "checkpoint_step": p.checkpoint_step,
        "progressed": p.progressed, "after_fault": after_fault_at is not None,
        "wall_s": round(wall, 3),
        "wait_s": round(max(0.0, started_at - after_fault_at), 3) if after_fault_at is not None else 0.0,
        "restart_s": round(restart, 3), "phases": t.get("phases") or {},
        "steps": steps, "step_s": round(step_s, 3), "new_steps": new, "redone_steps": redone,
        "useful_s": round(per_step * new, 3), "recomputed_s": round(per_step * redone, 3),
        "checkpoint_s": round(float(t.get("ckpt_s") or 0.0), 3), "checkpoints": int(t.get("ckpt_n") or 0),
        "checkpoint_interval_s": t.get("interval_s"), "mtbf_s": t.get("mtbf_s"),
    }


def add(totals: dict[str, Any] | None, acc: dict[str, Any], *, fault: bool) -> dict[str, Any]:
    """The batch's totals with one more attempt (``fault``: it ended in a fault)."""
    out = {k: float((totals or {}).get(k) or 0.0) for k in TOTAL_KEYS}
    out["useful_s"] += acc["useful_s"]
    out["wall_s"] += acc["wall_s"] + acc["wait_s"]
    out["checkpoint_s"] += acc["checkpoint_s"]
    out["faults"] += int(fault)
    if acc["after_fault"]:  # what the fault before this attempt cost: its redo, its restart, the wait
        out["recomputed_s"] += acc["recomputed_s"]
        out["restart_s"] += acc["restart_s"]
        out["backoff_s"] += acc["wait_s"]
    return {k: (int(v) if k == "faults" else round(v, 3)) for k, v in out.items()}


def goodput(totals: dict[str, Any] | None) -> float | None:
    """Useful step time over wall time; None before any wall time was counted."""
    t = totals or {}
    wall = float(t.get("wall_s") or 0.0)
    return round(float(t.get("useful_s") or 0.0) / wall, 4) if wall > 0 else None


def summary(totals: dict[str, Any] | None) -> dict[str, Any]:
    """What status, the lineage and the metrics show: goodput and the seconds lost per fault."""
    t = {k: (totals or {}).get(k) or 0 for k in TOTAL_KEYS}
    faults = int(t["faults"])
    lost = {k: round(t[f"{k}_s"] / faults, 2) if faults else 0.0 for k in ("recomputed", "restart", "backoff")}
    return {"goodput": goodput(t), "useful_s": round(float(t["useful_s"]), 1), "wall_s": round(float(t["wall_s"]), 1),
            "faults": faults, "lost_per_fault_s": {**lost, "total": round(sum(lost.values()), 2)},
            "checkpoint_s": round(float(t["checkpoint_s"]), 2)}


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
