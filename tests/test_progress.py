"""How a long batch reads: which steps the log keeps at info, durations as a person reads an ETA,
and `trainerd status`'s training line for a 2-hour batch (step/total, loss, tokens/s, ETA counted
down between the worker's writes, the phase after training)."""

from __future__ import annotations

import pytest

from trainerd.core.fsutil import fmt_duration
from trainerd.supervisor.views.status import _eta_now, _render_running
from trainerd.worker.progress import LOG_EVERY_S, LOG_FIRST_STEPS, step_line_due


@pytest.mark.parametrize("attempt_steps, step, total, since, due", [
    (1, 1, 5400, None, True),                     # an attempt's first step
    (LOG_FIRST_STEPS, 10, 5400, 0.1, True),       # ... and its first ten
    (LOG_FIRST_STEPS + 1, 11, 5400, 0.1, False),  # then not every step
    (LOG_FIRST_STEPS + 1, 11, 5400, LOG_EVERY_S, True),  # but one a minute
    (500, 3000, 5400, LOG_EVERY_S - 1, False),
    (5400, 5400, 5400, 0.1, True),                # and always the last
    (3, 803, 5400, 0.1, True),                    # a resumed attempt's first steps too
])
def test_step_line_cadence(attempt_steps, step, total, since, due):
    """Every step of an attempt's first ten, then one per LOG_EVERY_S, and the batch's last step."""
    assert step_line_due(attempt_steps, step, total, since) is due


def test_cadence_over_a_two_hour_batch():
    """A 2-hour batch logs 90 to 145 step lines whether its steps take 0.05 s or 40 s."""
    for step_s in (0.05, 1.3, 13.0, 40.0):
        total, last, lines = int(7200 / step_s), None, 0
        for k in range(1, total + 1):
            t = k * step_s
            if step_line_due(k, k, total, None if last is None else t - last):
                last, lines = t, lines + 1
        assert 90 <= lines <= 135 + LOG_FIRST_STEPS, (step_s, lines)


@pytest.mark.parametrize("s, text", [(0, "0s"), (42.4, "42s"), (59.6, "1m00s"), (725, "12m05s"), (6612, "1h50m"),
                                     (86399, "23h59m"), (3 * 86400 + 4 * 3600 + 59, "3d04h"),
                                     (None, "-"), (-1, "-"), (float("nan"), "-")])
def test_fmt_duration(s, text):
    """Seconds, minutes and seconds, hours and minutes, days and hours; '-' for nothing sensible."""
    assert fmt_duration(s) == text


def _running(**kw):
    r = {"id": 3, "file": "big.jsonl", "attempt": 1, "step": 120, "total_steps": 5400, "tokens_per_s": 412.3,
         "eta_s": 6612.0, "rss_bytes": 3 << 30, "loss": 2.31449, "micro_batch_size": 4, "grad_accum_steps": 4,
         "ranks": 1, "interrupted": False, "no_progress_s": None, "phase": "train"}
    r.update(kw)
    return r


def test_status_line_of_a_two_hour_batch():
    """step/total with the share done, the loss, tokens/s, the ETA in hours and minutes, memory."""
    assert _render_running(_running()) == (
        "training  #3 big.jsonl attempt 1: step 120/5400 (2%), loss 2.314, 412 tok/s, ETA 1h50m, "
        "memory 3.0 GiB, micro-batch 4x4")


def test_status_line_names_the_memory_plans_rung():
    """A batch planned on bf16 weights with recomputation says so after its micro-batch; the plain rung adds nothing."""
    line = _render_running(_running(base_weights="bfloat16", gradient_checkpointing=True, micro_batch_size=1,
                                    grad_accum_steps=16))
    assert line.endswith("micro-batch 1x16 (bfloat16 weights, gradient checkpointing)")
    assert _render_running(_running(base_weights="float32", gradient_checkpointing=False)).endswith("micro-batch 4x4")


def test_status_line_before_and_after_training():
    """Before the first step it names what the worker does; after the last, the evaluation."""
    assert "starting (loading the model)" in _render_running(_running(step=None, total_steps=None, phase="load"))
    line = _render_running(_running(step=5400, phase="evaluate"))
    assert "step 5400/5400, evaluating against its champion" in line and "ETA" not in line


def test_eta_counts_down_between_writes():
    """A step may take minutes: status subtracts the time since progress.json was written, never below 0."""
    assert _eta_now({"eta_s": 600.0, "updated": 1000.0}, 1090.0) == 510.0
    assert _eta_now({"eta_s": 60.0, "updated": 1000.0}, 2000.0) == 0.0
    assert _eta_now({"eta_s": 60.0}, 2000.0) == 60.0 and _eta_now({}, 2000.0) is None
