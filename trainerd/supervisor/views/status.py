"""What ``trainerd status`` shows: collected from the root as plain data, rendered as a table.

Read-only and light (stdlib only: no torch, no psutil, no yaml): the ledger is opened
read-only and never blocks the daemon (WAL), the rest is a few small files the daemon and
the worker rewrite atomically (daemon.json, progress.json, disk-usage.json). It reads pages and
running totals, never every row: it answers in tens of milliseconds at any chain length.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainerd.supervisor.ledger import goodput
from trainerd.core.contract import RootLayout, lane_name
from trainerd.core.fsutil import fmt_bytes, fmt_duration, free_bytes, read_json_or_none
from trainerd.supervisor.ledger import Ledger
from trainerd.supervisor.views.paging import DEFAULT_LIMIT, PAGE
from trainerd.supervisor.ledger.states import BatchState

__all__ = ["collect_status", "daemon_pid", "render_status"]


def daemon_pid(lock: Path) -> int | None:
    """The running supervisor's pid (-1 if unreadable), or None when no daemon holds the lock.

    The daemon holds an exclusive flock on the file while it lives, so a stale file from a
    dead daemon says nothing.
    """
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def collect_status(root: Path, *, recent: int = 5, limit: int | None = DEFAULT_LIMIT) -> dict[str, Any]:
    """Everything ``trainerd status`` shows, as plain data (read-only; no torch, no psutil).

    The totals come from the ledger's running totals; the lists are pages: the queue in the order
    it will start and the newest batches (``limit`` each; ``recent`` finished ones). ``limit`` None:
    every row, as iterators that read the ledger in pages as they are consumed (``--all``)."""
    layout = RootLayout(root)
    pid = daemon_pid(layout.lock)
    daemon = read_json_or_none(layout.daemon) if pid else None
    try:
        current = int(os.readlink(layout.current))
    except (OSError, ValueError):
        current = None
    out: dict[str, Any] = {
        "root": str(root),
        "daemon": {"running": pid is not None, "pid": pid if pid and pid > 0 else None,
                   "state": (daemon or {}).get("state") if pid else "not running",
                   "loop": (daemon or {}).get("loop") if pid else None},  # the loop's health (issue 23)
        "paused": os.path.lexists(layout.stop),
        "base_held": (daemon or {}).get("base_held"),
        "current_adapter": current,
        "running": None, "queue": [], "recent": [], "batches": [], "counts": {}, "kernel_oom_kills": 0,
        "last_decision": None, "rejected": [], "limit": limit,
    }
    out["disk"] = _disk(layout)
    if not layout.db.exists():
        return out
    try:
        led = Ledger.open_readonly(layout.db)
    except (OSError, sqlite3.Error) as e:
        out["ledger_error"] = str(e)
        return out
    try:
        out["counts"] = led.counts()
        out["kernel_oom_kills"] = led.counter("kernel_oom_kills")
        out["faults"] = _faults(led.goodput_totals())
        _fill(out, layout, led, interrupted=pid is None, recent=recent, limit=limit)
    except sqlite3.Error as e:  # the daemon is creating the ledger right now
        out["ledger_error"] = str(e)
    finally:
        led.close()
    if limit is None and "ledger_error" not in out:
        out["queue"] = _pages(layout.db, lambda led, after: led.summaries(
            BatchState.QUEUED, BatchState.CLAIMING, order="queue", limit=PAGE, offset=after), _queued, offset=True)
        out["recent"] = _pages(layout.db, lambda led, after: led.summaries(
            order="finished", limit=PAGE, offset=after), _finished, offset=True)
        out["batches"] = _pages(layout.db, lambda led, after: led.summaries(after=after, limit=PAGE), _row)
    return out


def _fill(out: dict[str, Any], layout: RootLayout, led: Ledger, *, interrupted: bool, recent: int,
          limit: int | None) -> None:
    now = time.time()
    for b in led.summaries(BatchState.RUNNING):
        out["running"] = _running(layout, b, interrupted, now)
    if limit is not None:
        out["queue"] = [_queued(b, now) for b in led.summaries(BatchState.QUEUED, BatchState.CLAIMING,
                                                                order="queue", limit=limit)]
        out["recent"] = [_finished(b) for b in led.summaries(order="finished", limit=min(recent, limit))]
        out["batches"] = [_row(b) for b in reversed(led.summaries(newest_first=True, limit=limit))]
    judged = led.summaries(order="finished", decisions=("blessed", "ungated", "rejected", "forced"),
                          limit=1)  # not a cancel
    if judged:
        b = judged[0]
        out["last_decision"] = {"id": b.id, "file": b.name, "decision": b.decision,
                                "adapter_version": b.adapter_version, "reason": b.last_reason, "heals": b.heals}
    out["rejected"] = [{"id": b.id, "file": b.name, "reason": b.last_reason}
                       for b in led.summaries(BatchState.REJECTED, newest_first=True, limit=5)
                       if layout.rejected_dir(b.id).is_dir()]  # retention may have removed the candidate


def _row(b: Any, _now: float | None = None) -> dict[str, Any]:
    return {"id": b.id, "file": b.name, "state": b.state.value, "attempts": b.attempts,
            "adapter_version": b.adapter_version, "reason": b.last_reason, "lane": lane_name(b.priority),
            "faults_survived": b.faults_survived, "crashes_without_progress": b.crashes - b.faults_survived}


def _queued(b: Any, now: float | None = None) -> dict[str, Any]:
    wait = b.next_attempt_at - (time.time() if now is None else now)
    return {"id": b.id, "file": b.name, "state": b.state.value, "attempts": b.attempts, "reason": b.last_reason,
            "lane": lane_name(b.priority), "retry_in_s": round(wait, 1) if wait > 0 else None}


def _finished(b: Any, _now: float | None = None) -> dict[str, Any]:
    return {"id": b.id, "file": b.name, "state": b.state.value, "adapter_version": b.adapter_version,
            "reason": b.last_reason, "finished_at": b.finished_at, "faults_survived": b.faults_survived,
            "goodput": goodput.goodput(json.loads(b.goodput_json) if b.goodput_json else None)}


def _running(layout: RootLayout, b: Any, interrupted: bool, now: float) -> dict[str, Any]:
    prog = read_json_or_none(layout.batch(b.id).progress) or {}
    return {
        "id": b.id, "file": b.name, "attempt": b.attempts, "healing_try": b.heals or None,
        "step": prog.get("step"), "total_steps": prog.get("total_steps"),
        "tokens_per_s": prog.get("tokens_per_s"), "eta_s": _eta_now(prog, now),
        "phase": _phase(layout.batch(b.id)),
        "rss_bytes": prog.get("rss_bytes"), "loss": prog.get("loss"),
        "micro_batch_size": b.micro_batch_size, "grad_accum_steps": b.grad_accum_steps,
        "gradient_checkpointing": bool(b.gradient_checkpointing), "base_weights": b.base_weights,  # the plan's rung
        "ranks": prog.get("world_size") or 1,  # torchrun ranks (progress and memory: rank 0's)
        # The ledger says running but no daemon holds the lock: it died mid-attempt.
        "interrupted": interrupted,
        "no_progress_s": _quiet_s(layout.batch(b.id), prog, now),
        "faults_survived": b.faults_survived, "crashes_without_progress": b.crashes - b.faults_survived,
        "goodput": goodput.summary(json.loads(b.goodput_json) if b.goodput_json else None),
        "restart": _restart(layout.batch(b.id)),
    }


def _pages(db: Path, page: Any, shape: Any, *, offset: bool = False) -> Iterator[dict[str, Any]]:
    """Every row, read a page at a time from a read-only ledger held only while it is consumed:
    ``page(ledger, after)`` gives the next page (after an id, or an offset for an ordered list)."""
    try:
        led = Ledger.open_readonly(db)
    except (OSError, sqlite3.Error):
        return
    try:
        after = 0
        while rows := page(led, after):
            yield from (shape(b) for b in rows)
            after = after + len(rows) if offset else rows[-1].id
    except sqlite3.Error:  # the ledger went away (a rebuild) while it was read: what was read stands
        return
    finally:
        led.close()


def _faults(totals: dict[str, float]) -> dict[str, Any]:
    """Every batch's faults and goodput together (trainerd/supervisor/ledger/goodput.py), from the running totals."""
    survived = int(totals["faults_survived"])
    return {"survived": survived, "crashes_without_progress": int(totals["crashes"]) - survived,
            **goodput.summary(totals)}


def _restart(files: Any) -> dict[str, Any] | None:
    """The running attempt's restart, from its tally: seconds from its start to its first step, by phase."""
    t = read_json_or_none(files.tally)
    if not t or not t.get("phases"):
        return None
    return {"seconds": round(sum(t["phases"].values()), 2), "phases": t["phases"],
            "checkpoint_interval_s": t.get("interval_s"), "mtbf_s": t.get("mtbf_s")}


def _render_faults(f: dict[str, Any] | None) -> str | None:
    if not f or not (f.get("wall_s") or f.get("survived") or f.get("crashes_without_progress")):
        return None
    lost = f["lost_per_fault_s"]
    line = (f"faults    {f['survived']} survived, {f['crashes_without_progress']} crash(es) without progress; "
            f"goodput {f['goodput'] if f['goodput'] is not None else '-'} (useful {_fmt_s(f['useful_s'])} of "
            f"{_fmt_s(f['wall_s'])})")
    if f["faults"]:
        line += (f"; lost per fault {lost['total']:.1f} s (recomputed {lost['recomputed']:.1f}, restart "
                 f"{lost['restart']:.1f}, back-off {lost['backoff']:.1f})")
    return line


def _disk(layout: RootLayout) -> dict[str, Any]:
    """Free space now (one statvfs) and the use by kind from the daemon's disk book (root/disk-usage.json,
    a fixed-size file rewritten whenever something is filed or removed: supervisor/diskbook.py):
    status never walks the tree, so it stays fast on a root of any size."""
    usage = read_json_or_none(layout.disk_usage) or {}
    return {"free_bytes": free_bytes(layout.root), "min_free_bytes": usage.get("min_free_bytes"),
            "kinds": usage.get("kinds"), "total_bytes": usage.get("total"), "measured_at": usage.get("measured_at")}


def _render_disk(d: dict[str, Any] | None) -> str | None:
    if not d:
        return None
    free, low = d.get("free_bytes"), d.get("min_free_bytes")
    line = f"disk      free {fmt_bytes(free)}" + (f" (min {fmt_bytes(low)})" if low else "")
    if free is not None and low and free < low:
        line += " LOW: no batch starts"
    kinds = d.get("kinds")
    if kinds:
        line += " - " + ", ".join(f"{k} {fmt_bytes(v) if v else '0 B'}" for k, v in kinds.items())
        line += f" (measured {_fmt_s(time.time() - d['measured_at'])} ago)" if d.get("measured_at") else ""
    else:
        line += " - use by kind not measured yet (the daemon measures it)"
    return line


def _quiet_s(files: Any, prog: dict[str, Any], now: float) -> float | None:
    """Seconds since the worker's loops last moved, when that is long enough to say
    (max(10 s, 3 x its median step)); None otherwise. The stall watchdog acts much later."""
    try:
        quiet = now - os.stat(files.heartbeat).st_mtime
    except OSError:
        return None
    return round(quiet) if quiet >= max(10.0, 3 * (prog.get("median_step_s") or 0.0)) else None


def _eta_now(prog: dict[str, Any], now: float) -> float | None:
    """The worker's ETA, counted down since it wrote it (a step may take minutes)."""
    eta, at = prog.get("eta_s"), prog.get("updated")
    if not isinstance(eta, (int, float)):
        return None
    return round(max(0.0, eta - max(0.0, now - at)) if isinstance(at, (int, float)) else eta, 1)


def _phase(files: Any) -> str | None:
    """What the worker is doing (load, split, scan, train, checkpoint, evaluate, publish): its heartbeat's text."""
    try:
        return files.heartbeat.read_text()[:32].strip() or None
    except OSError:
        return None


_fmt_s = fmt_duration  # 42s, 12m05s, 1h52m, 3d04h


def render_status(st: dict[str, Any]) -> str:
    """The table ``trainerd status`` prints."""
    d = st["daemon"]
    lines = [f"root      {st['root']}",
             f"daemon    {'running, pid ' + str(d['pid']) if d['running'] else 'not running'}"
             + (f" - {d['state']}" if d["running"] and d.get("state") else ""),
             f"paused    {'yes (remove .stop or run `trainerd resume`)' if st['paused'] else 'no'}",
             f"adapter   {'adapters/' + str(st['current_adapter']) if st['current_adapter'] else 'none yet'}",
             f"OOM kills {st['kernel_oom_kills']} (kernel; target 0)"]
    loop = _render_loop(d.get("loop"))
    if loop:
        lines.append(loop)
    lines.append(_render_running(st["running"]))
    c = st["counts"]
    queued = c.get("queued", 0) + c.get("claiming", 0)  # the running totals, whatever the page shows
    lines.append(f"queue     {queued} file(s)")
    shown = 0
    for q in st["queue"]:  # a page (--limit), or every one (--all: read as it prints)
        extra = f", retry in {_fmt_s(q['retry_in_s'])}" if q["retry_in_s"] else ""
        why = f" (last: {q['reason']})" if q["reason"] else ""
        lane = f" [{q['lane']}]" if q.get("lane", "normal") != "normal" else ""
        lines.append(f"  #{q['id']:<5} {q['file']}{lane}  attempts {q['attempts']}{extra}{why}")
        shown += 1
    if queued > shown:
        lines.append(f"  ... {queued - shown} more (--limit N, --all)")
    lines.append("recent")
    shown = 0
    for b in st["recent"]:
        what = f"adapter {b['adapter_version']}" if b["state"] == "done" else (b["reason"] or "")
        lines.append(f"  #{b['id']:<5} {b['state']:<8} {b['file']}  {what}")
        shown += 1
    if not shown:
        lines.append("  -")
    d = st.get("last_decision")
    if d:
        what = f"adapter {d['adapter_version']}" if d["adapter_version"] else d["reason"]
        if d["decision"] == "ungated":  # published, but nothing judged it: say why
            what += f"; not gated: {d['reason']}"
        if d.get("heals"):
            what += f"; after {d['heals']} healing tr{'y' if d['heals'] == 1 else 'ies'}"
        lines.append(f"decision  #{d['id']} {d['file']}: {d['decision']} ({what})")
    for r in st.get("rejected", [])[:5]:
        lines.append(f"rejected  #{r['id']} {r['file']}: `trainerd promote {r['id']}` publishes it anyway")
    faults = _render_faults(st.get("faults"))
    if faults:
        lines.append(faults)
    disk = _render_disk(st.get("disk"))
    if disk:
        lines.append(disk)
    if st.get("ledger_error"):
        lines.append(f"ledger    unreadable right now: {st['ledger_error']}")
    lines.append("totals    " + ", ".join(f"{k} {c.get(k, 0)}" for k in
                                           ("done", "rejected", "failed", "skipped", "cancelled", "queued", "running")))
    return "\n".join(lines)


def _render_loop(loop: dict[str, Any] | None) -> str | None:
    """The supervisor loop's longest turn of the last minute and the guard's measured interval."""
    if not loop or loop.get("longest_turn_s") is None:
        return None
    line = f"loop      longest turn {loop['longest_turn_s']:.3f} s (last minute)"
    g = loop.get("guard_interval_s") or {}
    if g.get("count"):
        line += (f"; guard samples every {g['p50']:.3f} s (p50), {g['max']:.3f} s at most"
                 f" (interval_ms {loop.get('guard_interval_ms')})")
    return line


_PHASES = {"load": "loading the model", "split": "splitting the file", "scan": "reading the file",
           "evaluate": "evaluating against its champion", "publish": "writing the adapter"}


def _render_running(r: dict[str, Any] | None) -> str:
    if not r:
        return "training  -"
    step = f"{r['step']}/{r['total_steps']}" if r.get("step") is not None else "starting"
    if r.get("interrupted"):
        return (f"training  #{r['id']} {r['file']} interrupted at step {step} "
                "(the daemon is not running; it resumes at the next start)")
    head = f"training  #{r['id']} {r['file']} attempt {r['attempt']}: "
    tail = f"memory {fmt_bytes(r.get('rss_bytes'))}, micro-batch {r['micro_batch_size']}x{r['grad_accum_steps']}"
    # The memory plan's rung where it is not the plain one (trainerd/ladder.py): bf16 or nf4
    # weights, recomputation.
    rung = ([f"{r['base_weights']} weights"] if r.get("base_weights") not in (None, "float32") else []) + \
        (["gradient checkpointing"] if r.get("gradient_checkpointing") else [])
    if rung:
        tail += " (" + ", ".join(rung) + ")"
    phase = r.get("phase")
    if r.get("step") is None:
        line = head + f"starting ({_PHASES.get(phase, phase or 'launching')}), " + tail
    else:
        total = r.get("total_steps") or 0
        pct = f" ({100 * r['step'] // total}%)" if total else ""
        tps = f"{r['tokens_per_s']:.0f} tok/s" if isinstance(r.get("tokens_per_s"), (int, float)) else "- tok/s"
        loss = f"loss {r['loss']:.3f}, " if isinstance(r.get("loss"), (int, float)) else ""
        if phase in ("evaluate", "publish"):
            line = head + f"step {step}, {_PHASES[phase]}, " + tail
        else:
            line = head + f"step {step}{pct}, {loss}{tps}, ETA {_fmt_s(r.get('eta_s'))}, " + tail
    if (r.get("ranks") or 1) > 1:
        line += f", on {r['ranks']} ranks (memory: rank 0's)"
    if r.get("healing_try"):
        line += f", healing try {r['healing_try']} (refused for forgetting; trained again with it rehearsed)"
    if r.get("faults_survived") or r.get("crashes_without_progress"):
        line += f", faults survived {r['faults_survived']}, crashes without progress {r['crashes_without_progress']}"
    if r.get("no_progress_s"):
        line += f" -- no progress for {_fmt_s(r['no_progress_s'])}"
    return line
