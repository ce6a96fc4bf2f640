"""The training loop: one claimed batch, from its newest checkpoint to the end or a stop.

Shape of a step: fetch ``effective_batch`` blocks (micro x accumulation), count their label
tokens, run them in micro-batches with ``loss = sum / label_tokens_in_step`` (so the gradient
does not depend on how the step is split: the memory back-off keeps the same optimizer step),
clip, step, ``gc.collect()``. Stops are checked between micro-batches; a stop mid-step discards
the partial gradient and checkpoints the state at the step's start (parameters, optimizer and
scheduler are untouched until ``optimizer.step``; the RNG state and cursor are remembered), so
a stop never waits for a long step, let alone an epoch.

Distributed later: every stop decision goes through ``Stopper.agree`` (an all-reduce when
torch.distributed is initialised) and only rank 0 writes checkpoints and the published adapter.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from trainerd import faults
from trainerd.config import Settings
from trainerd.contract import BatchFiles, ExitCode, Outcome, RootLayout, StopReason
from trainerd.fsutil import atomic_write_json, free_bytes, publish_dir, read_json
from trainerd.worker import checkpoint as ckpt
from trainerd.worker import model as mdl
from trainerd.worker.checkpoint import DiskFull
from trainerd.lines import ScanReport
from trainerd.worker.data import BlockStream, Cursor, DataError, Encoder, Interrupted, scan
from trainerd.worker.model import ConfigProblem
from trainerd.worker.progress import Progress, peak_rss_bytes
from trainerd.worker.step import Stepper
from trainerd.worker.stopper import Stopper, StopRequested

__all__ = ["ConfigProblem", "RunEnd", "Trainer"]


def set_oom_score_adj(value: int = 1000) -> None:
    """If the kernel must kill, it kills us, never the supervisor."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError:
        pass


@dataclass
class RunEnd:
    """How Trainer.run ended: result.json's status and reason, the exit code, extra fields."""

    status: Outcome
    reason: str
    exit_code: ExitCode
    extra: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Trains one batch folder (its data.jsonl and settings) to the end or to a stop."""

    def __init__(self, batch_dir: Path, settings: Settings, *, init_adapter: Path | None,
                 publish: Path | None, log: Any):
        self.batch_dir = batch_dir
        self.s = settings
        self.init_adapter = init_adapter
        self.publish = publish
        self.log = log
        self.files = BatchFiles(batch_dir)
        self.stopper = Stopper(self.files.stop, RootLayout(settings.root).stop)
        self.progress = Progress(self.files, log)
        self.rank = int(os.environ.get("RANK", "0"))
        self.started = time.monotonic()
        self.result: dict[str, Any] = {
            "micro_batch_size": settings.train.micro_batch_size,
            "grad_accum_steps": settings.train.grad_accum_steps,
        }
        self.loaded: mdl.Loaded | None = None
        self.stepper: Stepper | None = None  # set once training starts
        self.eff = 0
        self.step = 0
        self.total_steps = 0
        self.tokens = 0
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self._last_ckpt_step = -1
        self._last_ckpt_time = time.monotonic()

    @property
    def device(self) -> torch.device | None:
        return self.loaded.device if self.loaded else None

    @property
    def micro(self) -> int:
        """The live micro-batch size (a CUDA OOM back-off may have halved it); 0 before training."""
        return self.stepper.micro if self.stepper else 0

    # -- the run -------------------------------------------------------------------------

    def run(self) -> RunEnd:
        try:
            return self._run()
        except (DiskFull, OSError) as e:
            if isinstance(e, OSError) and not ckpt.no_space(e):
                raise
            # The previous checkpoint and adapter are intact (writes are tmp + rename and a
            # torn temporary is removed); the supervisor waits for space and resumes us.
            free = free_bytes(self.batch_dir)
            self.log.error("disk_full", error=str(e), free_bytes=free, step=self.step,
                           checkpoint=self.result.get("checkpoint"),
                           action="stopping; resumes from the newest complete checkpoint once space is back")
            return RunEnd(Outcome.STOPPED, StopReason.DISK_FULL, ExitCode.TEMPFAIL, {"free_bytes": free})

    def _run(self) -> RunEnd:
        set_oom_score_adj(1000)
        self.stopper.install()
        if not self.files.data.is_file():
            raise DataError(f"data file missing: {self.files.data}")
        self.loaded = mdl.load(self.s, self.log)
        encoder = Encoder(self.loaded.tokenizer)
        sc = self._first_pass(encoder)
        if sc is None:
            return self._stopped_before_training()
        cursor = self._prepare(sc)
        # Everything allocated so far lives for the whole run: move it out of the collector's
        # sight so the per-step gc.collect() is ~1 ms instead of ~270 ms (FACTS.md).
        gc.collect()
        gc.freeze()
        t = self.s.train
        stream = iter(BlockStream(self.files.data, encoder, seq_len=t.seq_len,
                                  max_line_bytes=self.s.data.max_line_bytes, chunk_lines=self.s.data.chunk_lines,
                                  pad_id=self.loaded.tokenizer.pad_token_id, blocks_per_epoch=sc.blocks_per_epoch,
                                  epochs=t.epochs, cursor=cursor))
        return self._loop(stream, cursor, sc.blocks_per_epoch * t.epochs)

    def _first_pass(self, encoder: Encoder) -> ScanReport | None:
        """Validate, count and tokenize the file once (reused on resume while it is unchanged);
        None when a stop came first."""
        sc = self._cached_scan()
        if sc is None:
            d, t0 = self.s.data, time.monotonic()
            try:
                sc = scan(self.files.data, encoder, seq_len=self.s.train.seq_len, max_line_bytes=d.max_line_bytes,
                          chunk_lines=d.chunk_lines, max_bad_fraction=d.max_bad_fraction,
                          errors_path=self.files.errors, max_errors=d.max_errors_reported,
                          should_stop=lambda: self.stopper.check() is not None)
            except Interrupted:
                return None
            atomic_write_json(self.files.scan, sc.as_cache())
            self.log.info("data_scanned", lines=sc.lines, good=sc.good, bad=sc.bad, blank=sc.blank,
                          tokens=sc.tokens, blocks_per_epoch=sc.blocks_per_epoch,
                          scan_s=round(time.monotonic() - t0, 2))
        self.result.update(lines_good=sc.good, lines_bad=sc.bad, errors=sc.errors)
        return sc

    def _cached_scan(self) -> ScanReport | None:
        try:
            d = read_json(self.files.scan)
        except (OSError, ValueError):
            return None
        st = os.stat(self.files.data)
        if d.get("size") != st.st_size or d.get("mtime_ns") != st.st_mtime_ns or d.get("seq_len") != self.s.train.seq_len:
            if ckpt.complete(self.files.checkpoints):
                raise DataError("data file changed since it was scanned: size or mtime differ; "
                                "its checkpoints no longer match it")
            return None
        return ScanReport.from_cache(str(self.files.data), d)

    def _prepare(self, sc: ScanReport) -> Cursor:
        """Model, optimizer and cursor: from the newest complete checkpoint, or fresh."""
        t = self.s.train
        eff = t.micro_batch_size * t.grad_accum_steps
        resume = ckpt.complete(self.files.checkpoints)
        state = ckpt.load_state(resume[0]) if resume else None
        if state is not None:
            eff = state["effective_batch"]
        self.total_steps = max(1, -(-sc.blocks_per_epoch * t.epochs // eff))
        self.precision = self._precision(state)
        self.model = mdl.build_peft(self.loaded, self.s, resume[0] if resume else self.init_adapter,
                                    self.precision, self.log)
        self.optimizer, self.scheduler = mdl.make_optimizer(self.model, self.s, self.total_steps)
        self.eff = eff
        self.stepper = Stepper(self.model, self.optimizer, self.scheduler, self.loaded, self.stopper,
                               self.progress, self.log, micro=min(t.micro_batch_size, eff),
                               max_grad_norm=t.max_grad_norm, precision=self.precision)
        cursor = Cursor()
        if state is not None:
            self._restore(resume[0], state)
            self._last_ckpt_step = self.step
            cursor = Cursor(**state["cursor"])
        else:
            torch.manual_seed(t.seed)
        self.result.update(total_steps=self.total_steps, effective_batch=eff, precision=self.precision.name)
        for key in ("micro_batch_size", "grad_accum_steps"):  # summary() reports the live split now
            self.result.pop(key, None)
        self.log.info("training_started", resumed_from=str(resume[0].name) if resume else None,
                      init_adapter=str(self.init_adapter) if (self.init_adapter and not resume) else None,
                      step=self.step, total_steps=self.total_steps, micro_batch_size=self.micro,
                      effective_batch=eff, seq_len=t.seq_len, precision=self.precision.name,
                      cursor=cursor.as_dict())
        return cursor

    def _precision(self, state: dict[str, Any] | None) -> mdl.Precision:
        """The batch's precision: its checkpoint's, else its precision.json's, else resolved now
        from the settings and this machine, and then recorded in precision.json (before the
        first step, so that even a batch stopped before its first checkpoint keeps it)."""
        kept, kept_from = None, ""
        if state is not None:
            # Checkpoints from before precision was recorded: the old rule was bf16 on CUDA or
            # when bfloat16 was forced, fp32 otherwise.
            legacy = mdl.BFLOAT16 if (self.device.type == "cuda" or self.s.model.dtype == mdl.BFLOAT16) else mdl.FLOAT32
            kept = state.get("precision") or legacy
            kept_from = "checkpoint"
        else:
            try:
                kept, kept_from = read_json(self.files.precision)["precision"], "batch"
            except (OSError, ValueError, KeyError, TypeError):
                pass
        precision = mdl.resolve_precision(self.s, self.device, kept, kept_from, self.log)
        if kept_from != "batch" and self.rank == 0:
            atomic_write_json(self.files.precision, {
                "precision": precision.name, "source": precision.source, "settings_dtype": self.s.model.dtype,
                "device": str(self.device), "decided_at": time.time()})
        return precision

    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(ckpt.load_tensors(path, "optimizer.pt"))
        self.scheduler.load_state_dict(ckpt.load_tensors(path, "scheduler.pt"))
        ckpt.set_rng_state(ckpt.load_tensors(path, "rng.pt"))
        self.step = state["step"]
        self.tokens = state["tokens"]
        self.first_loss = state.get("first_loss")
        self.last_loss = state.get("last_loss")
        if state.get("total_steps") != self.total_steps:
            self.log.warning("checkpoint_schedule_differs", checkpoint_total=state.get("total_steps"),
                             now_total=self.total_steps)

    def _loop(self, stream: Iterator[Any], cursor: Cursor, total_blocks: int) -> RunEnd:
        try:
            while self.step < self.total_steps:
                step_cursor, step_rng = cursor, ckpt.rng_state()
                blocks = []
                for _ in range(min(self.eff, total_blocks - self.step * self.eff)):
                    ids, labels, mask, cursor = next(stream)
                    blocks.append((ids, labels, mask))
                try:
                    loss = self.stepper.step(blocks, step_rng, self.step + 1)
                except StopRequested as stop:
                    self._checkpoint(step_cursor, step_rng)
                    return self._stopped(stop.reason)
                self.step += 1
                self.tokens += self.stepper.last_tokens
                if faults.number("crash_at_step") == self.step:
                    faults.die_at("crash_at_step")
                self.last_loss = loss
                if self.first_loss is None:
                    self.first_loss = loss
                self._report(loss)
                if self._checkpoint_due():
                    self._checkpoint(cursor, ckpt.rng_state())
                reason = self.stopper.agree()
                if reason and self.step < self.total_steps:
                    self._checkpoint(cursor, ckpt.rng_state())
                    return self._stopped(reason)
        except StopIteration:
            raise DataError("data file changed while training: it ended before the counted blocks")
        # The final state is checkpointed before the adapter is written: a crash while writing
        # it resumes here and only writes it again.
        if self._last_ckpt_step != self.step:
            self._checkpoint(cursor, ckpt.rng_state())
        written = self._write_final_adapter()
        self._report(self.last_loss, log_step=False)
        return RunEnd(Outcome.DONE, "finished", ExitCode.OK, {"adapter": str(written)})

    # -- checkpoints, the adapter, progress, result ---------------------------------------

    def _checkpoint_due(self) -> bool:
        every = self.s.train.checkpoint_every_steps
        if every and self.step % every == 0:
            return True
        secs = self.s.train.checkpoint_every_s
        return bool(secs) and time.monotonic() - self._last_ckpt_time >= secs

    def _checkpoint(self, cursor: Cursor, rng: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        t0 = time.monotonic()
        state = {"tokens": self.tokens, "cursor": cursor.as_dict(), "total_steps": self.total_steps,
                 "effective_batch": self.eff, "micro_batch_size": self.micro, "precision": self.precision.name,
                 "first_loss": self.first_loss, "last_loss": self.last_loss}
        root = self.files.checkpoints
        try:
            path = ckpt.save(root, self.step, model=self.model, optimizer=self.optimizer,
                             scheduler=self.scheduler, rng=rng, state=state, keep=self.s.train.keep_checkpoints)
        except Exception as e:
            if ckpt.disk_full(e, root, ckpt.newest_bytes(root)):
                raise DiskFull(f"cannot write checkpoint step-{self.step:08d}: {e}") from e
            raise
        self._last_ckpt_time = time.monotonic()
        self._last_ckpt_step = self.step
        self.result["checkpoint"] = str(path.relative_to(self.batch_dir))
        self.log.info("checkpoint_saved", step=self.step, path=path.name,
                      save_s=round(time.monotonic() - t0, 3), cursor=cursor.as_dict())

    def _write_final_adapter(self) -> Path:
        """The batch's adapter, complete before it appears at ``--publish`` (or final_adapter/)."""
        if self.rank != 0:
            return Path()
        dest = self.publish or self.files.final_adapter
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        # Half adapters of earlier attempts that died mid-write (SIGKILL, power loss): never
        # visible (they were never renamed), but they hold space; only this worker writes here.
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            self.model.save_pretrained(str(tmp), safe_serialization=True)
            atomic_write_json(tmp / "trainerd.json", {
                "base_model": self.s.model.path,
                "init_adapter": str(self.init_adapter) if self.init_adapter else None,
                "batch": self.batch_dir.name, "steps": self.step, "tokens": self.tokens,
                "first_loss": self.first_loss, "last_loss": self.last_loss, "seed": self.s.train.seed,
                "precision": self.precision.name,
            })
            faults.die_at("crash_in_publish")
            publish_dir(tmp, dest, replace=True)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave half an adapter holding the space
            if ckpt.disk_full(e, dest.parent, ckpt.newest_bytes(self.files.checkpoints) // 2):
                raise DiskFull(f"cannot write the adapter to {dest}: {e}") from e
            raise
        self.log.info("adapter_written", path=str(dest), steps=self.step)
        return dest

    def _report(self, loss: float | None, log_step: bool = True) -> None:
        self.progress.report(step=self.step, total_steps=self.total_steps, loss=loss,
                             lr=self.scheduler.get_last_lr()[0], tokens=self.tokens,
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
        if self.device is not None and self.device.type == "cuda":
            out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out
