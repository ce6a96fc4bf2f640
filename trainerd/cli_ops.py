"""``trainerd cancel | gc``: withdraw a batch; apply (or preview) retention.

Both change what the daemon owns, so they go exactly the way ``promote`` and ``rollback`` go
(:func:`trainerd.cli_chain._change`): a request the running daemon serves in its loop, or, with no
daemon, applied under the root's lock. ``gc --dry-run`` asks the same way (the daemon answers with
its plan, made with its own config) and then sums the sizes here, in the caller's process.
"""

from __future__ import annotations

import argparse
from typing import Any

from trainerd.fsutil import fmt_bytes

__all__ = ["add_commands", "print_answer"]


def print_answer(op: str, ans: dict[str, Any]) -> None:
    """What a request's answer says, for a terminal (gc --dry-run: each item with its size)."""
    if op == "gc" and "items" in ans:
        from trainerd.diskuse import tree_bytes
        from trainerd.supervisor.retention import describe

        items = ans["items"]
        sizes = [tree_bytes(i["path"]) for i in items]
        head = ans["message"] if not items else describe(items, sizes)
        print(f"gc --dry-run: {head}")
        if items:
            print(f"would free {fmt_bytes(sum(sizes)) if sum(sizes) else '0 B'}")
        return
    print(f"{op}: {ans['state']}: {ans['message']}")


def cmd_cancel(args: argparse.Namespace) -> int:
    from trainerd.cli_chain import _change

    return _change(args, "cancel", args.batch)


def cmd_gc(args: argparse.Namespace) -> int:
    from trainerd.cli_chain import _change

    return _change(args, "gc", 1 if args.dry_run else 0)


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("cancel", parents=[common],
                       help="withdraw a queued batch, or stop a running one with a checkpoint and withdraw it")
    s.add_argument("batch", type=int, help="the batch's id (trainerd status)")
    s.add_argument("--wait", type=float, default=60.0,
                   help="seconds to wait for the daemon's answer (a running batch first checkpoints; default 60)")
    s.set_defaults(fn=cmd_cancel)
    s = sub.add_parser("gc", parents=[common], help="apply retention now (retention.* in the config)")
    s.add_argument("--dry-run", action="store_true", help="show what would be removed and what it frees")
    s.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the daemon's answer (default 60)")
    s.set_defaults(fn=cmd_gc)
