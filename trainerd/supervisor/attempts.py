"""A batch's way through the supervisor: claim -> start -> settle.

The only caller of the ledger's transitions. Each step records its intent in the ledger
before it touches the folders, so reconcile can finish any step a crash interrupted:

    claim   inbox/<name> --rename--> batches/<id>/data.jsonl, hashed  (CLAIMING -> QUEUED | SKIPPED | FAILED;
            the steps are claims.py's, a burst goes through claimpool.py)
    start   plan the memory, write settings.json, spawn the worker     (QUEUED -> RUNNING)
    settle  the exit policy's verdict, carried out                     (RUNNING -> DONE | QUEUED | FAILED);
            settle.py
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

from trainerd.core import config as config_mod
from trainerd.supervisor.basemodel import Watched
from trainerd.supervisor.child import Child, ExitStatus
from trainerd.core.settings import Settings
from trainerd.core.contract import RootLayout
from trainerd.core.fsutil import read_json_or_none, unlink_quietly
from trainerd.supervisor.ledger import Batch, Ledger
from trainerd.supervisor.ledger.states import BatchState
from trainerd.supervisor import accounting, forensics, heal, memplan, policy
from trainerd.supervisor.claims import Claims
from trainerd.supervisor.filing import Filing
from trainerd.supervisor.leftovers import stop_orphans
from trainerd.supervisor.launch import distributed, launch_argv, launch_env
from trainerd.supervisor.lineage import chain_base, freeze_inputs
from trainerd.supervisor.stall import StallWatch
from trainerd.supervisor.settle import Running, Settle
from trainerd.supervisor.stopping import Escalation

__all__ = ["Attempts", "Running"]


class Attempts(Settle):
    """Claims, starts and settles. ``settings`` and ``guard`` are the daemon's current ones
    (it replaces them on reload)."""

    def __init__(self, layout: RootLayout, ledger: Ledger, filing: Filing, log: Any, *,
                 settings: Settings, guard: Any, worker_cmd: list[str], env: dict[str, str] | None):
        self.layout, self.ledger, self.filing, self.log = layout, ledger, filing, log
        self.settings, self.guard = settings, guard
        self.worker_cmd, self.env = worker_cmd, env
        self.base: Watched | None = None  # the configured base model (the daemon sets it)
        self.claims = Claims(layout, ledger, log, fail=self._fail, end=self.end)

    # --- claim (the steps are claims.py's) -------------------------------------------------

    def complete_claim(self, batch: Batch, now: float) -> Batch | None:
        """CLAIMING -> QUEUED or SKIPPED (or FAILED). Idempotent: reconcile calls it after a crash."""
        return self.claims.complete(batch, now)

    # --- start -----------------------------------------------------------------------

    def start(self, batch: Batch, now: float) -> Running | None:
        """QUEUED -> RUNNING: write the attempt's settings and start the worker."""
        log = self.log.bind(batch=batch.id)
        files = self.layout.batch(batch.id)
        if not files.claimed(batch.name).is_file():
            self._fail(batch, BatchState.QUEUED, f"the claimed data is missing: {files.claimed(batch.name)}", now, log)
            return None
        if not batch.planned:
            # The ladder's fastest rung that fits, from the model's files; or fail now, with the
            # figures, when none ever can (never a worker killed mid-load).
            plan = memplan.plan_batch(files, self.settings, self.guard)
            if plan.never_fits:
                self._fail(batch, BatchState.QUEUED, memplan.never_fits_reason(plan, self.settings.memory.soft), now, log)
                return None
            batch = self.ledger.set_plan(batch.id, plan.micro_batch_size, plan.grad_accum_steps,
                                         plan.gradient_checkpointing, now, memplan.planned_weights(plan, self.settings))
        settings = copy.deepcopy(self.settings)
        settings.train.micro_batch_size = batch.micro_batch_size
        settings.train.grad_accum_steps = batch.grad_accum_steps
        settings.train.gradient_checkpointing = bool(batch.gradient_checkpointing)
        settings.model.base_weights = batch.base_weights or settings.model.base_weights
        config_mod.dump_json(settings, files.settings)
        # Leftovers of the previous attempt would be misread as this one's answer (or account).
        unlink_quietly(files.result)
        unlink_quietly(files.tally)
        unlink_quietly(files.stop)
        shutil.rmtree(files.published, ignore_errors=True)
        heal.prepare(files, batch, self.settings.gate.heal_replay, log)  # a healing try starts from the champion
        batch, init_adapter = self._parent(batch, now)
        batch = self.ledger.start_attempt(batch.id, now, str(init_adapter) if init_adapter else None)  # QUEUED -> RUNNING
        alog = log.bind(attempt=batch.attempts)
        worker_args = [str(files.dir)]
        if init_adapter is not None:
            worker_args += ["--init-adapter", str(init_adapter)]
        worker_args += ["--publish", str(files.published)]
        rate = accounting.fault_rate(self.ledger, now)  # train.checkpoint_every_s: auto follows it
        worker_args += ["--mtbf-s", f"{rate.mtbf_s:.0f}"]
        argv = launch_argv(settings, self.worker_cmd, worker_args)
        for stale in files.dir.glob("result.rank*.json"):
            stale.unlink(missing_ok=True)
        stop_orphans(self.layout, files, alog)
        oom_kills = forensics.vmstat_oom_kills()
        try:
            child = Child(argv, stderr_path=files.stderr, log=alog, env=launch_env(settings, self.env),
                          cwd=self.layout.root)
        except OSError as e:
            alog.error("worker_start_failed", error=str(e), argv=argv)
            verdict = policy.crash(batch, f"cannot start the worker: {e}", self.settings, now)
            end = policy.AttemptEnd(ExitStatus(None, None))
            self._log_verdict(verdict, batch, end, now, alog, stopping=False, pid=None, oom_kills_before=None)
            self._apply(batch, batch.attempts, verdict, end, now, alog)
            return None
        self.ledger.set_attempt_pid(batch.id, batch.attempts, child.pid, child.create_time)
        if distributed(settings):
            t = settings.train
            alog.info("ranks_started", nproc_per_node=t.nproc_per_node, nnodes=t.nnodes,
                      world_size=t.nproc_per_node * t.nnodes, argv=argv,
                      other_nodes=None if t.nnodes == 1 else "run the same argv on every other node (same config, "
                                                             "the batch folder on a shared file system)")
        alog.info("worker_started", file=batch.name, pid=child.pid,
                  init_adapter=str(init_adapter) if init_adapter else None,
                  init_adapter_version=batch.parent_version,
                  micro_batch_size=settings.train.micro_batch_size,
                  grad_accum_steps=settings.train.grad_accum_steps,
                  gradient_checkpointing=settings.train.gradient_checkpointing,
                  base_weights=settings.model.base_weights,
                  fault_rate=rate.as_dict(), crash_streak=batch.crash_streak, faults_survived=batch.faults_survived)
        unlink_quietly(files.heartbeat)  # the last attempt's sign of life is not this one's
        world = settings.train.nproc_per_node * settings.train.nnodes if distributed(settings) else 1
        return Running(batch, files, child, Escalation(child, files, alog), now, alog, oom_kills,
                       stall=StallWatch(files, now), world=world)

    def _parent(self, batch: Batch, now: float) -> tuple[Batch, Path | None]:
        """The adapter the batch continues and is judged against: the newest version at its first
        start, fixed in parent.json with the sets it will be judged on (a promote or rollback while
        it runs does not change what it was trained from)."""
        files = self.layout.batch(batch.id)
        fixed = read_json_or_none(files.parent)
        if fixed is not None:
            return batch, Path(fixed["path"]) if fixed.get("path") else None
        latest = self.ledger.latest_version()
        _, rebased = chain_base(self.layout, latest)
        # After `trainerd rebase` the next batch starts a new chain: no parent adapter.
        version = None if latest is None or rebased else latest.n
        batch = self.ledger.set_parent(batch.id, version, now)
        parent = self.layout.adapter_dir(version) if version is not None else None
        base = self.base.get() if self.base is not None else None
        freeze_inputs(self.layout, batch, parent, base, self.log.bind(batch=batch.id),
                      rebase=read_json_or_none(self.layout.chain) if rebased and latest is not None else None)
        return batch, parent
