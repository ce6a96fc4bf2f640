"""``trainerd run | status | pause | resume``: the daemon itself: run it in the foreground, see what
it does, pause and resume it.

Only ``run`` imports the supervisor (psutil, watchdog); ``status`` reads the ledger read-only and a
few small files, so it answers in tens of milliseconds and never imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from trainerd.cli.root import config_path, load_settings, print_config_error, subcommand
from trainerd.core.contract import ExitCode, RootLayout
from trainerd.supervisor.views.paging import add_arguments as add_paging_arguments

__all__ = ["add_pause_resume", "add_run", "add_status"]


def cmd_run(args: argparse.Namespace) -> int:
    from trainerd.core.config import ConfigError

    cfg = config_path(args)
    if not cfg:
        # A missing argument, not a bad config: exit 2 like argparse's own usage errors.
        print("trainerd run: --config FILE is required (or set TRAINERD_CONFIG)", file=sys.stderr)
        return ExitCode.USAGE
    try:
        settings = load_settings(cfg)
    except ConfigError as e:
        return print_config_error(e)
    from trainerd.supervisor.child import WORKER_CMD_ENV

    if not os.environ.get(WORKER_CMD_ENV):
        # Refuse to start without the model: otherwise every file dropped in would fail its
        # worker with exit 78 and be quarantined in failed/ for a mistake in this file, not in the data.
        rc = _model_ready(settings.model.path, cfg)
        if rc != ExitCode.OK:
            return rc
    from trainerd.core import logs
    from trainerd.supervisor.ledger.schema import LedgerTooNew
    from trainerd.supervisor.daemon import Supervisor
    from trainerd.supervisor.recovery import LedgerUnrecoverable
    from trainerd.supervisor.rootlock import AlreadyRunning

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


def add_run(sub: Any, common: argparse.ArgumentParser) -> None:
    subcommand(sub, "run", [common], cmd_run, root=False, help="run the daemon in the foreground",
               description="Run the daemon in the foreground (systemd keeps it alive): watch the inbox, train one "
               "batch at a time, publish adapter versions. Creates the root at its first start; the only command "
               "that does. --config (or $TRAINERD_CONFIG) is required.",
               examples=["trainerd run --config /etc/trainerd/trainerd.yaml"])


def add_status(sub: Any, common: argparse.ArgumentParser) -> None:
    s = subcommand(sub, "status", [common], cmd_status, help="what the daemon is doing",
                   description="What the daemon is doing: running or not, paused, the current adapter, the running "
                   "batch (step, speed, ETA, memory), the queue with retry countdowns, recent results, disk. "
                   "Read-only; never blocks the daemon. Exit 0 whatever the daemon's state: `trainerd check` is "
                   "the one whose exit code says whether all is well.",
                   examples=["trainerd status", "trainerd status --json | jq .queue"])
    s.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    add_paging_arguments(s, "queued and finished batches")


def add_pause_resume(sub: Any, common: argparse.ArgumentParser) -> None:
    subcommand(sub, "pause", [common], cmd_pause, help="create root/.stop",
               description="Pause: create root/.stop. The running batch checkpoints and stops; nothing new starts "
               "until `trainerd resume` (or rm root/.stop).", examples=["trainerd pause --root /var/lib/trainerd"])
    subcommand(sub, "resume", [common], cmd_resume, help="remove root/.stop",
               description="Resume: remove root/.stop; the queue goes on where it stopped.",
               examples=["trainerd resume"])
