"""``trainerd``: run | submit | status | pause | resume | validate (cli_chain.py: history, promote,
rollback, rebase, fsck; cli_ops.py: cancel, gc).

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

from trainerd.cli_ask import add_commands as add_ask_commands
from trainerd.cli_chain import add_commands as add_chain_commands
from trainerd.cli_logs import add_commands as add_logs_commands
from trainerd.cli_ops import add_commands as add_ops_commands
from trainerd.contract import LANES, ExitCode, RootLayout
from trainerd.inbox import eval_partner, is_candidate_name
from trainerd.paging import add_arguments as add_paging_arguments

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
    if RootLayout(cwd).looks_like_root():
        return cwd
    return Path(DEFAULT_ROOT)


def _print_config_error(e: Exception) -> int:
    print(f"trainerd: {e}", file=sys.stderr)
    return ExitCode.CONFIG


# --- run -----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from trainerd.config import ConfigError

    cfg = _config_path(args)
    if not cfg:
        print("trainerd run: --config FILE is required (or set TRAINERD_CONFIG)", file=sys.stderr)
        return ExitCode.CONFIG
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
        return ExitCode.CONFIG
    from trainerd import logs
    from trainerd.schema import LedgerTooNew
    from trainerd.supervisor import AlreadyRunning, Supervisor
    from trainerd.supervisor.recovery import LedgerUnrecoverable

    # Training data, adapters and logs are nobody else's business: no world (or group write)
    # access for anything the daemon or its workers create (SQLite's -wal/-shm, the log file).
    os.umask(0o027)
    layout = RootLayout(settings.root)
    try:
        layout.make()
    except OSError as e:
        print(f"trainerd run: cannot create the root {settings.root}: {e}", file=sys.stderr)
        return ExitCode.CONFIG
    logs.configure(level=settings.log.level, fmt=settings.log.format,
                   file=layout.log_file if settings.log.file else None,
                   rotate_bytes=settings.log.rotate_bytes, keep_files=settings.log.keep_files)
    try:
        sup = Supervisor(settings, config_path=cfg)
        return sup.run()
    except AlreadyRunning as e:
        logs.get_logger().error("already_running", reason=str(e))
        return ExitCode.TEMPFAIL
    except LedgerTooNew as e:
        logs.get_logger().error("ledger_too_new", reason=str(e))
        print(f"trainerd: {e}", file=sys.stderr)
        return ExitCode.CONFIG
    except LedgerUnrecoverable as e:
        logs.get_logger().error("ledger_unrecoverable", reason=str(e))
        print(f"trainerd: the ledger cannot be trusted and cannot be rebuilt: {e}\n"
              f"  the damaged file (if any) was kept as {settings.root}/state.db.damaged-*; check that the\n"
              f"  root's folders are readable by this user, then start again (or restore a state.db backup)",
              file=sys.stderr)
        return ExitCode.CONFIG


# --- submit / validate ---------------------------------------------------------------------


def _scan(path: str, settings: Any) -> Any:
    from trainerd.lines import scan_file

    return scan_file(path, max_line_bytes=settings.data.max_line_bytes,
                     max_bad_fraction=settings.data.max_bad_fraction,
                     max_errors=settings.data.max_errors_reported, max_file_bytes=settings.data.max_file_bytes)


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
    return ExitCode.DATAERR if any(r.rejected for r in reports) else ExitCode.OK


def _place(src: Path, inbox: Path, name: str | None = None) -> Path:
    """Copy into the inbox as ``.name.part`` (ignored by the daemon), fsync, then link to the
    final name: the daemon sees the whole file or nothing, and an existing name is never clobbered."""
    name = name or src.name
    final = inbox / name
    part = inbox / f".{name}.part"
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
    inbox = RootLayout(_root(args)).lane(LANES[args.priority])
    if not inbox.is_dir():
        print(f"trainerd submit: no inbox at {inbox} (is the root right? use --root or --config; "
              "the priority lanes inbox/high and inbox/low are made by the daemon at its start)",
              file=sys.stderr)
        return ExitCode.FAIL
    if args.eval and len(args.files) != 1:
        print("trainerd submit: --eval goes with exactly one data file", file=sys.stderr)
        return ExitCode.FAIL
    rc = ExitCode.OK
    for f in args.files:
        src = Path(f)
        if not is_candidate_name(src.name):
            print(f"{f}: not submitted: the name must end in .jsonl, .jsonl.gz or .jsonl.zst (not .eval.jsonl, "
                  "kept for eval files) and not start with a dot", file=sys.stderr)
            rc = rc or ExitCode.FAIL
            continue
        reports = [_scan(f, settings)] + ([_scan(args.eval, settings)] if args.eval else [])
        if any(r.rejected for r in reports):
            for r in reports:
                _print_report(r)
            print(f"{f}: not submitted", file=sys.stderr)
            rc = ExitCode.DATAERR
            continue
        rep = reports[0]
        try:
            if args.eval:
                # The eval file first: the daemon claims it with the data, which appears last.
                _place(Path(args.eval), inbox, eval_partner(src.name))
            dest = _place(src, inbox)
        except FileExistsError:
            print(f"{f}: not submitted: {inbox / src.name} already exists (rename the file)", file=sys.stderr)
            rc = rc or ExitCode.FAIL
            continue
        except OSError as e:
            print(f"{f}: not submitted: {e}", file=sys.stderr)
            rc = rc or ExitCode.FAIL
            continue
        print(f"{f}: submitted as {dest} ({rep.good} good lines, {rep.bad} bad)")
    return rc


# --- pause / resume ------------------------------------------------------------------------


def cmd_pause(args: argparse.Namespace) -> int:
    stop = RootLayout(_root(args)).stop
    if not stop.parent.is_dir():
        print(f"trainerd pause: no root at {stop.parent}", file=sys.stderr)
        return ExitCode.FAIL
    fd = os.open(stop, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
    os.write(fd, f"paused by `trainerd pause` at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode())
    os.close(fd)
    print(f"paused: {stop} exists; the running batch checkpoints and stops, nothing new starts")
    return ExitCode.OK


def cmd_resume(args: argparse.Namespace) -> int:
    stop = RootLayout(_root(args)).stop
    try:
        os.unlink(stop)
        print("resumed")
    except FileNotFoundError:
        print("not paused")
    return ExitCode.OK


# --- status --------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    try:
        root = _root(args)
    except ValueError as e:  # config.ConfigError; not imported here: yaml costs 20 ms
        return _print_config_error(e)
    from trainerd import paging
    from trainerd.status import collect_status, render_status

    st = collect_status(root, limit=paging.limit_of(args))
    if args.json:
        paging.dump_json(st, sys.stdout)  # --all: the rows are written as they are read
        print()
    else:
        print(render_status(st))
    return ExitCode.OK


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
    s.add_argument("--eval", metavar="EVAL.jsonl", help="an evaluation set for this batch (replaces its held-out slice)")
    s.add_argument("--priority", choices=list(LANES), default="normal",
                   help="its lane: a queued file of a higher lane starts before lower ones (inbox/high/, inbox/low/)")
    s.set_defaults(fn=cmd_submit)
    s = sub.add_parser("status", parents=[common], help="what the daemon is doing")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    add_paging_arguments(s, "queued and finished batches")
    s.set_defaults(fn=cmd_status)
    sub.add_parser("pause", parents=[common], help="create root/.stop").set_defaults(fn=cmd_pause)
    sub.add_parser("resume", parents=[common], help="remove root/.stop").set_defaults(fn=cmd_resume)
    add_chain_commands(sub, common)
    add_ops_commands(sub, common)  # trainerd cancel, gc (trainerd/cli_ops.py)
    add_logs_commands(sub, common)  # trainerd logs (trainerd/cli_logs.py)
    add_ask_commands(sub, common)  # trainerd ask (trainerd/cli_ask.py, trainerd/worker/ask.py)
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
        return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
