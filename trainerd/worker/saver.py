"""When the step loop checkpoints, and how: in the loop, or in a background thread from a copy.

:class:`Clock` says when a periodic checkpoint is due: every ``train.checkpoint_every_steps``
optimizer steps (0: never by count) and every interval of training time: a fixed
``train.checkpoint_every_s``, or with ``auto`` the Young/Daly interval from this attempt's own
measured checkpoint cost and the supervisor's MTBF estimate (``--mtbf-s``; trainerd/core/cadence.py),
recomputed after every checkpoint. The interval counts from the moment the last checkpoint's
state was taken (what a fault would fall back to), and from the start of training after a resume.

:class:`Saver` writes them (worker/checkpoint.py: tmp folder, fsync, rename; the newest complete
one wins). A large state (``train.checkpoint_async``: auto = adapter + optimizer >= 64 MiB, as
for an 8B model with r=16 on every linear layer: ~0.5 GB) is written by one background thread: it
copies the state while the next step's forward and backward run (they only read it; the loop waits
before the optimizer step until the copy is complete), then writes the copy while training goes on.
Its cost to the loop, which the clock's interval follows, is what the steps beside it took beyond
the median step before it (the wait for the copy, and the CPU and memory bandwidth the copy and the
write take from training: on a CPU that is most of a write's cost, on a GPU little). At most
one write is in flight: a checkpoint due while the previous one is still being written waits for
it (and the clock's floor, twice the last write time, keeps that rare). Stops and the final
checkpoint wait for the write in flight, then write in the loop. A background failure is raised
in the step loop at its next poll (a full disk: DiskFull, exit 75, as in the loop). Under torchrun
checkpoints stay in the loop: every rank must learn at once whether rank 0's write succeeded.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from trainerd.core import cadence
from trainerd.worker import checkpoint as ckpt
from trainerd.worker import heartbeat
from trainerd.worker.checkpoint import DiskFull

__all__ = ["ASYNC_MIN_BYTES", "Clock", "Saver"]

ASYNC_MIN_BYTES = 64 << 20


class Clock:
    """Whether a periodic checkpoint is due after a step; the interval it keeps (seconds)."""

    def __init__(self, train: Any, mtbf_s: float | None, cost_s: float | None, log: Any, now: float):
        self.every_steps = train.checkpoint_every_steps
        self.fixed = None if train.checkpoint_every_s == "auto" else float(train.checkpoint_every_s)
        self.mtbf_s = mtbf_s if mtbf_s and mtbf_s > 0 else cadence.PRIOR_MTBF_S
        self.cost_s = cost_s if cost_s and cost_s > 0 else cadence.PRIOR_COST_S
        self.measured = False
        self.write_s = 0.0
        self.log = log
        self.last = now
        self.interval_s, self.rule = 0.0, ""
        self._recompute(announce=True)

    def due(self, step: int, now: float) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        return self.interval_s > 0 and now - self.last >= self.interval_s

    def taken(self, now: float) -> None:
        """A checkpoint's state was taken now (the interval counts from here)."""
        self.last = now

    def measured_cost(self, stall_s: float, write_s: float) -> None:
        """What the last checkpoint cost the loop (``stall_s``) and took to reach the disk."""
        # A running mean that forgets: a loaded disk shows up within a few checkpoints.
        self.cost_s = stall_s if not self.measured else 0.5 * self.cost_s + 0.5 * stall_s
        self.measured = True
        self.write_s = write_s
        self._recompute(announce=False)

    def _recompute(self, *, announce: bool) -> None:
        if self.fixed is not None:
            new, rule = self.fixed, "fixed"
        else:
            new, rule = cadence.checkpoint_interval_s(self.cost_s, self.mtbf_s, write_s=self.write_s)
        old = self.interval_s
        self.interval_s, self.rule = new, rule
        if announce or (old and abs(new - old) > 0.25 * old) or (not old and new):
            self.log.info("checkpoint_interval", interval_s=round(new, 2), rule=rule, every_steps=self.every_steps,
                          cost_s=round(self.cost_s, 4), cost_measured=self.measured, write_s=round(self.write_s, 4),
                          mtbf_s=round(self.mtbf_s, 1),
                          young_daly_s=round(cadence.young_daly_s(self.cost_s, self.mtbf_s), 2))


class Saver:
    """Takes and writes the checkpoints of one attempt (rank 0 under torchrun)."""

    def __init__(self, root: Path, *, keep: int, background: bool, clock: Clock, tally: Any, progress: Any,
                 result: dict[str, Any], batch_dir: Path, log: Any):
        self.root, self.keep, self.background = root, keep, background
        self.clock, self.tally, self.progress, self.result = clock, tally, progress, result
        self.batch_dir, self.log = batch_dir, log
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._copied: threading.Event | None = None  # set once the background write has its copy
        self._stall = 0.0                             # what the checkpoint in flight cost the loop so far
        self._baseline: float | None = None           # the loop's median step before it began
        self._written: float | None = None            # its write time, once it is on disk
        # The last copy: once it is on disk its buffers take the next one (so a second copy of the
        # state stays allocated while the Saver writes in the background, as torch's own async
        # checkpointing stages it).
        self._staging: ckpt.Snapshot | None = None

    @classmethod
    def for_attempt(cls, root: Path, train: Any, *, params: list[Any], distributed: bool, mtbf_s: float | None,
                    resumed_cost_s: float | None, tally: Any, progress: Any, result: dict[str, Any],
                    batch_dir: Path, log: Any) -> "Saver":
        """The clock and the writer of one attempt (``params``: the trainable ones; AdamW keeps two
        more of each, so the state is about three times their bytes)."""
        clock = Clock(train, mtbf_s, resumed_cost_s, log, time.monotonic())
        tally.update(interval_s=round(clock.interval_s, 2), interval_rule=clock.rule)
        setting, state_bytes = train.checkpoint_async, 3 * ckpt.state_bytes(params)
        background = not distributed and setting is not False and (setting is True or state_bytes >= ASYNC_MIN_BYTES)
        return cls(root, keep=train.keep_checkpoints, background=background, clock=clock, tally=tally,
                   progress=progress, result=result, batch_dir=batch_dir, log=log)

    def save(self, step: int, *, model: Any, optimizer: Any, scheduler: Any, rng: dict[str, Any],
             state: dict[str, Any], protect: int | None, now: bool = False) -> None:
        """Checkpoint ``step``. ``now``: finished on disk before this returns (a stop, the final
        one); otherwise in the background when the Saver writes in the background."""
        t0 = time.monotonic()
        self.drain()  # one write at a time, in step order: the newest complete one wins
        heartbeat.beat()
        state = {**state, "checkpoint_cost_s": round(self.clock.cost_s, 4)}
        # The live tensors: a background write copies them before the next optimizer step changes them.
        snap = ckpt.snapshot(step, model=model, optimizer=optimizer, scheduler=scheduler, rng=rng, state=state,
                             copy_tensors=False)
        self.clock.taken(time.monotonic())
        if not (self.background and not now):
            self._write(snap, protect, t0)
            self._finished(time.monotonic() - t0, self._written or 0.0)
            return
        self._stall, self._written, self._copied = time.monotonic() - t0, None, threading.Event()
        self._baseline = self.progress.median_step_s
        self._thread = threading.Thread(target=self._copy_and_write, args=(snap, protect, t0), name="checkpoint-writer")
        self._thread.start()

    def before_update(self) -> None:
        """Right before ``optimizer.step()``: the copy of the state in flight must be complete before
        the weights and moments change (the forward and backward passes before it only read them,
        so the copy overlaps them)."""
        if self._copied is not None:
            self._copied.wait()

    def poll(self, step_s: float | None = None) -> None:
        """After a step (``step_s``: its seconds) or before a checkpoint: raise what a background write
        failed with; account for one that finished. What a background checkpoint costs the loop is
        what the steps beside it took beyond the median step before it (the wait for the copy, and
        the copy's and the write's share of CPU and memory bandwidth)."""
        if self._thread is not None and step_s is not None and self._baseline is not None:
            self._stall += max(0.0, step_s - self._baseline)
        if self._thread is not None and not self._thread.is_alive():
            self._thread.join()
            self._thread = None
            if self._error is None:
                self._finished(self._stall, self._written or 0.0)
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def drain(self) -> None:
        """Wait for the write in flight (if any) to end (the wait is its cost too), then poll."""
        if self._thread is not None:
            t = time.monotonic()
            self._thread.join()
            self._stall += time.monotonic() - t
        self.poll()

    def _copy_and_write(self, live: ckpt.Snapshot, protect: int | None, t0: float) -> None:
        """The background writer: copy (into the last copy's buffers), let the loop go on, write."""
        try:
            snap = ckpt.stage(live, self._staging)
        except BaseException as e:  # noqa: BLE001 - raised in the step loop at its next poll
            self._error = e
            return
        finally:
            self._copied.set()
        self._staging = snap
        try:
            self._write(snap, protect, t0)
        except BaseException as e:  # noqa: BLE001 - raised in the step loop at its next poll
            self._error = e

    def _write(self, snap: ckpt.Snapshot, protect: int | None, t0: float) -> None:
        try:
            path = ckpt.write(self.root, snap, keep=self.keep, protect=protect)
        except Exception as e:
            if ckpt.disk_full(e, self.root, ckpt.newest_bytes(self.root)):
                raise DiskFull(f"cannot write checkpoint step-{snap.step:08d}: {e}") from e
            raise
        self._written = write_s = time.monotonic() - t0
        self.tally.checkpointed(snap.step, write_s)
        self.progress.checkpointed(snap.step, write_s)
        self.result["checkpoint"] = str(path.relative_to(self.batch_dir))
        self.log.info("checkpoint_saved", step=snap.step, path=path.name, save_s=round(write_s, 3),
                      background=snap.copied, bytes=snap.nbytes, cursor=snap.state.get("cursor"))

    def _finished(self, stall_s: float, write_s: float) -> None:
        """In the step loop, once a checkpoint is on disk: its cost to the loop, and the next interval."""
        self.clock.measured_cost(stall_s, write_s)
        self.tally.stalled(stall_s, interval_s=round(self.clock.interval_s, 2), interval_rule=self.clock.rule)
