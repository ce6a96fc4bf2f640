"""``trainerd``: run | submit | status | check | pause | resume | validate (cli/chain.py: history,
promote, rollback, rebase, fsck; cli/ops.py: cancel, gc; cli/logs.py: logs; cli/ask.py: ask;
cli/check.py: check).

Only ``run`` imports the supervisor (psutil, watchdog); ``status`` reads the ledger
read-only and a few small files, so it answers in tens of milliseconds and never imports
torch. Where the root is, and the check that it is one, for every command: trainerd/cli/root.py.

Exit codes (sysexits; docs/cli.md has the table, tests/test_cli_conventions.py holds the code
to it): 0 ok, 1 failure (refused, not found, problems found), 2 usage, 65 a file would be
rejected, 66 a named file or the root does not exist, 69 something needed cannot be had now,
75 temporary (a daemon already runs, the daemon has not answered yet), 78 bad config.
``trainerd check`` alone answers in Nagios plugin codes (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from trainerd.cli.ask import add_commands as add_ask_commands
from trainerd.cli.chain import add_commands as add_chain_commands
from trainerd.cli.check import add_commands as add_check_commands
from trainerd.cli.check import is_check_command
from trainerd.cli.logs import add_commands as add_logs_commands
from trainerd.cli.ops import add_commands as add_ops_commands
from trainerd.cli.root import (
    DEFAULT_ROOT,
    ROOT_ORDER,
    NotARoot,
    config_path,
    find_root,
    load_settings,
    VersionAction,
    enable_completion,
    require_root,
    subcommand,
)
from trainerd.core.contract import LANES, ExitCode, RootLayout
from trainerd.supervisor.inbox import eval_partner, is_candidate_name
from trainerd.supervisor.views.paging import add_arguments as add_paging_arguments

__all__ = ["DEFAULT_ROOT", "build_parser", "main"]

# The names the other cli_*.py modules (and older callers) use.
_config_path = config_path
_load_settings = load_settings


def _root(args: argparse.Namespace) -> Path:
    return find_root(args)[0]


def _print_config_error(e: Exception) -> int:
    print(f"trainerd: {e}", file=sys.stderr)
    return ExitCode.CONFIG


# --- run -----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from trainerd.core.config import ConfigError

    cfg = _config_path(args)
    if not cfg:
        # A missing argument, not a bad config: exit 2 like argparse's own usage errors.
        print("trainerd run: --config FILE is required (or set TRAINERD_CONFIG)", file=sys.stderr)
        return ExitCode.USAGE
    try:
        settings = _load_settings(cfg)
    except ConfigError as e:
        return _print_config_error(e)
    from trainerd.supervisor.child import WORKER_CMD_ENV

    if not os.environ.get(WORKER_CMD_ENV):
        # Refuse to start without the model: otherwise every file dropped in would fail its
        # worker with exit 78 and be quarantined in failed/ for a mistake in this file, not in the data.
        rc = _model_ready(settings.model.path, cfg)
        if rc != ExitCode.OK:
            return rc
    from trainerd.core import logs
    from trainerd.supervisor.ledger.schema import LedgerTooNew
    from trainerd.supervisor.daemon import AlreadyRunning, Supervisor
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


def _model_ready(value: str, cfg: str) -> int:
    """OK when ``model.path`` can be loaded offline (a hub id not cached yet is fetched now);
    78: no such folder; 69: the hub cannot give it now."""
    from trainerd.core.modelref import fetch, is_hub_id

    if not is_hub_id(value):
        if (Path(value) / "config.json").is_file():
            return ExitCode.OK
        print(f"trainerd: invalid configuration in {cfg}:\n  model.path: no model folder at {value} "
              "(run scripts/fetch-model, or point it at a transformers causal-LM folder or a hub id org/name)",
              file=sys.stderr)
        return ExitCode.CONFIG
    why = fetch(value)
    if why is None:
        return ExitCode.OK
    print(f"trainerd run: model.path {value} {why}; fetch it where the hub is reachable, or use "
          "scripts/fetch-model and a folder", file=sys.stderr)
    return ExitCode.UNAVAILABLE


# --- submit / validate ---------------------------------------------------------------------


def _scan(path: str, settings: Any) -> Any:
    from trainerd.core.lines import scan_file

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


def _unreadable(path: str) -> str | None:
    """Why a named input file cannot be read at all (exit 66), or None. A file that opens but
    would be rejected is the scan's to report (exit 65)."""
    if not os.path.lexists(path):
        return "no such file"
    if not os.access(path, os.R_OK):
        return "not readable by this user"
    return None


def cmd_validate(args: argparse.Namespace) -> int:
    from trainerd.core.config import ConfigError

    try:
        settings = _load_settings(_config_path(args))
    except ConfigError as e:
        return _print_config_error(e)
    missing = {f: why for f in args.files if (why := _unreadable(f))}
    for f, why in missing.items():
        print(f"{f}: {why}", file=sys.stderr)
    reports = [_scan(f, settings) for f in args.files if f not in missing]
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        for r in reports:
            _print_report(r)
    if missing:
        return ExitCode.NOINPUT
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
    from trainerd.core.config import ConfigError

    if args.eval and len(args.files) != 1:
        print("trainerd submit: --eval goes with exactly one data file", file=sys.stderr)
        return ExitCode.USAGE
    try:
        settings = _load_settings(_config_path(args))
    except ConfigError as e:
        return _print_config_error(e)
    inbox = args.layout.lane(LANES[args.priority])
    if not inbox.is_dir():
        print(f"trainerd submit: no inbox at {inbox} (the priority lanes inbox/high and inbox/low are made by "
              "the daemon at its start)", file=sys.stderr)
        return ExitCode.NOINPUT
    rc = ExitCode.OK
    for f in args.files:
        src = Path(f)
        unreadable = next(((g, why) for g in (f, args.eval) if g and (why := _unreadable(g))), None)
        if unreadable:
            print(f"{f}: not submitted: {unreadable[0]}: {unreadable[1]}", file=sys.stderr)
            rc = ExitCode.NOINPUT
            continue
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
    stop = args.layout.stop
    fd = os.open(stop, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
    os.write(fd, f"paused by `trainerd pause` at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode())
    os.close(fd)
    print(f"paused: {stop} exists; the running batch checkpoints and stops, nothing new starts")
    return ExitCode.OK


def cmd_resume(args: argparse.Namespace) -> int:
    try:
        os.unlink(args.layout.stop)
        print("resumed")
    except FileNotFoundError:
        print("not paused")
    return ExitCode.OK


# --- status --------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from trainerd.supervisor.views import paging
    from trainerd.supervisor.views.status import collect_status, render_status

    st = collect_status(args.layout.root, limit=paging.limit_of(args))
    if args.json:
        paging.dump_json(st, sys.stdout)  # --all: the rows are written as they are read
        print()
    else:
        print(render_status(st))
    return ExitCode.OK


# --- entry ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", metavar="FILE",
                        help="YAML config file (default: $TRAINERD_CONFIG); its root is used when neither --root "
                             "nor $TRAINERD_ROOT is given")
    common.add_argument("--root", metavar="DIR", help=f"the trainerd root folder; search order: {ROOT_ORDER}")
    p = argparse.ArgumentParser(
        prog="trainerd", description="Fault-tolerant LoRA fine-tuning daemon: drop JSONL files into its inbox, "
        "it fine-tunes a LoRA adapter on each one and publishes numbered versions.",
        epilog="`trainerd COMMAND --help` describes a command with an example; exit codes: docs/cli.md")
    p.add_argument("--version", action=VersionAction)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subcommand(sub, "run", [common], cmd_run, root=False, help="run the daemon in the foreground",
               description="Run the daemon in the foreground (systemd keeps it alive): watch the inbox, train one "
               "batch at a time, publish adapter versions. Creates the root at its first start; the only command "
               "that does. --config (or $TRAINERD_CONFIG) is required.",
               examples=["trainerd run --config /etc/trainerd/trainerd.yaml"])
    s = subcommand(sub, "submit", [common], cmd_submit, help="validate files, then place them in the inbox atomically",
                   description="Validate data files the way the daemon will, then place each in the inbox "
                   "atomically (copied under a dot-name, fsynced, linked to its name): the daemon sees the whole "
                   "file or nothing, and a file of the same name is never overwritten.",
                   examples=["trainerd submit data.jsonl", "trainerd submit --priority high --eval held-out.jsonl "
                             "data.jsonl"])
    s.add_argument("files", nargs="+", metavar="FILE", help="data files: *.jsonl, *.jsonl.gz or *.jsonl.zst")
    s.add_argument("--eval", metavar="EVAL.jsonl", help="an evaluation set for this batch (replaces its held-out slice)")
    s.add_argument("--priority", choices=list(LANES), default="normal",
                   help="its lane: a queued file of a higher lane starts before lower ones (inbox/high/, inbox/low/)")
    s = subcommand(sub, "status", [common], cmd_status, help="what the daemon is doing",
                   description="What the daemon is doing: running or not, paused, the current adapter, the running "
                   "batch (step, speed, ETA, memory), the queue with retry countdowns, recent results, disk. "
                   "Read-only; never blocks the daemon. Exit 0 whatever the daemon's state: `trainerd check` is "
                   "the one whose exit code says whether all is well.",
                   examples=["trainerd status", "trainerd status --json | jq .queue"])
    s.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    add_paging_arguments(s, "queued and finished batches")
    add_check_commands(sub, common)  # trainerd check (trainerd/cli/check.py, trainerd/supervisor/views/health.py)
    subcommand(sub, "pause", [common], cmd_pause, help="create root/.stop",
               description="Pause: create root/.stop. The running batch checkpoints and stops; nothing new starts "
               "until `trainerd resume` (or rm root/.stop).", examples=["trainerd pause --root /var/lib/trainerd"])
    subcommand(sub, "resume", [common], cmd_resume, help="remove root/.stop",
               description="Resume: remove root/.stop; the queue goes on where it stopped.",
               examples=["trainerd resume"])
    add_chain_commands(sub, common)
    add_ops_commands(sub, common)  # trainerd cancel, gc (trainerd/cli/ops.py)
    add_logs_commands(sub, common)  # trainerd logs (trainerd/cli/logs.py)
    add_ask_commands(sub, common)  # trainerd ask (trainerd/cli/ask.py, trainerd/worker/ask.py)
    s = subcommand(sub, "validate", [common], cmd_validate, root=False,
                   help="line-level report; exit 65 if it would be rejected",
                   description="Check data files line by line as the daemon will, without a root: every bad line "
                   "with its number, byte offset and reason. Exit 65 when a file would be rejected, 66 when one "
                   "cannot be read.", examples=["trainerd validate data.jsonl", "trainerd validate --json a.jsonl "
                                                "b.jsonl.gz"])
    s.add_argument("files", nargs="+", metavar="FILE", help="data files: *.jsonl, *.jsonl.gz or *.jsonl.zst")
    s.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    enable_completion(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        # A Nagios plugin answers a usage error with UNKNOWN, not 2 (which would read as CRITICAL).
        if e.code == ExitCode.USAGE and is_check_command(argv):
            return 3
        raise
    try:
        if getattr(args, "needs_root", False):
            # The one root check: before the command reads or writes anything.
            args.layout = require_root(args)
        return args.fn(args)
    except NotARoot as e:
        print(f"trainerd {args.command}: {e}", file=sys.stderr)
        return ExitCode.NOINPUT
    except ValueError as e:
        config = sys.modules.get("trainerd.core.config")  # loaded only if a config was read
        if config is not None and isinstance(e, config.ConfigError):
            return _print_config_error(e)
        raise
    except BrokenPipeError:  # `trainerd status | head`
        return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
