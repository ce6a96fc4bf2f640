"""What a worker tells the outside while it trains: ``step`` log lines, ``progress.json`` (for
``trainerd status``) at most twice a second, the numbers for ``result.json``, and its own memory
figures.

The ``step`` line (step/total, loss, the learning rate that step used, tokens/s, ETA) is logged at
info for every step of an attempt's first ``LOG_FIRST_STEPS`` (a start or a resume is seen step by
step), then for the first step at least ``LOG_EVERY_S`` after the previous line (every step, when
steps are longer than that), and for the batch's last step: a 2-hour batch writes 90 to 145 lines
whether its steps take 50 ms or 40 s, never one per step for hours nor nothing for an hour. Every
other step is logged at debug, which the TensorBoard curves (worker/curves.py) still record. The
ETA is to the end of training (the evaluation after it is not counted), from the median of the
last steps, so it follows a machine whose load changes.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

from trainerd.core.contract import BatchFiles
from trainerd.core.fsutil import atomic_write_json, fmt_duration
from trainerd.worker.checkpoint import no_space

__all__ = ["LOG_EVERY_S", "LOG_FIRST_STEPS", "Progress", "current_rss_bytes", "peak_rss_bytes", "step_line_due"]

LOG_FIRST_STEPS = 10
LOG_EVERY_S = 60.0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def step_line_due(attempt_steps: int, step: int, total_steps: int, since_line_s: float | None) -> bool:
    """Whether this step's ``step`` line goes to the log at info (see the module docstring)."""
    return (attempt_steps <= LOG_FIRST_STEPS or step >= total_steps
            or since_line_s is None or since_line_s >= LOG_EVERY_S)


class Progress:
    """Training speed of this attempt (its own steps only: a resumed run's rate is its own)."""

    def __init__(self, files: BatchFiles, log: Any, *, writes: bool = True, world_size: int = 1):
        self.files = files
        self.writes = writes  # progress.json is rank 0's alone under torchrun
        self.world_size = world_size
        self.log = log
        self.tokens = 0          # real (unpadded) tokens trained by this attempt
        self.seconds = 0.0       # time inside optimizer steps
        self.steps = 0
        self._recent: list[float] = []  # the last steps' seconds (the stall watchdog scales with them)
        self._written_at = 0.0
        self._line_at: float | None = None  # when the last info step line was logged
        self.checkpoint: dict[str, Any] | None = None  # the last one written: step, at (Unix time), seconds

    def add_step(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.steps += 1
        self._recent = (self._recent + [seconds])[-21:]

    @property
    def median_step_s(self) -> float | None:
        return sorted(self._recent)[len(self._recent) // 2] if self._recent else None

    def checkpointed(self, step: int, seconds: float) -> None:
        """A checkpoint was written: progress.json says so at its next write (the metrics read it)."""
        self.checkpoint = {"step": step, "at": time.time(), "seconds": round(seconds, 4)}
        self._written_at = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def eta_s(self, step: int, total_steps: int) -> float:
        """Seconds to the last training step at the recent pace (median of the last steps)."""
        return max(0, total_steps - step) * (self.median_step_s or 0.0)

    def report(self, *, step: int, total_steps: int, loss: float | None, lr: float | None, tokens: int,
               micro_batch_size: int, log_step: bool = True) -> None:
        """Log the step (``lr``: the rate that step used) and refresh progress.json at most twice a
        second (always when not a step)."""
        now = time.monotonic()
        tps, eta = self.tokens_per_s, self.eta_s(step, total_steps)
        if log_step:
            due = step_line_due(self.steps, step, total_steps, None if self._line_at is None else now - self._line_at)
            if due:
                self._line_at = now
            (self.log.info if due else self.log.debug)(
                "step", step=step, total_steps=total_steps, loss=None if loss is None else round(loss, 5),
                lr=lr, tokens=tokens, tokens_per_s=round(tps, 1), eta=fmt_duration(eta), eta_s=round(eta, 1),
                rss_bytes=current_rss_bytes())
        if not self.writes or (log_step and now - self._written_at < 0.5):
            return
        self._written_at = now
        try:
            atomic_write_json(self.files.progress, {
                "step": step, "total_steps": total_steps, "loss": loss, "tokens": tokens,
                "tokens_per_s": tps, "eta_s": eta, "rss_bytes": current_rss_bytes(),
                "peak_rss_bytes": peak_rss_bytes(), "micro_batch_size": micro_batch_size,
                "median_step_s": self.median_step_s, "checkpoint": self.checkpoint,
                "pid": os.getpid(), "updated": time.time(), "world_size": self.world_size,
            }, durable=False)
        except OSError as e:
            # A status hint only: a full disk must not end the run here; the next checkpoint
            # tells (and stops cleanly) if the space does not come back.
            if not no_space(e):
                raise
