"""``trainerd cancel | gc``: withdraw a batch; apply (or preview) retention.

Both change what the daemon owns, so they go exactly the way ``promote`` and ``rollback`` go
(:func:`trainerd.cli.change.change`): a request the running daemon serves in its loop, or, with no
daemon, applied under the root's lock. ``gc --dry-run`` asks the same way (the daemon answers with
its plan, made with its own config) and then sums the sizes here, in the caller's process.
"""

from __future__ import annotations

import argparse
from typing import Any

from trainerd.cli.change import change
from trainerd.cli.root import subcommand

__all__ = ["add_commands"]


def cmd_cancel(args: argparse.Namespace) -> int:
    return change(args, "cancel", args.batch)


def cmd_gc(args: argparse.Namespace) -> int:
    return change(args, "gc", 1 if args.dry_run else 0)


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    wait = "seconds to wait for the daemon's answer (default 60); with no daemon it applies at once"
    s = subcommand(sub, "cancel", [common], cmd_cancel,
                   help="withdraw a queued batch, or stop a running one with a checkpoint and withdraw it",
                   description="Withdraw a batch: a queued one at once, a running one after it checkpoints. Its "
                   "original file goes to done/ (never deleted). Asks the running daemon, or applies it under the "
                   "root's lock when none runs; exit 1 when refused (nothing to cancel), 75 when the daemon has "
                   "not answered in time (the request stays and is carried out).",
                   examples=["trainerd cancel 7", "trainerd cancel 7 --wait 300"])
    s.add_argument("batch", type=int, help="the batch's id (trainerd status)")
    s.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                   help=wait.replace("(default 60)", "(a running batch first checkpoints; default 60)"))
    s = subcommand(sub, "gc", [common], cmd_gc, help="apply retention now (retention.* in the config)",
                   description="Apply the retention rules (retention.* in the config) now instead of at the "
                   "daemon's next pass: old adapter versions, rejected candidates, finished batch folders. "
                   "--dry-run lists what would go and what it frees, and removes nothing.",
                   examples=["trainerd gc --dry-run", "trainerd gc --config /etc/trainerd/trainerd.yaml"])
    s.add_argument("--dry-run", action="store_true", help="show what would be removed and what it frees")
    s.add_argument("--wait", type=float, default=60.0, metavar="SECONDS", help=wait)
