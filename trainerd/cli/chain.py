"""``trainerd fsck | history | promote | rollback | rebase``: the adapter chain, checked and changed
by an operator (``history``, which only reads it: history.py).

``fsck`` compares the ledger with the root's folders (``--repair`` with no daemon running).
``promote``, ``rollback`` and ``rebase`` change what the daemon owns (change.py): with a daemon
running they are requests it carries out in its loop (``root/requests/``, group-writable like the inbox); with none they take the
root's lock and apply directly. Never two writers.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from trainerd.cli.change import change
from trainerd.cli.history import cmd_history
from trainerd.cli.root import subcommand
from trainerd.core.contract import ExitCode
from trainerd.supervisor.views.paging import add_arguments as add_paging_arguments

__all__ = ["add_commands"]


def cmd_promote(args: argparse.Namespace) -> int:
    return change(args, "promote", args.batch)


def cmd_rollback(args: argparse.Namespace) -> int:
    return change(args, "rollback", args.version)


def cmd_rebase(args: argparse.Namespace) -> int:
    return change(args, "rebase", 0)


def cmd_fsck(args: argparse.Namespace) -> int:
    """Report where the ledger and the root's folders disagree; --repair fixes what it can."""
    from trainerd.core import logs
    from trainerd.supervisor.ledger import Ledger
    from trainerd.supervisor import recovery
    from trainerd.supervisor.rootlock import AlreadyRunning, take_root_lock

    layout = args.layout
    if not args.repair:
        check = recovery._check(layout.db) if layout.db.exists() else "no ledger"
        print(f"ledger    {layout.db}: {check}")
        if check != "ok":
            print("  `trainerd fsck --repair` (or the next daemon start) sets it aside and rebuilds it")
            return ExitCode.FAIL
        led = Ledger.open_readonly(layout.db)
        try:
            findings = recovery.compare(layout, led)
        finally:
            led.close()
        print(recovery.dumps(findings) if args.json else recovery.describe(findings))
        return ExitCode.OK if not findings else ExitCode.FAIL
    try:
        fd = take_root_lock(layout, write_pid=False)
    except AlreadyRunning as e:
        print(f"trainerd fsck --repair: {e}; stop it first (it repairs what it can at every start)", file=sys.stderr)
        return ExitCode.TEMPFAIL
    try:
        logs.configure(fmt="json", stream=sys.stderr, file=layout.log_file)
        led = recovery.open_ledger(layout, logs.get_logger(command="fsck"))
        try:
            left = recovery.compare(layout, led)
        finally:
            led.close()
    except recovery.LedgerUnrecoverable as e:
        print(f"trainerd fsck: {e}", file=sys.stderr)
        return ExitCode.CONFIG
    finally:
        os.close(fd)
    print("repaired; " + recovery.describe(left))
    return ExitCode.OK if not [f for f in left if f.get("fix")] else ExitCode.FAIL


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    wait = {"type": float, "default": 60.0, "metavar": "SECONDS",
            "help": "seconds to wait for the daemon's answer (default 60); with no daemon it applies at once"}
    s = subcommand(sub, "fsck", [common], cmd_fsck, help="check the ledger against the root's folders",
                   description="Check the ledger against the root's folders (batches, adapters, done/, failed/) and "
                   "report where they disagree; exit 1 when they do. --repair fixes what can be fixed, with no "
                   "daemon running (the daemon repairs the same at every start).",
                   examples=["trainerd fsck", "trainerd fsck --repair --json"])
    s.add_argument("--repair", action="store_true", help="fix what can be fixed (no daemon may run)")
    s.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    s = subcommand(sub, "history", [common], cmd_history,
                   help="the adapter chain: versions, parents, figures, decisions",
                   description="The adapter chain, oldest first: every published version (blessed by the gate, "
                   "forced by promote, or a rollback copy) with its parent, batch, steps, tokens and gate figures, "
                   "and every candidate the gate rejected with the reason. Read-only.",
                   examples=["trainerd history", "trainerd history --json | jq '.[-1]'"])
    s.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    add_paging_arguments(s, "versions and rejected candidates")
    s = subcommand(sub, "promote", [common], cmd_promote,
                   help="publish a rejected candidate anyway, as the next version",
                   description="Publish a candidate the evaluation gate rejected anyway, as the next version "
                   "(recorded as forced). Asks the running daemon, or applies it under the root's lock when none "
                   "runs; exit 1 when refused, 75 when the daemon has not answered in time.",
                   examples=["trainerd promote 12"])
    s.add_argument("batch", type=int, help="the rejected batch's id (trainerd status / history)")
    s.add_argument("--wait", **wait)
    s = subcommand(sub, "rollback", [common], cmd_rollback,
                   help="publish a copy of an earlier version as the next version",
                   description="Go back to an earlier adapter version: a copy of it is published as the next "
                   "version (history is never rewritten), and the chain continues from it.",
                   examples=["trainerd rollback 3"])
    s.add_argument("version", type=int, help="the adapter version to go back to (trainerd history)")
    s.add_argument("--wait", **wait)
    s = subcommand(sub, "rebase", [common], cmd_rebase,
                   help="start a new adapter chain on the configured base model (after changing model.path)",
                   description="Start a new adapter chain on the configured base model, after model.path was "
                   "pointed at another model (the queue is held until then): the next version has no parent "
                   "adapter, and a batch begun on the old base starts again.",
                   examples=["trainerd rebase --config /etc/trainerd/trainerd.yaml"])
    s.add_argument("--wait", **wait)
