"""A change of what the daemon owns, asked from the command line: ``promote``, ``rollback``, ``rebase``
(chain.py), ``cancel`` and ``gc`` (ops.py) all go this one way.

With a daemon running, a request it carries out in its loop (``root/requests/``, group-writable
like the inbox); with none, applied here under the root's lock (the same Desk the daemon uses).
Never two writers. The answer is printed the same way either way (:func:`print_answer`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from trainerd.cli.root import config_path, load_settings
from trainerd.core.contract import ExitCode, RootLayout
from trainerd.core.fsutil import fmt_bytes

__all__ = ["apply_directly", "change", "print_answer"]


def change(args: argparse.Namespace, op: str, arg: int) -> int:
    """Apply directly under the root's lock when no daemon runs, else ask the daemon."""
    from trainerd.supervisor.rootlock import AlreadyRunning, take_root_lock
    from trainerd.supervisor.requests import submit, wait_answer

    layout = args.layout
    if not layout.db.exists():
        print(f"trainerd {op}: no ledger at {layout.db} yet (no daemon has started on this root)", file=sys.stderr)
        return ExitCode.NOINPUT
    try:
        # Only the flock: a refused change leaves trainerd.pid (and everything else) as it was.
        fd = take_root_lock(layout, write_pid=False)
    except AlreadyRunning:
        fd = None
    if fd is not None:
        try:
            return apply_directly(layout, op, arg, configured_base(args) if op == "rebase" else None,
                                   settings=configured_settings(args, layout))
        finally:
            os.close(fd)
    req = submit(layout, op, arg)
    ans = wait_answer(req, args.wait)
    if ans is None:
        print(f"trainerd {op}: the daemon has not answered yet; the request stays in {req} and is "
              "carried out when it gets to it", file=sys.stderr)
        return ExitCode.TEMPFAIL
    print_answer(op, ans)
    return {"done": ExitCode.OK, "refused": ExitCode.FAIL}.get(ans["state"], ExitCode.TEMPFAIL)


def configured_settings(args: argparse.Namespace, layout: RootLayout) -> Any:
    """The config's settings (gc applies its retention keys) or the defaults, for this root."""
    from trainerd.core.settings import Settings

    settings = load_settings(config_path(args)) if config_path(args) else Settings()
    settings.root = str(layout.root)
    return settings


def configured_base(args: argparse.Namespace) -> dict[str, Any] | None:
    """The base model of the config (``--config`` / $TRAINERD_CONFIG), for a rebase with no daemon."""
    from trainerd.supervisor.basemodel import Watched

    if not config_path(args):
        return None
    return Watched(load_settings(config_path(args)).model.path).get()


def apply_directly(layout: RootLayout, op: str, arg: int, base: dict[str, Any] | None = None, *,
                    settings: Any = None) -> int:
    from trainerd.core import logs
    from trainerd.core.settings import Settings
    from trainerd.supervisor.ledger import Ledger
    from trainerd.supervisor.attempts import Attempts
    from trainerd.supervisor.chain import Chain, Refused, Waiting
    from trainerd.supervisor.desk import Desk
    from trainerd.supervisor.filing import Filing
    from trainerd.supervisor.requests import submit
    from trainerd.supervisor.retention import Retention

    logs.configure(fmt="json", stream=sys.stderr, file=layout.log_file)
    log = logs.get_logger(command=op)
    settings = settings or Settings(root=str(layout.root))
    led = Ledger(layout.db)
    try:
        filing = Filing(layout, led, log, settings_of=lambda: settings)
        attempts = Attempts(layout, led, filing, log, settings=settings, guard=None, worker_cmd=[], env=None)
        try:
            desk = Desk(layout, led, attempts, Chain(layout, led, attempts, log), log,
                        retention=Retention(layout, led, log, settings=settings, direct=True))
            out = desk.apply(op, arg, time.time(), base=base)
        except Refused as e:
            print(f"{op}: refused: {e}", file=sys.stderr)
            return ExitCode.FAIL
        except Waiting as e:
            req = submit(layout, op, arg)
            print(f"{op}: waiting: {e}; no daemon runs now: {req} is carried out by the next one")
            return ExitCode.TEMPFAIL
    finally:
        led.close()
    print_answer(op, {"state": "done", **out})
    return ExitCode.OK


def print_answer(op: str, ans: dict[str, Any]) -> None:
    """What a request's answer says, for a terminal (gc --dry-run: each item with its size)."""
    if op == "gc" and "items" in ans:
        from trainerd.supervisor.diskuse import tree_bytes
        from trainerd.supervisor.retention import describe

        items = ans["items"]
        sizes = [tree_bytes(i["path"]) for i in items]
        head = ans["message"] if not items else describe(items, sizes)
        print(f"gc --dry-run: {head}")
        if items:
            print(f"would free {fmt_bytes(sum(sizes)) if sum(sizes) else '0 B'}")
        return
    print(f"{op}: {ans['state']}: {ans['message']}")
