"""The exit policy, pure: how an attempt ended -> what happens to its batch.

No processes, no files, no clock: :func:`decide` takes what is known about the end of an
attempt (exit status, the worker's result.json, why trainerd asked it to stop and who sent a
fatal signal, the kernel's OOM evidence) with the batch row and the settings, and returns a
:class:`Verdict`. :mod:`trainerd.supervisor.attempts` carries it out. Table-tested in
tests/test_policy.py; the process-level tests prove the pieces fit.

    cancelled by the operator      -> cancel (whatever the exit: withdrawn, never published)
    stopped by the stall watchdog  -> crash (whatever the exit)
    exit 0 + adapter staged        -> publish, or heal when the gate refused it for forgetting (and
                                      healing tries are left), or reject
    exit 0, no adapter             -> crash
    exit 75                        -> stopped (reason from result.json; our guard's SIGTERM
                                      reads as memory/recycle, not shutdown)
    exit 65 / 78                   -> failed (data / settings unusable)
    our own signal (guard, supervisor) -> stopped (memory, or the cause we had)
    SIGKILL nobody here sent, kernel says not OOM -> crash (worker_killed_externally)
    SIGKILL nobody here sent, otherwise           -> kernel_oom_kill: a memory stop
    anything else                  -> crash

    stopped memory   -> back off to the fastest rung of the batch's ladder that needs less memory
                        (trainerd/core/ladder.py; without one: half the micro-batch, double
                        accumulation, then checkpointing), or fail when nothing smaller is left /
                        too many stops, naming the peak measured and the limit
    stopped disk_full-> requeue after backoff_s (the start check waits for space)
    stopped other    -> requeue at once
    crash            -> a fault survived when the attempt made progress (trainerd/supervisor/ledger/goodput.py:
                        a newer checkpoint, a step further than ever): requeue at once, the
                        retry budget untouched; else requeue after an exponential back-off, or
                        fail when retry.max_attempts crashes came in a row without getting further
                        (the crash that first reached that place counts as the first of them)
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Mapping

from trainerd.supervisor.child import ExitStatus
from trainerd.core.settings import Settings
from trainerd.core.contract import ExitCode, Outcome, StopReason
from trainerd.core.fsutil import fmt_bytes
from trainerd.supervisor.ledger import Batch
from trainerd.core.ladder import Rung, next_rung
from trainerd.core.planning import back_off
from trainerd.supervisor.gate import GateDecision
from trainerd.supervisor.stopping import Sender

__all__ = ["Action", "AttemptEnd", "Verdict", "crash", "crash_delay_s", "decide"]


class Action(str, Enum):
    PUBLISH = "publish"   # RUNNING -> DONE, the staged adapter becomes the next version
    REJECT = "reject"     # RUNNING -> REJECTED, the gate refused the candidate; current does not move
    HEAL = "heal"         # RUNNING -> QUEUED, refused for forgetting: trained again (supervisor/heal.py)
    REQUEUE = "requeue"   # RUNNING -> QUEUED (with ``updates``, not before ``next_attempt_at``)
    FAIL = "fail"         # RUNNING -> FAILED, original to failed/
    CANCEL = "cancel"     # RUNNING -> CANCELLED, `trainerd cancel`: original to done/ with .cancelled.json


@dataclass(frozen=True)
class AttemptEnd:
    """What is known when an attempt is over."""

    status: ExitStatus
    result: dict[str, Any] | None = None
    cause: StopReason | None = None      # why trainerd asked the worker to stop, if it did
    sender: Sender | None = None         # who in trainerd sent the fatal signal, if anyone
    adapter_staged: bool = False         # batch/published exists
    kernel_oom: bool | None = None       # forensics for a bare SIGKILL; None = cannot tell
    limit_bytes: int | None = None       # the guard's memory limit, for a failure message
    gate: GateDecision | None = None     # the gate's verdict on the candidate (exit 0 only)
    stalled: str | None = None           # the stall watchdog stopped it: what it saw
    progressed: bool = False             # a newer checkpoint and a step further than ever (goodput.py)
    reached_step: int | None = None      # the furthest optimizer step it completed
    traceback: str | None = None         # the last traceback in its stderr, for a crash's reason
    peak_bytes: int | None = None        # the guard's highest sample of the attempt (a failure names it)
    ladder: tuple[Rung, ...] | None = None  # the batch's memory rungs, fastest first (the back-off walks them)

    @property
    def result_reason(self) -> str | None:
        r = (self.result or {}).get("reason")
        return str(r) if r else None


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome                  # the attempt's outcome (ledger)
    reason: str                       # the attempt's reason (ledger)
    action: Action
    batch_reason: str = ""            # the batch's last_reason: why requeued, or why failed
    next_attempt_at: float = 0.0
    updates: Mapping[str, Any] = field(default_factory=dict)  # crash counts, memory_stops, the plan
    events: tuple[str, ...] = ()      # what to log, in order (see attempts.Attempts._log_verdict)
    stop: StopReason | None = None    # the stop this attempt ended with, if it was one


def decide(end: AttemptEnd, batch: Batch, settings: Settings, now: float) -> Verdict:
    """The verdict on one ended attempt of ``batch`` (the row as it was while running)."""
    v = _decide(end, batch, settings, now)
    if end.progressed and batch.crash_streak and v.action is Action.REQUEUE and v.outcome is not Outcome.CRASHED:
        # A stop after progress: the batch got further, so the crashes before it were not a loop.
        v = replace(v, updates={**v.updates, "crash_streak": 0})
    return v


def _decide(end: AttemptEnd, batch: Batch, settings: Settings, now: float) -> Verdict:
    st = end.status
    if end.cause is StopReason.CANCELLED:
        # The operator withdrew the batch: whatever the worker managed on its way out (a
        # checkpoint and exit 75, our SIGKILL after the grace, even exit 0 in the same instant),
        # it is not trained further and nothing of it is published.
        return _cancelled(f"cancelled while running ({st.describe()})")
    if end.stalled is not None and st.code != ExitCode.OK:
        # Stopped for making no progress: a crash, whatever it managed on the way out (exit 75
        # with a checkpoint is the best case: the retry resumes from it).
        return crash(batch, f"stalled: {end.stalled}", settings, now, end)
    if st.code == ExitCode.OK:
        if end.adapter_staged:
            if end.gate is not None and not end.gate.blessed:
                if end.gate.healable and batch.heals < settings.gate.heal_attempts:
                    n = batch.heals + 1
                    return Verdict(Outcome.DONE, f"refused for forgetting; healing try {n}", Action.HEAL,
                                   batch_reason=f"healing (try {n} of {settings.gate.heal_attempts}): {end.gate.rule}",
                                   updates={"heals": n}, events=("batch_healing",))
                return Verdict(Outcome.DONE, "done", Action.REJECT, batch_reason=f"rejected: {end.gate.rule}",
                               events=("adapter_rejected",))
            return Verdict(Outcome.DONE, "done", Action.PUBLISH)
        return crash(batch, "the worker exited 0 but left no adapter at batch/published", settings, now, end)
    if st.code == ExitCode.TEMPFAIL:
        reason = end.result_reason or "unknown"
        if end.cause in (StopReason.MEMORY, StopReason.RECYCLE) and reason == StopReason.SHUTDOWN:
            reason = end.cause.value  # our guard's SIGTERM, not an operator's shutdown
        return _stopped(batch, reason, reason, end, settings, now)
    if st.code in (ExitCode.DATAERR, ExitCode.CONFIG):
        bad_data = st.code == ExitCode.DATAERR
        what = "data unusable" if bad_data else "settings unusable"
        reason = end.result_reason or what
        return Verdict(Outcome.BAD_DATA if bad_data else Outcome.BAD_CONFIG, reason, Action.FAIL,
                       batch_reason=f"{what}: {reason}")
    if st.signal is not None and end.sender is not None:
        # Our own signal: a memory stop, or our SIGKILL at shutdown (grace expired, a second
        # signal). Never a crash.
        reason = StopReason.MEMORY.value if end.cause is StopReason.MEMORY else \
            (end.cause or StopReason.SHUTDOWN).value
        return _stopped(batch, reason, reason, end, settings, now)
    if st.signal == signal.SIGKILL and end.kernel_oom is False:
        # Nobody in trainerd sent it and the kernel counted no OOM kill of it while this attempt
        # ran (or named another pid): an operator's `kill -9`, a chaos test. A crash, not a
        # memory problem: backing off would shrink the batch for nothing.
        why = f"{st.describe()} sent by another process (the kernel counted no OOM kill of it)"
        v = crash(batch, why, settings, now, end)
        return _with_events(v, "worker_killed_externally", *v.events)
    if st.signal == signal.SIGKILL:
        # Nobody in trainerd sent it: the kernel's OOM killer, the usual sender of a bare SIGKILL.
        v = _stopped(batch, StopReason.KERNEL_OOM_KILL.value, StopReason.MEMORY.value, end, settings, now)
        return _with_events(v, "kernel_oom_kill", *v.events)
    reason = st.describe() + (f": {end.result_reason}" if end.result_reason else "")
    return crash(batch, reason, settings, now, end)


def crash_delay_s(streak: int, settings: Settings) -> float:
    """Exponential back-off after the ``streak``-th crash in a row without getting further:
    backoff_s, x2 each time, capped. (After a crash that made progress: none; policy.crash.)"""
    return min(settings.retry.backoff_s * (2 ** (streak - 1)), settings.retry.backoff_max_s)


def _stopped(batch: Batch, attempt_reason: str, stop: str, end: AttemptEnd, settings: Settings,
             now: float) -> Verdict:
    """A stop (exit 75, or our own kill): back to the queue; smaller after a memory stop."""
    try:
        reason = StopReason(stop)
    except ValueError:  # a reason this release does not know (an operator's .stop text): requeue
        return Verdict(Outcome.STOPPED, attempt_reason, Action.REQUEUE, batch_reason=stop,
                       events=("batch_requeued",))
    if reason is StopReason.CANCELLED:
        # result.json says cancelled but nobody here asked (the supervisor restarted while the
        # worker obeyed its .stop): the operator's request still stands.
        return _cancelled(f"cancelled while running ({end.status.describe()})")
    if reason is StopReason.MEMORY:
        return _memory_stop(batch, attempt_reason, end, settings)
    if reason is StopReason.DISK_FULL:
        # The worker could not write a checkpoint or the adapter; the previous ones are intact.
        # The start check (disk.min_free_bytes) holds the batch back; the short back-off keeps a
        # too-small min_free_bytes from spinning.
        return Verdict(Outcome.STOPPED, attempt_reason, Action.REQUEUE, batch_reason=reason.value,
                       next_attempt_at=now + settings.retry.backoff_s, events=("disk_full",), stop=reason)
    event = "batch_paused" if reason is StopReason.PAUSED else "batch_requeued"
    return Verdict(Outcome.STOPPED, attempt_reason, Action.REQUEUE, batch_reason=reason.value,
                   events=(event,), stop=reason)


def _cancelled(reason: str) -> Verdict:
    return Verdict(Outcome.STOPPED, StopReason.CANCELLED.value, Action.CANCEL, batch_reason=reason,
                   events=("batch_cancelled",), stop=StopReason.CANCELLED)


def _memory_stop(batch: Batch, attempt_reason: str, end: AttemptEnd, settings: Settings) -> Verdict:
    stops = batch.memory_stops + 1
    t = settings.train
    cur = (batch.micro_batch_size or t.micro_batch_size, batch.grad_accum_steps or t.grad_accum_steps,
           bool(batch.gradient_checkpointing))
    if end.ladder and batch.base_weights:
        rung = next_rung(end.ladder, (batch.base_weights, *cur))
        nxt = None if rung is None else (rung.micro_batch_size, rung.grad_accum_steps, rung.gradient_checkpointing)
        weights = {} if rung is None else {"base_weights": rung.weights}
        last = "even on the smallest rung of its memory ladder"
    else:
        nxt, weights = back_off(*cur), {}
        last = "even at micro_batch_size 1 with gradient checkpointing"
    if nxt is None or stops > settings.retry.max_memory_stops:
        why = f"needs more memory than the limit {last}" if nxt is None else \
            f"{stops} memory stops (retry.max_memory_stops)"
        return Verdict(Outcome.STOPPED, attempt_reason, Action.FAIL,
                       batch_reason=f"{why}: {_peak(end)} against a limit of {fmt_bytes(end.limit_bytes)}",
                       updates={"memory_stops": stops}, stop=StopReason.MEMORY)
    return Verdict(Outcome.STOPPED, attempt_reason, Action.REQUEUE, batch_reason=StopReason.MEMORY.value,
                   updates={"memory_stops": stops, "micro_batch_size": nxt[0], "grad_accum_steps": nxt[1],
                            "gradient_checkpointing": int(nxt[2]), **weights},
                   events=("memory_back_off",), stop=StopReason.MEMORY)


def _peak(end: AttemptEnd) -> str:
    """The attempt's peak: the worker's own (result.json) or, when it was killed before it could
    write one, the guard's highest sample."""
    rss = (end.result or {}).get("peak_rss_bytes")
    if rss:
        return f"peak RSS {fmt_bytes(rss)}"
    if end.peak_bytes:
        return f"peak {fmt_bytes(end.peak_bytes)} (the memory guard's highest sample)"
    return "peak unknown (no result.json and no sample)"


def crash(batch: Batch, reason: str, settings: Settings, now: float, end: AttemptEnd | None = None) -> Verdict:
    """A crash. After progress it is a fault survived: retried at once, the streak starts again at 1
    (this crash could be the first of a loop at its new place). Without progress it extends the
    streak, waits the back-off and, at ``retry.max_attempts`` in a row, fails the batch with the
    step it could not get past and the last traceback."""
    progressed = bool(end and end.progressed)
    at = end.reached_step if end is not None else None
    streak = 1 if progressed else batch.crash_streak + 1
    updates = {"crashes": batch.crashes + 1, "faults_survived": batch.faults_survived + int(progressed),
               "crash_streak": streak}
    limit = settings.retry.max_attempts
    if streak >= limit:
        furthest = max(batch.reached_step or 0, at or 0)
        why = (f"crashed {streak} times in a row without getting past step {furthest} (retry.max_attempts = "
               f"{limit}); last: {reason}" + (f", after step {at}" if at is not None else ", before its first step"))
        if end is not None and end.traceback:
            why += f"; its traceback (worker.stderr):\n{end.traceback}"
        return Verdict(Outcome.CRASHED, reason, Action.FAIL, updates=updates, batch_reason=why)
    delay = 0.0 if progressed else crash_delay_s(streak, settings)
    return Verdict(Outcome.CRASHED, reason, Action.REQUEUE, batch_reason=reason, updates=updates,
                   next_attempt_at=now + delay if delay else 0.0,
                   events=("fault_survived" if progressed else "worker_crashed",))


def _with_events(v: Verdict, *events: str) -> Verdict:
    return replace(v, events=events)
