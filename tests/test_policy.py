"""The exit policy as a table: how an attempt ended -> what happens to its batch. No processes,
no files, time as an argument (the process-level proofs are in tests/test_supervisor.py)."""

from __future__ import annotations

import signal
from dataclasses import replace

import pytest

from trainerd.supervisor.child import ExitStatus
from trainerd.core.config import from_dict
from trainerd.core.contract import StopReason
from trainerd.supervisor.ledger import Batch
from trainerd.supervisor.ledger.states import BatchState
from trainerd.supervisor.policy import Action, AttemptEnd, crash_delay_s, decide
from trainerd.supervisor.stopping import Sender

NOW = 1000.0
SETTINGS = from_dict({"root": "/r", "retry": {"max_attempts": 3, "backoff_s": 10, "backoff_max_s": 15,
                                              "max_memory_stops": 3},
                      "train": {"micro_batch_size": 4, "grad_accum_steps": 4}})


def batch(**kw) -> Batch:
    base = dict(id=7, name="a.jsonl", state=BatchState.RUNNING, created_at=0.0, updated_at=0.0,
                micro_batch_size=4, grad_accum_steps=4, gradient_checkpointing=False)
    return Batch(**{**base, **kw})


CRASH1 = {"crashes": 1, "faults_survived": 0, "crash_streak": 1}
KILLED = "Signal 9 (SIGKILL) sent by another process (the kernel counted no OOM kill of it)"


def ended(code=None, sig=None, reason=None, **kw) -> AttemptEnd:
    result = {"reason": reason, "peak_rss_bytes": 3 << 30} if reason else None
    return AttemptEnd(ExitStatus(code, sig), result, **kw)


# (what ended, the batch as it was) -> (outcome, attempt reason, action, batch reason, updates, events, delay)
TABLE = [
    ("done, adapter staged", ended(0, adapter_staged=True), batch(),
     "done", "done", Action.PUBLISH, "", {}, (), 0),
    ("exit 0 without an adapter is a crash", ended(0), batch(),
     "crashed", "the worker exited 0 but left no adapter at batch/published", Action.REQUEUE,
     "the worker exited 0 but left no adapter at batch/published", CRASH1, ("worker_crashed",), 10),
    ("paused", ended(75, reason="paused"), batch(),
     "stopped", "paused", Action.REQUEUE, "paused", {}, ("batch_paused",), 0),
    ("shutdown", ended(75, reason="shutdown"), batch(),
     "stopped", "shutdown", Action.REQUEUE, "shutdown", {}, ("batch_requeued",), 0),
    ("our guard's SIGTERM reads as memory, not shutdown",
     ended(75, reason="shutdown", cause=StopReason.MEMORY), batch(),
     "stopped", "memory", Action.REQUEUE, "memory",
     {"memory_stops": 1, "micro_batch_size": 2, "grad_accum_steps": 8, "gradient_checkpointing": 0},
     ("memory_back_off",), 0),
    ("a recycle resumes at once", ended(75, reason="shutdown", cause=StopReason.RECYCLE), batch(),
     "stopped", "recycle", Action.REQUEUE, "recycle", {}, ("batch_requeued",), 0),
    ("memory at micro 1 turns on gradient checkpointing",
     ended(75, reason="memory"), batch(micro_batch_size=1, grad_accum_steps=16, memory_stops=2),
     "stopped", "memory", Action.REQUEUE, "memory",
     {"memory_stops": 3, "micro_batch_size": 1, "grad_accum_steps": 16, "gradient_checkpointing": 1},
     ("memory_back_off",), 0),
    ("memory with nothing smaller left fails",
     ended(75, reason="memory"), batch(micro_batch_size=1, grad_accum_steps=16, gradient_checkpointing=True),
     "stopped", "memory", Action.FAIL,
     "needs more memory than the limit even at micro_batch_size 1 with gradient checkpointing: "
     "peak RSS 3.0 GiB against a limit of -", {"memory_stops": 1}, (), 0),
    ("too many memory stops fails", ended(75, reason="memory"), batch(memory_stops=3),
     "stopped", "memory", Action.FAIL, "4 memory stops (retry.max_memory_stops): peak RSS 3.0 GiB against "
     "a limit of -", {"memory_stops": 4}, (), 0),
    ("disk full waits backoff_s", ended(75, reason="disk_full"), batch(),
     "stopped", "disk_full", Action.REQUEUE, "disk_full", {}, ("disk_full",), 10),
    ("an unknown stop reason requeues", ended(75, reason="tea break"), batch(),
     "stopped", "tea break", Action.REQUEUE, "tea break", {}, ("batch_requeued",), 0),
    ("bad data fails", ended(65, reason="too many bad lines"), batch(),
     "bad_data", "too many bad lines", Action.FAIL, "data unusable: too many bad lines", {}, (), 0),
    ("bad settings fail", ended(78), batch(),
     "bad_config", "settings unusable", Action.FAIL, "settings unusable: settings unusable", {}, (), 0),
    ("the guard's SIGKILL is a memory stop", ended(sig=signal.SIGKILL, cause=StopReason.MEMORY, sender=Sender.GUARD),
     batch(), "stopped", "memory", Action.REQUEUE, "memory",
     {"memory_stops": 1, "micro_batch_size": 2, "grad_accum_steps": 8, "gradient_checkpointing": 0},
     ("memory_back_off",), 0),
    ("our SIGKILL at shutdown is not a crash",
     ended(sig=signal.SIGKILL, cause=StopReason.SHUTDOWN, sender=Sender.SUPERVISOR), batch(),
     "stopped", "shutdown", Action.REQUEUE, "shutdown", {}, ("batch_requeued",), 0),
    ("a kill -9 the kernel did not count is a crash", ended(sig=signal.SIGKILL, kernel_oom=False), batch(),
     "crashed", "Signal 9 (SIGKILL) sent by another process (the kernel counted no OOM kill of it)",
     Action.REQUEUE, "Signal 9 (SIGKILL) sent by another process (the kernel counted no OOM kill of it)",
     CRASH1, ("worker_killed_externally", "worker_crashed"), 10),
    ("a bare SIGKILL is the OOM killer", ended(sig=signal.SIGKILL, kernel_oom=None), batch(),
     "stopped", "kernel_oom_kill", Action.REQUEUE, "memory",
     {"memory_stops": 1, "micro_batch_size": 2, "grad_accum_steps": 8, "gradient_checkpointing": 0},
     ("kernel_oom_kill", "memory_back_off"), 0),
    ("a segfault is a crash, back-off doubles", ended(sig=signal.SIGSEGV), batch(crashes=1, crash_streak=1),
     "crashed", "Signal 11 (SIGSEGV)", Action.REQUEUE, "Signal 11 (SIGSEGV)",
     {"crashes": 2, "faults_survived": 0, "crash_streak": 2}, ("worker_crashed",), 15),
    ("the last crash fails", ended(3, reason="boom"), batch(crashes=2, crash_streak=2),
     "crashed", "exit code 3: boom", Action.FAIL,
     "crashed 3 times in a row without getting past step 0 (retry.max_attempts = 3); last: exit code 3: boom, "
     "before its first step", {"crashes": 3, "faults_survived": 0, "crash_streak": 3}, (), 0),
    # --- issue 24: crashes counted by progress ---------------------------------------------------
    ("a crash after progress is a fault survived: at once, the streak starts again, no budget spent",
     ended(sig=signal.SIGKILL, kernel_oom=False, progressed=True, reached_step=40),
     batch(crashes=4, faults_survived=3, crash_streak=2, reached_step=30),
     "crashed", KILLED, Action.REQUEUE, KILLED, {"crashes": 5, "faults_survived": 4, "crash_streak": 1},
     ("worker_killed_externally", "fault_survived"), 0),
    ("ten faults survived, each after progress: still requeued",
     ended(sig=signal.SIGKILL, kernel_oom=False, progressed=True, reached_step=900),
     batch(crashes=10, faults_survived=10, crash_streak=1, reached_step=800),
     "crashed", KILLED, Action.REQUEUE, KILLED, {"crashes": 11, "faults_survived": 11, "crash_streak": 1},
     ("worker_killed_externally", "fault_survived"), 0),
    ("the same place again: the streak grows to max_attempts and fails with the step and the traceback",
     ended(70, reason="RuntimeError: boom", reached_step=5, traceback="Traceback (most recent call last):\n"
           "  File \"train.py\", line 1\nRuntimeError: boom"),
     batch(crashes=2, crash_streak=2, faults_survived=1, reached_step=5),
     "crashed", "exit code 70: RuntimeError: boom", Action.FAIL,
     "crashed 3 times in a row without getting past step 5 (retry.max_attempts = 3); last: exit code 70: "
     "RuntimeError: boom, after step 5; its traceback (worker.stderr):\nTraceback (most recent call last):\n"
     "  File \"train.py\", line 1\nRuntimeError: boom",
     {"crashes": 3, "faults_survived": 1, "crash_streak": 3}, (), 0),
    ("a stop after progress ends the crash streak", ended(75, reason="paused", progressed=True),
     batch(crash_streak=2), "stopped", "paused", Action.REQUEUE, "paused", {"crash_streak": 0}, ("batch_paused",), 0),
    ("a stop without progress keeps it", ended(75, reason="paused"), batch(crash_streak=2),
     "stopped", "paused", Action.REQUEUE, "paused", {}, ("batch_paused",), 0),
    ("a kernel OOM kill after progress is still a memory stop (the ladder), not a crash",
     ended(sig=signal.SIGKILL, kernel_oom=None, progressed=True), batch(crash_streak=1),
     "stopped", "kernel_oom_kill", Action.REQUEUE, "memory",
     {"memory_stops": 1, "micro_batch_size": 2, "grad_accum_steps": 8, "gradient_checkpointing": 0,
      "crash_streak": 0}, ("kernel_oom_kill", "memory_back_off"), 0),
]


@pytest.mark.parametrize("name,end,b,outcome,reason,action,batch_reason,updates,events,delay",
                         TABLE, ids=[row[0] for row in TABLE])
def test_exit_policy(name, end, b, outcome, reason, action, batch_reason, updates, events, delay):
    """Each row: the verdict's outcome, reasons, action, ledger updates, log events and retry delay."""
    v = decide(end, b, SETTINGS, NOW)
    assert (v.outcome, v.reason, v.action) == (outcome, reason, action)
    assert (v.batch_reason, dict(v.updates), v.events) == (batch_reason, updates, events)
    assert v.next_attempt_at == (NOW + delay if delay else 0.0)


def test_crash_back_off_doubles_and_is_capped():
    """backoff_s x 2^(k-1), capped at backoff_max_s."""
    assert [crash_delay_s(k, SETTINGS) for k in (1, 2, 3, 4)] == [10, 15, 15, 15]


def test_a_reload_applies_to_the_next_decision():
    """The policy reads the settings it is given: a reloaded retry budget decides the next crash."""
    strict = from_dict({"root": "/r", "retry": {"max_attempts": 1}})
    assert decide(ended(3), batch(), SETTINGS, NOW).action is Action.REQUEUE
    assert decide(ended(3), batch(), strict, NOW).action is Action.FAIL


def test_back_off_resets_after_progress():
    """Crashes without progress wait backoff_s, x2 each; a crash after progress restarts at once and
    the next crash without progress waits from the start of the ladder again, not further up it."""
    settings = from_dict({"root": "/r", "retry": {"max_attempts": 10, "backoff_s": 5, "backoff_max_s": 600}})
    b = batch()
    waits = []
    for progressed in (False, False, False, True, False, False, True, True, False):
        v = decide(ended(sig=signal.SIGKILL, kernel_oom=False, progressed=progressed, reached_step=1), b, settings, NOW)
        assert v.action is Action.REQUEUE
        waits.append(v.next_attempt_at - NOW if v.next_attempt_at else 0.0)
        b = replace(b, **v.updates)
    assert waits == [5, 10, 20, 0, 10, 20, 0, 0, 10]
    assert (b.crashes, b.faults_survived, b.crashes_without_progress) == (9, 3, 6)


def test_a_deterministic_crash_is_quarantined_within_max_attempts():
    """A worker that dies after the same step every time: the first attempt made progress (a fault
    survived), every later one only redoes it; quarantined at attempt max_attempts, the step named."""
    b = batch()
    for attempt in range(1, 10):
        first = attempt == 1
        v = decide(ended(sig=signal.SIGKILL, kernel_oom=False, progressed=first, reached_step=12), b, SETTINGS, NOW)
        b = replace(b, **v.updates, reached_step=12)
        if v.action is Action.FAIL:
            break
    assert attempt == SETTINGS.retry.max_attempts
    assert "without getting past step 12" in v.batch_reason and "after step 12" in v.batch_reason
