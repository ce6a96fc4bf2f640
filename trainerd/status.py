"""What ``trainerd status`` shows: collected from the root as plain data, rendered as a table.

Read-only and light (stdlib only: no torch, no psutil, no yaml): the ledger is opened
read-only and never blocks the daemon (WAL), the rest is a few small files the daemon and
the worker rewrite atomically (daemon.json, progress.json). Answers in tens of milliseconds.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from trainerd.contract import LANES, RootLayout, lane_name
from trainerd.fsutil import fmt_bytes, fmt_duration, free_bytes, read_json_or_none
from trainerd.ledger import Ledger
from trainerd.states import FINAL_STATES, BatchState

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


def collect_status(root: Path, *, recent: int = 5) -> dict[str, Any]:
    """Everything ``trainerd status`` shows, as plain data (read-only; no torch, no psutil)."""
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
                   "state": (daemon or {}).get("state") if pid else "not running"},
        "paused": os.path.lexists(layout.stop),
        "base_held": (daemon or {}).get("base_held"),
        "current_adapter": current,
        "running": None, "queue": [], "recent": [], "batches": [], "counts": {}, "kernel_oom_kills": 0,
        "last_decision": None, "rejected": [],
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
        try:
            rows = led.summaries()  # tuples: 10 000 batches in ~30 ms (Batch rows cost ~0.4 s)
            out["counts"] = led.counts()
            out["kernel_oom_kills"] = led.counter("kernel_oom_kills")
        except sqlite3.Error as e:  # the daemon is creating the ledger right now
            out["ledger_error"] = str(e)
            return out
    finally:
        led.close()
    _fill_batches(out, layout, rows, interrupted=pid is None, recent=recent)
    return out


def _fill_batches(out: dict[str, Any], layout: RootLayout, rows: list[Any], *, interrupted: bool,
                  recent: int) -> None:
    now = time.time()
    for b in rows:
        out["batches"].append({"id": b.id, "file": b.name, "state": b.state.value, "attempts": b.attempts,
                               "adapter_version": b.adapter_version, "reason": b.last_reason,
                               "lane": lane_name(b.priority)})
        if b.state is BatchState.RUNNING:
            prog = read_json_or_none(layout.batch(b.id).progress) or {}
            out["running"] = {
                "id": b.id, "file": b.name, "attempt": b.attempts,
                "step": prog.get("step"), "total_steps": prog.get("total_steps"),
                "tokens_per_s": prog.get("tokens_per_s"), "eta_s": _eta_now(prog, now),
                "phase": _phase(layout.batch(b.id)),
                "rss_bytes": prog.get("rss_bytes"), "loss": prog.get("loss"),
                "micro_batch_size": b.micro_batch_size, "grad_accum_steps": b.grad_accum_steps,
                "ranks": prog.get("world_size") or 1,  # torchrun ranks (progress and memory: rank 0's)
                # The ledger says running but no daemon holds the lock: it died mid-attempt.
                "interrupted": interrupted,
                "no_progress_s": _quiet_s(layout.batch(b.id), prog, now),
            }
        elif b.state in (BatchState.QUEUED, BatchState.CLAIMING):
            wait = b.next_attempt_at - now
            out["queue"].append({"id": b.id, "file": b.name, "state": b.state.value,
                                 "attempts": b.attempts, "reason": b.last_reason, "lane": lane_name(b.priority),
                                 "retry_in_s": round(wait, 1) if wait > 0 else None})
    # The queue in the order it will start (ledger.next_queued): started first, then lane, then id.
    out["queue"].sort(key=lambda q: (-(q["attempts"] > 0), -LANES[q["lane"]], q["id"]))
    finished = sorted((b for b in rows if b.state in FINAL_STATES), key=lambda b: b.finished_at or 0, reverse=True)
    out["recent"] = [{"id": b.id, "file": b.name, "state": b.state.value, "adapter_version": b.adapter_version,
                      "reason": b.last_reason, "finished_at": b.finished_at} for b in finished[:recent]]
    judged = [b for b in finished if b.decision in ("blessed", "rejected", "forced")]  # the gate's, not a cancel
    if judged:
        b = judged[0]
        out["last_decision"] = {"id": b.id, "file": b.name, "decision": b.decision,
                                "adapter_version": b.adapter_version, "reason": b.last_reason}
    out["rejected"] = [{"id": b.id, "file": b.name, "reason": b.last_reason}
                       for b in rows if b.state is BatchState.REJECTED
                       and layout.rejected_dir(b.id).is_dir()]  # retention may have removed the candidate


def _disk(layout: RootLayout) -> dict[str, Any]:
    """Free space now (one statvfs) and the use by kind as last measured by the daemon's child
    (root/disk-usage.json, re-measured every 10 minutes and after each retention run): status never
    walks the tree, so it stays fast on a root of any size."""
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
    lines.append(_render_running(st["running"]))
    lines.append(f"queue     {len(st['queue'])} file(s)")
    for q in st["queue"][:10]:
        extra = f", retry in {_fmt_s(q['retry_in_s'])}" if q["retry_in_s"] else ""
        why = f" (last: {q['reason']})" if q["reason"] else ""
        lane = f" [{q['lane']}]" if q.get("lane", "normal") != "normal" else ""
        lines.append(f"  #{q['id']:<5} {q['file']}{lane}  attempts {q['attempts']}{extra}{why}")
    if len(st["queue"]) > 10:
        lines.append(f"  ... {len(st['queue']) - 10} more")
    lines.append("recent")
    for b in st["recent"]:
        what = f"adapter {b['adapter_version']}" if b["state"] == "done" else (b["reason"] or "")
        lines.append(f"  #{b['id']:<5} {b['state']:<8} {b['file']}  {what}")
    if not st["recent"]:
        lines.append("  -")
    d = st.get("last_decision")
    if d:
        what = f"adapter {d['adapter_version']}" if d["adapter_version"] else d["reason"]
        lines.append(f"decision  #{d['id']} {d['file']}: {d['decision']} ({what})")
    for r in st.get("rejected", [])[:5]:
        lines.append(f"rejected  #{r['id']} {r['file']}: `trainerd promote {r['id']}` publishes it anyway")
    disk = _render_disk(st.get("disk"))
    if disk:
        lines.append(disk)
    if st.get("ledger_error"):
        lines.append(f"ledger    unreadable right now: {st['ledger_error']}")
    c = st["counts"]
    lines.append("totals    " + ", ".join(f"{k} {c.get(k, 0)}" for k in
                                           ("done", "rejected", "failed", "skipped", "cancelled", "queued", "running")))
    return "\n".join(lines)


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
    if r.get("no_progress_s"):
        line += f" -- no progress for {_fmt_s(r['no_progress_s'])}"
    return line
