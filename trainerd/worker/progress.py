"""What a worker tells the outside while it trains: a ``step`` log line per optimizer step,
``progress.json`` (for ``trainerd status``) at most twice a second, the numbers for
``result.json``, and its own memory figures."""

from __future__ import annotations

import os
import resource
import time
from typing import Any

from trainerd.contract import BatchFiles
from trainerd.fsutil import atomic_write_json
from trainerd.worker.checkpoint import no_space

__all__ = ["Progress", "current_rss_bytes", "peak_rss_bytes"]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


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
        return (total_steps - step) * self.seconds / max(1, self.steps)

    def report(self, *, step: int, total_steps: int, loss: float | None, lr: float | None, tokens: int,
               micro_batch_size: int, log_step: bool = True) -> None:
        """Log the step and refresh progress.json at most twice a second (always when not a step)."""
        now = time.monotonic()
        tps, eta = self.tokens_per_s, self.eta_s(step, total_steps)
        if log_step:
            self.log.info("step", step=step, total_steps=total_steps, loss=None if loss is None else round(loss, 5),
                          lr=lr, tokens=tokens, tokens_per_s=round(tps, 1), eta_s=round(eta, 1),
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
