"""The training loop: one claimed batch, from its newest checkpoint to the end or a stop.

Shape of a step: fetch ``effective_batch`` blocks (micro x accumulation), count their label
tokens, run them in micro-batches with ``loss = sum / label_tokens_in_step`` (so the gradient
does not depend on how the step is split: the memory back-off keeps the same optimizer step),
clip, step, ``gc.collect()``. Stops are checked between micro-batches; a stop mid-step discards
the partial gradient and checkpoints the state at the step's start (parameters, optimizer and
scheduler are untouched until ``optimizer.step``; the RNG state and cursor are remembered), so
a stop never waits for a long step, let alone an epoch.

Under torchrun (dist.py): rank 0 splits and scans the file while the others wait for its
split.json and scan.json; then every rank reads the same stream and trains its share of each
step; every stop and checkpoint decision goes through ``Stopper.agree`` (one all-reduce per
step), and only rank 0 writes checkpoints (with every rank's RNG), progress, the evaluation and
the adapter. The other ranks end when training ends (``rank_done``); rank 0 evaluates alone.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from trainerd.core import faults
from trainerd.core.settings import Settings
from trainerd.core.contract import BatchFiles, ExitCode, Outcome, RootLayout, StopReason
from trainerd.core.fsutil import free_bytes
from trainerd.worker import checkpoint as ckpt
from trainerd.worker import dist
from trainerd.worker import heartbeat
from trainerd.worker import weights as wt
from trainerd.worker import model as mdl
from trainerd.worker.checkpoint import DiskFull
from trainerd.worker.evaluate import EarlyStopping
from trainerd.core.lines import ScanReport
from trainerd.worker.data import BlockStream, Cursor, DataError, Encoder
from trainerd.worker.model import ConfigProblem
from trainerd.worker import tally
from trainerd.worker.progress import Progress
from trainerd.worker.saver import Saver
from trainerd.worker.tally import Tally
from trainerd.worker.firstpass import first_pass, wait_for_lead
from trainerd.worker.step import Stepper
from trainerd.worker.stopper import DEBOUNCE_S, Stopper, StopRequested
from trainerd.worker.traineval import TrainEval
from trainerd.worker.trainout import RunEnd, TrainOutput

__all__ = ["ConfigProblem", "RunEnd", "Trainer"]


def set_oom_score_adj(value: int = 1000) -> None:
    """If the kernel must kill, it kills us, never the supervisor."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError:
        pass


class Trainer(TrainEval, TrainOutput):
    """Trains one batch folder (its data.jsonl and settings) to the end or to a stop. Here: set-up, the
    loop, resume; its evaluations in traineval.py, its checkpoints, adapter and result in trainout.py."""

    def __init__(self, batch_dir: Path, settings: Settings, *, init_adapter: Path | None,
                 publish: Path | None, log: Any, mtbf_s: float | None = None):
        self.batch_dir = batch_dir
        self.s = settings
        self.init_adapter = init_adapter
        self.publish = publish
        self.log = log
        self.files = BatchFiles(batch_dir)
        self.ranks = dist.Ranks.from_env()
        self.stopper = Stopper(self.files.stop, RootLayout(settings.root).stop,
                               debounce_s=DEBOUNCE_S if self.ranks.on else 0.0)
        self.progress = Progress(self.files, log, writes=self.ranks.lead, world_size=self.ranks.world)
        self.tally = Tally(self.files.tally, writes=self.ranks.lead)
        self.mtbf_s = mtbf_s
        self.saver: Saver | None = None  # set once training starts
        self.started = time.monotonic()
        self.result: dict[str, Any] = {
            "micro_batch_size": settings.train.micro_batch_size,
            "grad_accum_steps": settings.train.grad_accum_steps,
        }
        self.loaded: mdl.Loaded | None = None
        self.numerics_changes: list[dict[str, Any]] = []
        self.stepper: Stepper | None = None  # set once training starts
        self.eff = 0
        self.step = 0
        self.total_steps = 0
        self.tokens = 0
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.early = EarlyStopping(settings.eval.every_steps, settings.eval.early_stopping_patience)
        self.training_done = False
        self._new_set: list | None = None  # the new set's examples, for evaluations during training

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
        finally:
            dist.close()

    def _run(self) -> RunEnd:
        set_oom_score_adj(1000)
        self.stopper.install()
        if not self.files.data.is_file():
            raise DataError(f"data file missing: {self.files.data}")
        # The precision first: the base is loaded in the dtype its layout keeps (weights.py).
        device = mdl.pick_device(self.s)
        self._resume = ckpt.complete(self.files.checkpoints)
        self._state = ckpt.load_state(self._resume[0]) if self._resume else None
        self.precision = mdl.batch_precision(self.files, self.s, device, self._state, record=self.ranks.lead,
                                             log=self.log)
        heartbeat.phase("load")  # from_pretrained has no loop of ours: the watchdog allows it longer
        self.loaded = mdl.load(self.s, self.log, precision=self.precision, device=device)
        self.numerics_changes = wt.numerics_changes(self._state, self.loaded.weights, self.precision.name, self.log)
        tally.phase_done("load")
        self.stopper.device = self.device
        encoder = Encoder(self.loaded.tokenizer)
        heartbeat.phase("scan")
        if not self.ranks.lead and not wait_for_lead(self.files, self.s.train.seq_len, self.stopper, self.log):
            return self._stopped_before_training()
        self.split, self.source, sc = first_pass(self.files, self.s, encoder, self.stopper, self.log)
        if sc is None:
            return self._stopped_before_training()
        tally.phase_done("first_pass")
        self.encoder = encoder
        cursor = self._prepare(sc)
        self._join_ranks()
        # Everything allocated so far lives for the whole run: move it out of the collector's
        # sight so the per-step gc.collect() is ~1 ms instead of ~270 ms (FACTS.md).
        gc.collect()
        gc.freeze()
        t = self.s.train
        stream = iter(BlockStream(self.source, encoder, seq_len=t.seq_len,
                                  max_line_bytes=self.s.data.max_line_bytes, chunk_lines=self.s.data.chunk_lines,
                                  pad_id=self.loaded.tokenizer.pad_token_id, blocks_per_epoch=sc.blocks_per_epoch,
                                  epochs=t.epochs, cursor=cursor))
        heartbeat.phase("train")
        tally.phase_done("prepare")
        self.tally.begin(self.step, mtbf_s=self.mtbf_s)
        self.saver = Saver.for_attempt(self.files.checkpoints, t, params=self.stepper.params, distributed=self.ranks.on,
                                       mtbf_s=self.mtbf_s, resumed_cost_s=self._resumed_cost_s, tally=self.tally,
                                       progress=self.progress, result=self.result, batch_dir=self.batch_dir,
                                       log=self.log)
        self.stepper.before_update = self.saver.before_update
        stopped = self._loop(stream, cursor, sc.blocks_per_epoch * t.epochs)
        if stopped is not None:
            return stopped
        if not self.ranks.lead:
            # Its share of training is done and in rank 0's checkpoint: rank 0 evaluates and
            # publishes alone (a stop from here on is rank 0's, the resume only evaluates).
            self.log.info("rank_done", rank=self.ranks.rank, step=self.step)
            return RunEnd(Outcome.DONE, "rank_done", ExitCode.OK)
        heartbeat.phase("evaluate")
        try:
            self._evaluate(sc.tokens * t.epochs)
        except StopRequested as stop:
            return self._stopped(stop.reason)  # the final checkpoint stands: the resume only evaluates
        heartbeat.phase("publish")
        written = self._write_final_adapter()
        self._report(self.last_loss, log_step=False)
        return RunEnd(Outcome.DONE, "finished", ExitCode.OK, {"adapter": str(written)})

    def _join_ranks(self) -> None:
        """Under torchrun: the process group, rank 0's starting weights on every rank, and each
        rank's own RNG stream (dropout differs between ranks as between micro-batches)."""
        if not self.ranks.on:
            return
        t = self.s.train
        try:
            backend = dist.backend_for(t.dist_backend, self.device)
        except ValueError as e:
            raise ConfigProblem(str(e)) from None
        t0 = time.monotonic()
        dist.init(self.ranks, backend, t.dist_timeout_s, self.device)
        dist.same_start(self.stepper.params)
        self.log.info("ranks_joined", rank=self.ranks.rank, world_size=self.ranks.world, backend=backend,
                      device=str(self.device), share_per_step=-(-self.eff // self.ranks.world),
                      join_s=round(time.monotonic() - t0, 2))
        self.result.update(world_size=self.ranks.world, dist_backend=backend)

    def _prepare(self, sc: ScanReport) -> Cursor:
        """Model, optimizer and cursor: from the newest complete checkpoint, or fresh."""
        split = self.split
        self.result.update(lines_good=sc.good, lines_bad=sc.bad, errors=sc.errors,
                           replay={"lines": split.replay_lines, "tokens": sc.replay_tokens,
                                   "from_batches": (split.replay or {}).get("sources", {})})
        t = self.s.train
        eff = t.micro_batch_size * t.grad_accum_steps
        resume, state = self._resume, self._state
        if state is not None:
            eff = state["effective_batch"]
        self.total_steps = max(1, -(-sc.blocks_per_epoch * t.epochs // eff))
        self.model = mdl.build_peft(self.loaded, self.s, resume[0] if resume else self.init_adapter,
                                    self.precision, self.log)
        self.optimizer, self.scheduler = mdl.make_optimizer(self.model, self.s, self.total_steps)
        self.eff = eff
        self.stepper = Stepper(self.model, self.optimizer, self.scheduler, self.loaded, self.stopper,
                               self.progress, self.log, micro=min(t.micro_batch_size, eff),
                               max_grad_norm=t.max_grad_norm, precision=self.precision, ranks=self.ranks)
        cursor = Cursor()
        self._resumed_cost_s = None
        if state is not None:
            self._restore(resume[0], state)
            self._resumed_cost_s = state.get("checkpoint_cost_s")
            cursor = Cursor(**state["cursor"])
        else:
            torch.manual_seed(t.seed + self.ranks.rank)
        self.result.update(total_steps=self.total_steps, effective_batch=eff, precision=self.precision.name,
                           base_weights=self.loaded.weights, numerics_changes=self.numerics_changes)
        for key in ("micro_batch_size", "grad_accum_steps"):  # summary() reports the live split now
            self.result.pop(key, None)
        self.log.info("training_started", resumed_from=str(resume[0].name) if resume else None,
                      init_adapter=str(self.init_adapter) if (self.init_adapter and not resume) else None,
                      step=self.step, total_steps=self.total_steps, micro_batch_size=self.micro,
                      effective_batch=eff, seq_len=t.seq_len, precision=self.precision.name,
                      cursor=cursor.as_dict())
        return cursor

    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(ckpt.load_tensors(path, "optimizer.pt"))
        self.scheduler.load_state_dict(ckpt.load_tensors(path, "scheduler.pt"))
        dist.restore_rng(self.ranks, ckpt.load_tensors(path, "rng.pt"), self.s.train.seed + 7919 * state["step"],
                         self.log)
        self.step = state["step"]
        self.tokens = state["tokens"]
        self.first_loss = state.get("first_loss")
        self.last_loss = state.get("last_loss")
        self.early = EarlyStopping(self.s.eval.every_steps, self.s.eval.early_stopping_patience, state.get("early"))
        self.training_done = bool(state.get("training_done"))
        if state.get("total_steps") != self.total_steps:
            self.log.warning("checkpoint_schedule_differs", checkpoint_total=state.get("total_steps"),
                             now_total=self.total_steps)

    def _loop(self, stream: Iterator[Any], cursor: Cursor, total_blocks: int) -> RunEnd | None:
        """Train to the end (or to early stopping); a RunEnd when a stop came first."""
        try:
            while self.step < self.total_steps and not self.training_done:
                step_cursor, step_rng = cursor, ckpt.rng_state()
                blocks = []
                for _ in range(min(self.eff, total_blocks - self.step * self.eff)):
                    ids, labels, mask, cursor = next(stream)
                    blocks.append((ids, labels, mask))
                in_steps = self.progress.seconds
                try:
                    loss = self.stepper.step(blocks, step_rng, self.step + 1)
                except StopRequested as stop:
                    self._checkpoint(step_cursor, step_rng)
                    return self._stopped(stop.reason)
                self.step += 1
                self.tokens += self.stepper.last_tokens
                step_s = self.progress.seconds - in_steps
                self.tally.stepped(self.step, step_s)
                self.saver.poll(step_s)  # a background checkpoint's failure surfaces here, and its cost
                faults.at_step(self.step)
                self.last_loss = loss
                if self.first_loss is None:
                    self.first_loss = loss
                self._report(loss)
                try:
                    best = self._watch_new_set()
                except StopRequested as stop:  # one process only: ranks defer it to agree()
                    self._checkpoint(cursor, ckpt.rng_state())
                    return self._stopped(stop.reason)
                # One collective for both: every rank checkpoints, and stops, at the same step. Rank
                # 0's clock decides (it writes, so only it measures and restarts the interval).
                due = self.ranks.lead and self.saver.clock.due(self.step, time.monotonic())
                reason, (due,) = self.stopper.agree(best or due)
                stop_now = reason is not None and self.step < self.total_steps and not self.early.stopped
                if due or stop_now:
                    # the best step's weights are kept; a stop's checkpoint is on disk before the exit
                    self._checkpoint(cursor, ckpt.rng_state(), now=bool(stop_now))
                if self.early.stopped:
                    break
                if stop_now:
                    return self._stopped(reason)
        except StopIteration:
            raise DataError("data file changed while training: it ended before the counted blocks")
        self.saver.drain()  # the best step's checkpoint may still be on its way to the disk
        if not self.training_done:
            if self.early.stopped and self.early.best_step != self.step:
                self._restore_best()
            # The final state is checkpointed before the evaluation and the adapter: a stop or a
            # crash after this point resumes here and only evaluates and writes again.
            self.training_done = True
            self._checkpoint(cursor, ckpt.rng_state(), now=True)
        return None

