"""What training leaves behind: checkpoints (written by saver.py; under torchrun rank 0 writes every
rank's), the batch's final adapter, progress, a stop's result, and result.json's summary.

A part of :class:`trainerd.worker.train.Trainer`, which holds the state it works on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainerd.core.contract import ExitCode, Outcome, StopReason
from trainerd.worker import dist
from trainerd.worker import weights as wt
from trainerd.worker.data import Cursor
from trainerd.worker.progress import peak_rss_bytes
from trainerd.worker.publish import write_adapter

__all__ = ["RunEnd", "TrainOutput"]


@dataclass
class RunEnd:
    """How Trainer.run ended: result.json's status and reason, the exit code, extra fields."""

    status: Outcome
    reason: str
    exit_code: ExitCode
    extra: dict[str, Any] = field(default_factory=dict)


class TrainOutput:
    """The Trainer's checkpoints, adapter, progress and result."""

    def _checkpoint(self, cursor: Cursor, rng: dict[str, Any], *, now: bool = True) -> None:
        """``now``: on disk before this returns; else possibly in the background (worker/saver.py).
        Under torchrun every rank calls this at the same step and rank 0 writes (dist.lead_writes)."""
        if self.ranks.on:
            dist.lead_writes(self.ranks, rng, lambda r: self._write_checkpoint(cursor, r, now=True), self.device)
            return
        self._write_checkpoint(cursor, rng, now=now)

    def _write_checkpoint(self, cursor: Cursor, rng: dict[str, Any], *, now: bool) -> None:
        state = {"tokens": self.tokens, "cursor": cursor.as_dict(), "total_steps": self.total_steps,
                 "effective_batch": self.eff, "micro_batch_size": self.micro, "precision": self.precision.name,
                 "base_weights": self.loaded.weights, "numerics_changes": self.numerics_changes,
                 "first_loss": self.first_loss, "last_loss": self.last_loss,
                 "early": self.early.state(), "training_done": self.training_done}
        self.saver.save(self.step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, rng=rng,
                        state=state, protect=self.early.best_step, now=now)

    def _write_final_adapter(self) -> Path:
        """The batch's adapter at ``--publish`` (or final_adapter/), complete before it appears."""
        from trainerd.worker.curves import chain_offset

        return write_adapter(self.model, self.publish or self.files.final_adapter, {
            "base_model": self.s.model.path,
            "init_adapter": str(self.init_adapter) if self.init_adapter else None,
            # The chain's running total of steps (TensorBoard's step axis reads one file, not the chain).
            "chain_steps": chain_offset(self.init_adapter) + self.step,
            "batch": self.batch_dir.name, "steps": self.step, "tokens": self.tokens,
            "first_loss": self.first_loss, "last_loss": self.last_loss, "seed": self.s.train.seed,
            "precision": self.precision.name, "base_weights": self.loaded.weights,
            "quantized": wt.quantized(self.loaded.weights, self.numerics_changes),
            "numerics_changes": self.numerics_changes}, self.files.checkpoints, self.log)

    def _report(self, loss: float | None, log_step: bool = True) -> None:
        self.progress.report(step=self.step, total_steps=self.total_steps, loss=loss,
                             lr=self.stepper.last_lr if self.stepper else None, tokens=self.tokens,
                             micro_batch_size=self.micro, log_step=log_step)

    def _stopped(self, reason: str) -> RunEnd:
        self.log.info("stopped", reason=reason, step=self.step, total_steps=self.total_steps)
        return RunEnd(Outcome.STOPPED, reason, ExitCode.TEMPFAIL)

    def _stopped_before_training(self) -> RunEnd:
        reason = self.stopper.check() or StopReason.SHUTDOWN
        self.log.info("stopped", reason=reason, step=0, during="scan")
        return RunEnd(Outcome.STOPPED, reason, ExitCode.TEMPFAIL)

    def summary(self) -> dict[str, Any]:
        """What result.json reports; safe to call at any point of the run (even before set-up)."""
        out = dict(self.result)
        out.update(step=self.step, total_steps=self.total_steps, tokens=self.tokens, first_loss=self.first_loss,
                   last_loss=self.last_loss, tokens_per_s=round(self.progress.tokens_per_s, 2),
                   peak_rss_bytes=peak_rss_bytes(), elapsed_s=round(time.monotonic() - self.started, 2))
        if self.micro:  # the CUDA OOM back-off may have changed the split: tell the supervisor
            out.update(micro_batch_size=self.micro, grad_accum_steps=-(-self.eff // self.micro))
        if self.ranks.on:
            out.update(rank=self.ranks.rank, world_size=self.ranks.world)
        if self.device is not None and self.device.type == "cuda":
            out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out
