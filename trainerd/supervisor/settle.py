"""Settle: a worker's exit read (its ranks' results under torchrun), the exit policy's verdict
carried out in the ledger and the folders (requeue, publish, reject, heal, fail), and a batch's end
filed; ``cancel`` withdraws one. Each step records its intent in the ledger before it touches the
folders, so reconcile can finish any step a crash interrupted (it calls settle and end too).

A part of :class:`trainerd.supervisor.attempts.Attempts`, which holds the state it works on.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from typing import Any

from trainerd.supervisor.child import Child, ExitStatus
from trainerd.core.contract import BatchFiles, ExitCode
from trainerd.core.fsutil import read_json_or_none, unlink_quietly
from trainerd.supervisor.ledger import AttemptRecord, Batch, decided_end
from trainerd.supervisor.ledger.states import FINAL_STATES, BatchState
from trainerd.supervisor import accounting, forensics, heal, hooks, memplan, policy
from trainerd.supervisor import gate as gate_mod
from trainerd.supervisor.intake import guarded
from trainerd.supervisor.stall import StallWatch
from trainerd.supervisor.stopping import Escalation

__all__ = ["Running", "Settle", "ranks_status"]


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
    stall: StallWatch | None = None
    next_stall_look: float = 0.0
    world: int = 1               # ranks (torchrun): their result files decide the outcome

    @property
    def attempt(self) -> int:
        return self.batch.attempts


class Settle:
    """The Attempts' settling of an ended attempt and a batch's end."""

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
        files = self.layout.batch(batch.id)
        if end.status.code == ExitCode.OK and end.gate is None:
            end = replace(end, gate=gate_mod.judge(read_json_or_none(files.eval_result), self.settings.gate,
                                                   last_loss=(end.result or {}).get("last_loss")))
        end = accounting.with_progress(end, files, batch)
        verdict = policy.decide(end, batch, self.settings, now)
        self._log_verdict(verdict, batch, end, now, log, stopping=stopping, pid=pid, oom_kills_before=oom_kills_before)
        return self._apply(batch, n, verdict, end, now, log)

    def _apply(self, batch: Batch, n: int, v: policy.Verdict, end: policy.AttemptEnd, now: float, log: Any) -> Batch:
        st = end.status
        record = accounting.accounted(self.ledger, self.layout, batch, AttemptRecord(
            n, v.outcome, v.reason, exit_code=st.code, signal=st.signal, signal_sent_by=end.sender, result=end.result),
            now, log)
        gate_json = json.dumps(end.gate.as_dict()) if end.gate is not None else None
        files = self.layout.batch(batch.id)
        if end.gate is not None and (v.action is policy.Action.HEAL or batch.heals):
            heal.record_try(files, batch.heals, end.gate, end.result)  # before the ledger moves on
        if v.action is policy.Action.PUBLISH:
            ungated = end.gate is not None and not end.gate.gated
            batch = self.ledger.decide_done(batch.id, self.layout.adapter_dir, now, attempt=record,
                                            decision="ungated" if ungated else "blessed", gate_json=gate_json,
                                            reason=end.gate.note if ungated and end.gate.note else "done")
            batch = self.end(batch, now)  # RUNNING -> DONE
            log.info("adapter_published", version=batch.adapter_version,
                     path=str(self.layout.adapter_dir(batch.adapter_version)), file=batch.name,
                     parent_version=batch.parent_version, **(end.gate.log_fields() if end.gate else {}))
            return batch
        if v.action is policy.Action.REJECT:
            reason = heal.rejection_reason(files, v.batch_reason, batch.heals,
                                           end.gate.targets if end.gate is not None else ())
            batch = self.ledger.decide_rejected(batch.id, reason, gate_json, now, attempt=record)
            return self.end(batch, now)  # RUNNING -> REJECTED
        if v.action is policy.Action.FAIL:
            return self._fail(batch, BatchState.RUNNING, v.batch_reason, now, log, attempt=record, **v.updates)
        if v.action is policy.Action.CANCEL:
            return self.cancel(batch, BatchState.RUNNING, v.batch_reason, now, attempt=record)  # RUNNING -> CANCELLED
        # REQUEUE, or HEAL (a healing try: ``heals`` + 1; supervisor/heal.py prepares it at its start)
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
        settles = batch.state not in FINAL_STATES  # (a promote ends a batch that was final already)
        self.end_filing(batch)
        # A publish or a rejection: its hook is recorded before the state is final (supervisor/hooks.py).
        guarded(self.log, "hook_record_failed", lambda: hooks.record_end(self.layout, batch), batch=batch.id)
        batch = self.ledger.finish(batch, now)
        if settles and self.filing.book is not None:
            self.filing.book.batch_settled(batch)  # what its worker wrote stops changing now
        return batch

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
        if not self.settings.train.keep_finished_checkpoints:
            self.filing.drop_checkpoints(batch)

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
            elif event == "batch_healing":
                log.warning(event, file=batch.name, rule=end.gate.rule, heal_try=v.updates["heals"],
                            heal_attempts=self.settings.gate.heal_attempts, targets=list(end.gate.targets),
                            action="trained again from the same champion with the regressed batches' lines replayed")
            elif event == "adapter_rejected":
                log.warning(event, file=batch.name, rule=end.gate.rule, champion_version=batch.parent_version,
                            candidate=str(self.layout.rejected_dir(batch.id)), **end.gate.log_fields(),
                            hint=f"current does not move; `trainerd promote {batch.id}` publishes it anyway")
            elif event == "batch_cancelled":
                log.warning(event, file=batch.name, exit=end.status.describe(), step=result.get("step"),
                            checkpoint=result.get("checkpoint"), moved_to=str(self.layout.done))
            elif event in ("worker_crashed", "fault_survived"):
                # A fault survived is weather (a warning): the batch got further and resumes at once.
                (log.warning if event == "fault_survived" else log.error)(
                    event, reason=v.reason, after_step=end.reached_step, progressed=end.progressed,
                    crashes=v.updates["crashes"], faults_survived=v.updates["faults_survived"],
                    crash_streak=v.updates["crash_streak"], max_attempts=self.settings.retry.max_attempts,
                    retry_in_s=round(max(0.0, v.next_attempt_at - now), 3), stderr=str(self.layout.batch(batch.id).stderr))


def _safe(fn: Any) -> Any:
    try:
        return fn()
    except Exception:  # a diagnostic only; never let it break the exit handling
        return None


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
