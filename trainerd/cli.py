"""``trainerd``: run | submit | status | pause | resume | validate.

Only ``run`` imports the supervisor (psutil, watchdog); ``status`` reads the ledger
read-only and a few small files, so it answers in tens of milliseconds and never imports
torch. Where the root is: ``--root``, else ``$TRAINERD_ROOT``, else the ``root`` of the
config (``--config`` or ``$TRAINERD_CONFIG``), else the current directory when it looks like
a trainerd root (systemd runs the daemon there, so an operator in it just types the command),
else the default ``/var/lib/trainerd``.

Exit codes: 0 ok, 1 failure, 65 a file would be rejected, 75 already running, 78 bad config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

EX_OK, EX_FAIL, EX_DATAERR, EX_TEMPFAIL, EX_CONFIG = 0, 1, 65, 75, 78
DEFAULT_ROOT = "/var/lib/trainerd"


# --- config and root ---------------------------------------------------------------------


def _load_settings(path: str | None) -> Any:
    """Settings from the config file, or the defaults when there is none. ConfigError propagates."""
    from trainerd import config

    if path:
        return config.load(path)
    return config.Settings()


def _config_path(args: argparse.Namespace) -> str | None:
    return getattr(args, "config", None) or os.environ.get("TRAINERD_CONFIG") or None


def _root(args: argparse.Namespace) -> Path:
    if getattr(args, "root", None):
        return Path(args.root).resolve()
    if os.environ.get("TRAINERD_ROOT"):
        return Path(os.environ["TRAINERD_ROOT"]).resolve()
    cfg = _config_path(args)
    if cfg:
        return Path(_load_settings(cfg).root)
    cwd = Path.cwd()
    if (cwd / "state.db").exists() or (cwd / "inbox").is_dir():
        return cwd
    return Path(DEFAULT_ROOT)


def _print_config_error(e: Exception) -> int:
    print(f"trainerd: {e}", file=sys.stderr)
    return EX_CONFIG


# --- run -----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from trainerd.config import ConfigError

    cfg = _config_path(args)
    if not cfg:
        print("trainerd run: --config FILE is required (or set TRAINERD_CONFIG)", file=sys.stderr)
        return EX_CONFIG
    try:
        settings = _load_settings(cfg)
    except ConfigError as e:
        return _print_config_error(e)
    from trainerd.child import WORKER_CMD_ENV

    model = Path(settings.model.path)
    if not os.environ.get(WORKER_CMD_ENV) and not (model / "config.json").is_file():
        # Refuse to start: otherwise every file dropped in would fail its worker with exit 78
        # and be quarantined in failed/ for a mistake in this file, not in the data.
        print(f"trainerd: invalid configuration in {cfg}:\n  model.path: no model folder at {model} "
              "(run scripts/fetch-model, or point it at a transformers causal-LM folder)", file=sys.stderr)
        return EX_CONFIG
    from trainerd import logs
    from trainerd.ledger import Layout
    from trainerd.supervisor import AlreadyRunning, Supervisor

    # Training data, adapters and logs are nobody else's business: no world (or group write)
    # access for anything the daemon or its workers create (SQLite's -wal/-shm, the log file).
    os.umask(0o027)
    layout = Layout(settings.root)
    try:
        layout.make()
    except OSError as e:
        print(f"trainerd run: cannot create the root {settings.root}: {e}", file=sys.stderr)
        return EX_CONFIG
    logs.configure(level=settings.log.level, fmt=settings.log.format,
                   file=layout.log_file if settings.log.file else None)
    try:
        sup = Supervisor(settings, config_path=cfg)
        return sup.run()
    except AlreadyRunning as e:
        logs.get_logger().error("already_running", reason=str(e))
        return EX_TEMPFAIL


# --- submit / validate ---------------------------------------------------------------------


def _scan(path: str, settings: Any) -> Any:
    from trainerd.lines import scan_file

    return scan_file(path, max_line_bytes=settings.data.max_line_bytes,
                     max_bad_fraction=settings.data.max_bad_fraction,
                     max_errors=settings.data.max_errors_reported)


def _print_report(rep: Any) -> None:
    verdict = "REJECTED" if rep.rejected else "OK"
    print(f"{rep.path}: {verdict}: {rep.good} good, {rep.bad} bad, {rep.blank} blank of {rep.lines} lines"
          + (f" ({rep.bad_fraction:.1%} bad)" if rep.bad else ""))
    for err in rep.errors:
        print(f"  line {err['line']} (byte {err['offset']}): {err['reason']}")
    if rep.bad > len(rep.errors):
        print(f"  ... and {rep.bad - len(rep.errors)} more bad lines")
    if rep.reason:
        print(f"  reason: {rep.reason}")


def cmd_validate(args: argparse.Namespace) -> int:
    from trainerd.config import ConfigError

    try:
        settings = _load_settings(_config_path(args))
    except ConfigError as e:
        return _print_config_error(e)
    reports = [_scan(f, settings) for f in args.files]
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        for r in reports:
            _print_report(r)
    return EX_DATAERR if any(r.rejected for r in reports) else EX_OK


def _place(src: Path, inbox: Path) -> Path:
    """Copy into the inbox as ``.name.part`` (ignored by the daemon), fsync, then link to the
    final name: the daemon sees the whole file or nothing, and an existing name is never clobbered."""
    final = inbox / src.name
    part = inbox / f".{src.name}.part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            while chunk := fin.read(1 << 20):
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        os.link(part, final)  # EEXIST instead of overwriting a file of the same name
    finally:
        try:
            os.unlink(part)
        except FileNotFoundError:
            pass
    dfd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return final


def cmd_submit(args: argparse.Namespace) -> int:
    from trainerd.config import ConfigError

    try:
        settings = _load_settings(_config_path(args))
    except ConfigError as e:
        return _print_config_error(e)
    inbox = _root(args) / "inbox"
    if not inbox.is_dir():
        print(f"trainerd submit: no inbox at {inbox} (is the root right? use --root or --config)",
              file=sys.stderr)
        return EX_FAIL
    rc = EX_OK
    for f in args.files:
        src = Path(f)
        if not src.name.endswith(".jsonl") or src.name.startswith("."):
            print(f"{f}: not submitted: the name must end in .jsonl and not start with a dot", file=sys.stderr)
            rc = rc or EX_FAIL
            continue
        rep = _scan(f, settings)
        if rep.rejected:
            _print_report(rep)
            print(f"{f}: not submitted", file=sys.stderr)
            rc = EX_DATAERR
            continue
        try:
            dest = _place(src, inbox)
        except FileExistsError:
            print(f"{f}: not submitted: {inbox / src.name} already exists (rename the file)", file=sys.stderr)
            rc = rc or EX_FAIL
            continue
        except OSError as e:
            print(f"{f}: not submitted: {e}", file=sys.stderr)
            rc = rc or EX_FAIL
            continue
        print(f"{f}: submitted as {dest} ({rep.good} good lines, {rep.bad} bad)")
    return rc


# --- pause / resume ------------------------------------------------------------------------


def cmd_pause(args: argparse.Namespace) -> int:
    stop = _root(args) / ".stop"
    if not stop.parent.is_dir():
        print(f"trainerd pause: no root at {stop.parent}", file=sys.stderr)
        return EX_FAIL
    fd = os.open(stop, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
    os.write(fd, f"paused by `trainerd pause` at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode())
    os.close(fd)
    print(f"paused: {stop} exists; the running batch checkpoints and stops, nothing new starts")
    return EX_OK


def cmd_resume(args: argparse.Namespace) -> int:
    stop = _root(args) / ".stop"
    try:
        os.unlink(stop)
        print("resumed")
    except FileNotFoundError:
        print("not paused")
    return EX_OK


# --- status --------------------------------------------------------------------------------


def _daemon_pid(lock: Path) -> int | None:
    """The running supervisor's pid: it holds an exclusive flock on the file while it lives."""
    import fcntl

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


def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def collect_status(root: Path, *, recent: int = 5) -> dict[str, Any]:
    """Everything ``trainerd status`` shows, as plain data (read-only; no torch, no psutil)."""
    from trainerd.ledger import Layout, Ledger
    from trainerd.states import BatchState

    layout = Layout(root)
    pid = _daemon_pid(layout.lock)
    daemon = _read_json(layout.daemon) if pid else None
    try:
        current = int(os.readlink(layout.current))
    except (OSError, ValueError):
        current = None
    out: dict[str, Any] = {
        "root": str(root),
        "daemon": {"running": pid is not None, "pid": pid if pid and pid > 0 else None,
                   "state": (daemon or {}).get("state") if pid else "not running"},
        "paused": os.path.lexists(layout.stop),
        "current_adapter": current,
        "running": None, "queue": [], "recent": [], "batches": [], "counts": {}, "kernel_oom_kills": 0,
    }
    if not layout.db.exists():
        return out
    import sqlite3

    try:
        led = Ledger.open_readonly(layout.db)
    except (OSError, sqlite3.Error) as e:
        out["ledger_error"] = str(e)
        return out
    try:
        try:
            rows = led.batches()
            out["counts"] = led.counts()
            out["kernel_oom_kills"] = led.counter("kernel_oom_kills")
        except sqlite3.Error as e:  # the daemon is creating the ledger right now
            out["ledger_error"] = str(e)
            return out
        now = time.time()
        for b in rows:
            out["batches"].append({"id": b["id"], "file": b["name"], "state": b["state"], "attempts": b["attempts"],
                                   "adapter_version": b["adapter_version"], "reason": b["last_reason"]})
            if b["state"] == BatchState.RUNNING.value:
                prog = _read_json(layout.batch_dir(b["id"]) / "progress.json") or {}
                out["running"] = {
                    "id": b["id"], "file": b["name"], "attempt": b["attempts"],
                    "step": prog.get("step"), "total_steps": prog.get("total_steps"),
                    "tokens_per_s": prog.get("tokens_per_s"), "eta_s": prog.get("eta_s"),
                    "rss_bytes": prog.get("rss_bytes"), "loss": prog.get("loss"),
                    "micro_batch_size": b["micro_batch_size"], "grad_accum_steps": b["grad_accum_steps"],
                    # The ledger says running but no daemon holds the lock: it died mid-attempt.
                    "interrupted": pid is None,
                }
            elif b["state"] in (BatchState.QUEUED.value, BatchState.CLAIMING.value):
                wait = b["next_attempt_at"] - now
                out["queue"].append({"id": b["id"], "file": b["name"], "state": b["state"],
                                     "attempts": b["attempts"], "reason": b["last_reason"],
                                     "retry_in_s": round(wait, 1) if wait > 0 else None})
        finished = [b for b in rows if b["state"] in ("done", "failed", "skipped")]
        finished.sort(key=lambda b: b["finished_at"] or 0, reverse=True)
        out["recent"] = [{"id": b["id"], "file": b["name"], "state": b["state"],
                          "adapter_version": b["adapter_version"], "reason": b["last_reason"],
                          "finished_at": b["finished_at"]} for b in finished[:recent]]
    finally:
        led.close()
    return out


def _fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _fmt_s(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def render_status(st: dict[str, Any]) -> str:
    d = st["daemon"]
    lines = [f"root      {st['root']}",
             f"daemon    {'running, pid ' + str(d['pid']) if d['running'] else 'not running'}"
             + (f" - {d['state']}" if d["running"] and d.get("state") else ""),
             f"paused    {'yes (remove .stop or run `trainerd resume`)' if st['paused'] else 'no'}",
             f"adapter   {'adapters/' + str(st['current_adapter']) if st['current_adapter'] else 'none yet'}",
             f"OOM kills {st['kernel_oom_kills']} (kernel; target 0)"]
    r = st["running"]
    if r:
        step = f"{r['step']}/{r['total_steps']}" if r.get("step") is not None else "starting"
        tps = f"{r['tokens_per_s']:.0f} tok/s" if isinstance(r.get("tokens_per_s"), (int, float)) else "- tok/s"
        if r.get("interrupted"):
            lines.append(f"training  #{r['id']} {r['file']} interrupted at step {step} "
                         "(the daemon is not running; it resumes at the next start)")
        else:
            lines.append(f"training  #{r['id']} {r['file']} attempt {r['attempt']}: step {step}, {tps}, "
                         f"ETA {_fmt_s(r.get('eta_s'))}, memory {_fmt_bytes(r.get('rss_bytes'))}, "
                         f"micro-batch {r['micro_batch_size']}x{r['grad_accum_steps']}")
    else:
        lines.append("training  -")
    lines.append(f"queue     {len(st['queue'])} file(s)")
    for q in st["queue"][:10]:
        extra = f", retry in {_fmt_s(q['retry_in_s'])}" if q["retry_in_s"] else ""
        why = f" (last: {q['reason']})" if q["reason"] else ""
        lines.append(f"  #{q['id']:<5} {q['file']}  attempts {q['attempts']}{extra}{why}")
    if len(st["queue"]) > 10:
        lines.append(f"  ... {len(st['queue']) - 10} more")
    lines.append("recent")
    for b in st["recent"]:
        what = f"adapter {b['adapter_version']}" if b["state"] == "done" else (b["reason"] or "")
        lines.append(f"  #{b['id']:<5} {b['state']:<8} {b['file']}  {what}")
    if not st["recent"]:
        lines.append("  -")
    if st.get("ledger_error"):
        lines.append(f"ledger    unreadable right now: {st['ledger_error']}")
    c = st["counts"]
    lines.append("totals    " + ", ".join(f"{k} {c.get(k, 0)}" for k in ("done", "failed", "skipped", "queued", "running")))
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        root = _root(args)
    except ValueError as e:  # config.ConfigError; not imported here: yaml costs 20 ms
        return _print_config_error(e)
    st = collect_status(root)
    if args.json:
        print(json.dumps(st, indent=2, default=str))
    else:
        print(render_status(st))
    return EX_OK


# --- entry ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", help="YAML config file (default: $TRAINERD_CONFIG)")
    common.add_argument("--root", help="trainerd root folder (default: from the config, or the current folder)")
    p = argparse.ArgumentParser(prog="trainerd", description="Fault-tolerant LoRA fine-tuning daemon.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", parents=[common], help="run the daemon in the foreground").set_defaults(fn=cmd_run)
    s = sub.add_parser("submit", parents=[common], help="validate files, then place them in the inbox atomically")
    s.add_argument("files", nargs="+")
    s.set_defaults(fn=cmd_submit)
    s = sub.add_parser("status", parents=[common], help="what the daemon is doing")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_status)
    sub.add_parser("pause", parents=[common], help="create root/.stop").set_defaults(fn=cmd_pause)
    sub.add_parser("resume", parents=[common], help="remove root/.stop").set_defaults(fn=cmd_resume)
    s = sub.add_parser("validate", parents=[common], help="line-level report; exit 65 if it would be rejected")
    s.add_argument("files", nargs="+")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except BrokenPipeError:  # `trainerd status | head`
        return EX_OK


if __name__ == "__main__":
    sys.exit(main())
