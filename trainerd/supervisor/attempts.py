"""A batch's way through the supervisor: claim -> start -> settle.

The only caller of the ledger's transitions. Each step records its intent in the ledger
before it touches the folders, so reconcile can finish any step a crash interrupted:

    claim   inbox/<name> --rename--> batches/<id>/data.jsonl, hashed  (CLAIMING -> QUEUED | SKIPPED | FAILED)
    start   plan the memory, write settings.json, spawn the worker     (QUEUED -> RUNNING)
    settle  the exit policy's verdict, carried out                     (RUNNING -> DONE | QUEUED | FAILED)
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trainerd import config as config_mod
from trainerd.basemodel import Watched
from trainerd.child import Child, ExitStatus
from trainerd.config import Settings
from trainerd.contract import BatchFiles, ExitCode, RootLayout, lane_name
from trainerd.fsutil import fsync_dir, open_regular, read_json_or_none, unlink_quietly
from trainerd.inbox import eval_partner
from trainerd.ledger import AttemptRecord, Batch, Ledger, decided_end
from trainerd.states import ACTIVE_STATES, BatchState
from trainerd.supervisor import forensics, hooks, memplan, policy
from trainerd.supervisor import gate as gate_mod
from trainerd.supervisor.filing import Filing
from trainerd.supervisor.intake import guarded
from trainerd.supervisor.launch import distributed, launch_argv, launch_env
from trainerd.supervisor.lineage import chain_base, freeze_inputs
from trainerd.supervisor.stall import StallWatch
from trainerd.supervisor.stopping import Escalation

__all__ = ["Attempts", "Running"]


@dataclass
class Running:
    """The one worker alive now, and everything needed to settle it."""

    batch: Batch                 # the row as it was when the attempt started
    files: BatchFiles
    child: Child
    stop: Escalation
    started_at: float
    log: Any
    oom_kills_at_start: int | None   # the kernel's OOM kill count (/proc/vmstat) at start
    next_guard_poll: float = 0.0
    stall: StallWatch | None = None
    next_stall_look: float = 0.0
    world: int = 1               # ranks (torchrun): their result files decide the outcome

    @property
    def attempt(self) -> int:
        return self.batch.attempts


def _sha256(path: os.PathLike[str]) -> tuple[str, int]:
    """Hash a claimed file without following links or blocking on a FIFO."""
    with open_regular(path) as f:
        h = hashlib.file_digest(f, "sha256")
        return h.hexdigest(), os.fstat(f.fileno()).st_size


class Attempts:
    """Claims, starts and settles. ``settings`` and ``guard`` are the daemon's current ones
    (it replaces them on reload)."""

    def __init__(self, layout: RootLayout, ledger: Ledger, filing: Filing, log: Any, *,
                 settings: Settings, guard: Any, worker_cmd: list[str], env: dict[str, str] | None):
        self.layout, self.ledger, self.filing, self.log = layout, ledger, filing, log
        self.settings, self.guard = settings, guard
        self.worker_cmd, self.env = worker_cmd, env
        self.base: Watched | None = None  # the configured base model (the daemon sets it)

    # --- claim -----------------------------------------------------------------------

    def claim(self, name: str, now: float, priority: int = 0) -> Batch | None:
        """Take a finished inbox file (of the lane ``priority``): ledger row first, then the
        rename, then the hash."""
        src = self.layout.lane(priority) / name
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None  # changed under us; the next scan rejects it
        if st.st_nlink > 1:
            self.log.warning("inbox_file_hard_linked", file=name, links=st.st_nlink,
                             hint="another name can still change these bytes while they train")
        batch = self.ledger.begin_claim(name, st.st_size, now, priority=priority)
        return self.complete_claim(batch, now)

    def complete_claim(self, batch: Batch, now: float) -> Batch | None:
        """CLAIMING -> QUEUED or SKIPPED (or FAILED). Idempotent: reconcile calls it after a crash."""
        log = self.log.bind(batch=batch.id)
        files = self.layout.batch(batch.id)
        original = files.claimed(batch.name)  # data.jsonl, or data.jsonl.gz|zst (the worker expands it)
        inbox = self.layout.lane(batch.priority)
        if not os.path.lexists(original):
            files.dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            self._claim_eval_partner(batch, files, log)
            try:
                # The claim itself: atomic, same file system, the bytes never copied. If the
                # entry was swapped for a symlink since lstat, rename moves the link, unread.
                os.rename(inbox / batch.name, original)
            except FileNotFoundError:
                self.ledger.forget_claim(batch.id)
                shutil.rmtree(files.dir, ignore_errors=True)
                log.warning("claim_vanished", file=batch.name, reason="the file left the inbox before it was claimed")
                return None
            fsync_dir(inbox)
            fsync_dir(files.dir)
        try:
            sha, size = _sha256(original)
        except OSError as e:
            return self._fail(batch, BatchState.CLAIMING, f"cannot read the claimed file: {e.strerror or e}", now, log)
        dup = self.ledger.find_by_sha(sha, ACTIVE_STATES, batch.id)
        if dup is not None:
            batch = self.ledger.decide_skipped(batch.id, sha, dup.id, now)
            batch = self.end(batch, now)  # CLAIMING -> SKIPPED
            log.warning("duplicate_skipped", file=batch.name, sha256=sha, duplicate_of=dup.id,
                        duplicate_of_file=dup.name, duplicate_of_state=dup.state.value,
                        reason="this content was already trained or is queued; not training it twice")
            return batch
        batch = self.ledger.finish_claim(batch.id, sha, size, now)  # CLAIMING -> QUEUED
        log.info("batch_queued", file=batch.name, sha256=sha, size_bytes=size, lane=lane_name(batch.priority))
        return batch

    def _claim_eval_partner(self, batch: Batch, files: BatchFiles, log: Any) -> None:
        """``name.eval.jsonl`` in the inbox goes with ``name.jsonl``, renamed first (so a crash
        between the two renames leaves the data, still in the inbox, to claim it again)."""
        partner = self.layout.lane(batch.priority) / eval_partner(batch.name)
        try:
            st = os.lstat(partner)
        except FileNotFoundError:
            return
        if stat.S_ISREG(st.st_mode) and not os.path.lexists(files.eval_file):
            os.rename(partner, files.eval_file)
            log.info("eval_file_claimed", file=partner.name, batch=batch.id)

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
        # Leftovers of the previous attempt would be misread as this one's answer.
        unlink_quietly(files.result)
        unlink_quietly(files.stop)
        shutil.rmtree(files.published, ignore_errors=True)
        batch, init_adapter = self._parent(batch, now)
        batch = self.ledger.start_attempt(batch.id, now, str(init_adapter) if init_adapter else None)  # QUEUED -> RUNNING
        alog = log.bind(attempt=batch.attempts)
        worker_args = [str(files.dir)]
        if init_adapter is not None:
            worker_args += ["--init-adapter", str(init_adapter)]
        worker_args += ["--publish", str(files.published)]
        argv = launch_argv(settings, self.worker_cmd, worker_args)
        for stale in files.dir.glob("result.rank*.json"):
            stale.unlink(missing_ok=True)
        _stop_orphans(self.layout, files, alog)
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
                  base_weights=settings.model.base_weights)
        unlink_quietly(files.heartbeat)  # the last attempt's sign of life is not this one's
        world = settings.train.nproc_per_node * settings.train.nnodes if distributed(settings) else 1
        return Running(batch, files, child, Escalation(child, files, alog), now, alog, oom_kills, next_guard_poll=now,
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

    # --- settle ----------------------------------------------------------------------

    def finish(self, r: Running, st: ExitStatus, now: float, *, stopping: bool) -> Batch:
        """The worker ``r`` exited with ``st``: log it, then settle its batch."""
        result = read_json_or_none(r.files.result)
        if r.world > 1:
            st = ranks_status(r.files, st, r.world)
        sender = r.stop.sent_by(st.signal) if st.signal is not None else None
        r.log.info("worker_exited", exit=st.describe(), exit_code=st.code, signal=st.signal,
                   signal_sent_by=None if sender is None else sender.value,
                   result_status=(result or {}).get("status"), result_reason=(result or {}).get("reason"),
                   elapsed_s=round(now - r.started_at, 3))
        unlink_quietly(r.files.stop)
        kernel_oom = None
        if st.signal is not None and sender is None:
            kernel_oom = forensics.kernel_oom_killed(r.child.pid, r.oom_kills_at_start)
        end = policy.AttemptEnd(st, result, cause=r.stop.cause, sender=sender,
                                adapter_staged=r.files.published.is_dir(), kernel_oom=kernel_oom,
                                limit_bytes=getattr(self.guard, "limit_bytes", None), stalled=r.stop.stalled,
                                peak_bytes=getattr(self.guard, "peak_bytes", None),
                                ladder=memplan.batch_ladder(r.batch, r.files, self.settings, self.guard))
        return self.settle(r.batch, r.attempt, end, now, r.log, stopping=stopping, pid=r.child.pid,
                           oom_kills_before=r.oom_kills_at_start)

    def settle(self, batch: Batch, n: int, end: policy.AttemptEnd, now: float, log: Any, *,
               stopping: bool = False, pid: int | None = None, oom_kills_before: int | None = None) -> Batch:
        """Decide what an ended attempt means for its batch and carry it out (reconcile uses it too)."""
        if end.status.code == ExitCode.OK and end.gate is None:
            files = self.layout.batch(batch.id)
            end = replace(end, gate=gate_mod.judge(read_json_or_none(files.eval_result), self.settings.gate,
                                                   last_loss=(end.result or {}).get("last_loss")))
        verdict = policy.decide(end, batch, self.settings, now)
        self._log_verdict(verdict, batch, end, now, log, stopping=stopping, pid=pid, oom_kills_before=oom_kills_before)
        return self._apply(batch, n, verdict, end, now, log)

    def _apply(self, batch: Batch, n: int, v: policy.Verdict, end: policy.AttemptEnd, now: float, log: Any) -> Batch:
        st = end.status
        record = AttemptRecord(n, v.outcome, v.reason, exit_code=st.code, signal=st.signal,
                               signal_sent_by=end.sender, result=end.result)
        gate_json = json.dumps(end.gate.as_dict()) if end.gate is not None else None
        if v.action is policy.Action.PUBLISH:
            batch = self.ledger.decide_done(batch.id, self.layout.adapter_dir, now, attempt=record,
                                            decision="blessed", gate_json=gate_json)
            batch = self.end(batch, now)  # RUNNING -> DONE
            log.info("adapter_published", version=batch.adapter_version,
                     path=str(self.layout.adapter_dir(batch.adapter_version)), file=batch.name,
                     parent_version=batch.parent_version, **_gate_fields(end.gate))
            return batch
        if v.action is policy.Action.REJECT:
            batch = self.ledger.decide_rejected(batch.id, v.batch_reason, gate_json, now, attempt=record)
            return self.end(batch, now)  # RUNNING -> REJECTED
        if v.action is policy.Action.FAIL:
            return self._fail(batch, BatchState.RUNNING, v.batch_reason, now, log, attempt=record, **v.updates)
        if v.action is policy.Action.CANCEL:
            return self.cancel(batch, BatchState.RUNNING, v.batch_reason, now, attempt=record)  # RUNNING -> CANCELLED
        return self.ledger.requeue(batch.id, now, reason=v.batch_reason, attempt=record,  # RUNNING -> QUEUED
                                   next_attempt_at=v.next_attempt_at, **v.updates)

    def _fail(self, batch: Batch, from_state: BatchState, reason: str, now: float, log: Any, **fields: Any) -> Batch:
        batch = self.ledger.decide_failed(batch.id, from_state, reason, now, **fields)
        dest = self.filing.finish_failed(batch)
        batch = self.ledger.finish(batch, now)  # CLAIMING | QUEUED | RUNNING -> FAILED
        log.error("batch_failed", file=batch.name, reason=reason, moved_to=str(dest) if dest else None)
        return batch

    def cancel(self, batch: Batch, from_state: BatchState, reason: str, now: float, *,
               attempt: AttemptRecord | None = None) -> Batch:
        """QUEUED | RUNNING -> CANCELLED (`trainerd cancel`): decided, filed (the original to done/
        with <name>.cancelled.json; its folder and checkpoints stay), finished."""
        batch = self.ledger.decide_cancelled(batch.id, from_state, reason, now, attempt=attempt)
        return self.end(batch, now)

    def end(self, batch: Batch, now: float) -> Batch:
        """File a decided batch (done/, failed/, adapters/, current), then finish its state: a
        final state in the ledger means its files are in place. Idempotent (reconcile repeats it)."""
        self.end_filing(batch)
        # A publish or a rejection: its hook is recorded before the state is final (supervisor/hooks.py).
        guarded(self.log, "hook_record_failed", lambda: hooks.record_end(self.layout, batch), batch=batch.id)
        return self.ledger.finish(batch, now)

    def end_filing(self, batch: Batch) -> None:
        """The filing step of :meth:`end` alone (for a batch already final in the ledger)."""
        final = decided_end(batch)
        if final is BatchState.DONE:
            self.filing.finish_done(batch)
        elif final is BatchState.REJECTED:
            self.filing.finish_rejected(batch)
        elif final is BatchState.SKIPPED:
            self.filing.finish_skipped(batch)
        elif final is BatchState.CANCELLED:
            self.filing.finish_cancelled(batch)
        else:
            self.filing.finish_failed(batch)

    def _log_verdict(self, v: policy.Verdict, batch: Batch, end: policy.AttemptEnd, now: float, log: Any, *,
                     stopping: bool, pid: int | None, oom_kills_before: int | None) -> None:
        result = end.result or {}
        for event in v.events:
            if event == "worker_killed_externally":
                log.warning(event, exit=end.status.describe(), pid=pid, kernel_oom_kills_before=oom_kills_before,
                            kernel_oom_kills_now=forensics.vmstat_oom_kills())
            elif event == "kernel_oom_kill":
                total = self.ledger.bump("kernel_oom_kills")
                log.error(event, exit=end.status.describe(), kernel_oom_kills=total,
                          guard_oom_kills=_safe(lambda: self.guard.kernel_oom_kills()),
                          hint="the memory guard did not stop the worker in time; backing off")
            elif event == "memory_back_off":
                log.warning(event, base_weights=v.updates.get("base_weights"), previous_base_weights=batch.base_weights,
                            micro_batch_size=v.updates["micro_batch_size"],
                            grad_accum_steps=v.updates["grad_accum_steps"],
                            gradient_checkpointing=bool(v.updates["gradient_checkpointing"]),
                            previous_micro_batch_size=batch.micro_batch_size or self.settings.train.micro_batch_size,
                            memory_stops=v.updates["memory_stops"], peak_rss_bytes=result.get("peak_rss_bytes"))
            elif event == "disk_full":
                log.error(event, free_bytes=_safe(lambda: shutil.disk_usage(self.layout.root).free),
                          min_free_bytes=self.settings.disk.min_free_bytes, step=result.get("step"),
                          checkpoint=result.get("checkpoint"),
                          action="training paused until free space is back; resumes from the newest checkpoint")
            elif event == "batch_paused":
                log.info(event, step=result.get("step"), total_steps=result.get("total_steps"))
            elif event == "batch_requeued":
                log.info(event, reason=v.batch_reason, step=result.get("step"),
                         resume="at the next start" if stopping else "at once")
            elif event == "adapter_rejected":
                log.warning(event, file=batch.name, rule=end.gate.rule, champion_version=batch.parent_version,
                            candidate=str(self.layout.rejected_dir(batch.id)), **_gate_fields(end.gate),
                            hint=f"current does not move; `trainerd promote {batch.id}` publishes it anyway")
            elif event == "batch_cancelled":
                log.warning(event, file=batch.name, exit=end.status.describe(), step=result.get("step"),
                            checkpoint=result.get("checkpoint"), moved_to=str(self.layout.done))
            elif event == "worker_crashed":
                log.error(event, reason=v.reason, crashes=v.updates["crashes"],
                          max_attempts=self.settings.retry.max_attempts,
                          retry_in_s=round(v.next_attempt_at - now, 3),
                          stderr=str(self.layout.batch(batch.id).stderr))


def _safe(fn: Any) -> Any:
    try:
        return fn()
    except Exception:  # a diagnostic only; never let it break the exit handling
        return None


def _gate_fields(g: Any) -> dict[str, Any]:
    """The gate's figures for a log line: the new set's change and the worst earlier one."""
    if g is None:
        return {}
    new, worst = g.new_set, g.worst_earlier
    return {"gate_enabled": g.enabled, "would_bless": g.would_bless, "gate_note": g.note,
            "new_set_loss": None if new is None else [new.champion, new.candidate],
            "worst_regression": None if worst is None else {"set": worst.name, "change": worst.change,
                                                             "allowed": worst.allowed}}


def ranks_status(files: BatchFiles, st: ExitStatus, world: int) -> ExitStatus:
    """The attempt's exit as the ranks say it. torchrun exits 1 when any rank fails, so a rank's
    75 (stopped, resumable) does not come through its code: every rank wrote its own result
    (rank 0: result.json). All 0 or all 75: that. A rank that wrote nothing, or a bad-data /
    bad-settings / crash code: that, the worst first. torchrun's own code only as a fallback."""
    if st.code == ExitCode.OK:
        return st
    codes = []
    for rank in range(world):
        res = read_json_or_none(files.rank_result(rank))
        codes.append(res.get("exit_code") if res else None)
    for code in (ExitCode.DATAERR, ExitCode.CONFIG, ExitCode.SOFTWARE):
        if code in codes:
            return ExitStatus(int(code), None)
    if codes and all(c == ExitCode.TEMPFAIL for c in codes):
        return ExitStatus(int(ExitCode.TEMPFAIL), None)
    return st


def _stop_orphans(layout: RootLayout, files: BatchFiles, log: Any) -> None:
    """Processes of an earlier attempt of this batch still alive (a rank orphaned when its torchrun
    was killed from outside, checkpointing on its lifeline's EOF): SIGKILLed before a new attempt
    writes the same folder. Their writes are atomic, so nothing is torn."""
    from trainerd.supervisor.reconcile import find_leftover_workers

    for p in find_leftover_workers(layout):
        try:
            if str(files.dir) in p.cmdline():
                log.warning("orphan_worker_killed", pid=p.pid, cmdline=" ".join(p.cmdline()[:8]))
                p.kill()
                p.wait(5)
        except Exception:  # psutil.Error, TimeoutExpired: it is gone or going
            pass
