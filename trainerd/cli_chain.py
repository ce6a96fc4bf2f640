"""``trainerd history | promote | rollback | rebase``: the adapter chain, read and changed by an operator.

``history`` only reads (the ledger read-only, each version's lineage.json). ``promote`` and
``rollback`` change what the daemon owns: with a daemon running they are requests it carries
out in its loop (``root/requests/``, group-writable like the inbox); with none they take the
root's lock and apply directly. Never two writers.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from typing import Any

from trainerd import heldout
from trainerd.contract import ExitCode, RootLayout
from trainerd.fsutil import read_json_or_none

__all__ = ["add_commands", "collect_history"]


def _fmt_loss(pair: Any, fig: dict[str, Any] | None = None) -> str:
    """``3.214->0.912 ±0.081 n12``: held-out loss before -> after, the change's standard error, examples."""
    if fig and fig.get("change") is not None:
        se = f" ±{fig['stderr']:.3f}" if fig.get("stderr") is not None else ""
        return f"{fig['before']:.3f}->{fig['after']:.3f}{se} n{fig.get('examples')}"
    if not pair or pair[0] is None or pair[1] is None:
        return "-"
    return f"{pair[0]:.3f}->{pair[1]:.3f}"


def _gate_summary(gate: dict[str, Any] | None) -> tuple[Any, Any]:
    """(new set [champion, candidate], worst earlier {set, change}) from a gate decision."""
    if not gate:
        return None, None
    sets = gate.get("sets") or []
    new = next((s for s in sets if s["kind"] == "new"), None)
    older = [s for s in sets if s["kind"] != "new"]
    worst = max(older, key=lambda s: s["change"]) if older else None
    return ([new["champion"], new["candidate"]] if new else None,
            {"set": worst["name"], "change": worst["change"], "allowed": worst["allowed"]} if worst else None)


def collect_history(root: Any) -> list[dict[str, Any]]:
    """Every version and every rejected candidate, oldest first."""
    from trainerd.ledger import Ledger

    layout = RootLayout(root)
    if not layout.db.exists():
        return []
    led = Ledger.open_readonly(layout.db)
    try:
        versions, batches = led.adapter_versions(), {b.id: b for b in led.batches()}
    finally:
        led.close()
    rows = []
    for v in versions:
        lin = read_json_or_none(layout.adapter_dir(v.n) / "lineage.json") or {}
        b = batches.get(v.batch_id)
        new, worst = _gate_summary(json.loads(b.gate_json) if b and b.gate_json and v.kind != "rollback" else None)
        rows.append({"version": v.n, "kind": v.kind, "parent": v.parent, "rollback_of": v.source,
                     "batch": v.batch_id, "file": b.name if b else None, "steps": lin.get("steps"),
                     "tokens": lin.get("tokens"), "new_set_loss": new, "worst_earlier": worst,
                     "heldout": heldout.of_version(layout, lin, v.batch_id) if v.kind != "rollback" else None,
                     "decision": v.kind if v.kind != "blessed" else (b.decision if b else "blessed"),
                     "at": v.created_at})
    for b in batches.values():
        if b.state.value == "rejected":
            new, worst = _gate_summary(json.loads(b.gate_json) if b.gate_json else None)
            res = read_json_or_none(layout.batch(b.id).result) or {}
            rows.append({"version": None, "kind": "rejected", "parent": b.parent_version, "rollback_of": None,
                         "batch": b.id, "file": b.name, "steps": res.get("step"), "tokens": res.get("tokens"),
                         "new_set_loss": new, "worst_earlier": worst, "decision": "rejected",
                         "heldout": heldout.of_eval(read_json_or_none(layout.batch(b.id).eval_result)),
                         "reason": b.last_reason, "at": b.finished_at})
    rows.sort(key=lambda r: r["at"] or 0)
    return rows


def _render(rows: list[dict[str, Any]]) -> str:
    out = [f"{'version':>7} {'kind':<9} {'parent':>6} {'batch':>6} {'steps':>6} {'tokens':>8} "
           f"{'held-out loss (±se, n)':<27} {'worst earlier':<22} {'when':<16} file"]
    for r in rows:
        worst = r["worst_earlier"]
        w = f"{worst['change']:+.3f} ({worst['set']})"[:22] if worst else "-"
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["at"])) if r["at"] else "-"
        parent = "base" if r["parent"] is None and r["kind"] != "rollback" else str(r["parent"])
        if r["kind"] == "rollback":
            parent = f"={r['rollback_of']}"
        out.append(f"{r['version'] if r['version'] is not None else '-':>7} {r['kind']:<9} {parent:>6} "
                   f"{r['batch'] or '-':>6} {r['steps'] if r['steps'] is not None else '-':>6} "
                   f"{r['tokens'] if r['tokens'] is not None else '-':>8} {_fmt_loss(r['new_set_loss'], r.get('heldout')):<27} "
                   f"{w:<22} {when:<16} {r['file'] or ''}")
        if r.get("reason"):
            out.append(f"{'':>8}{r['reason']}")
    return "\n".join(out)


def cmd_history(args: argparse.Namespace) -> int:
    from trainerd.cli import _root

    try:
        rows = collect_history(_root(args))
    except sqlite3.Error as e:
        print(f"trainerd history: the ledger cannot be read: {e}", file=sys.stderr)
        return ExitCode.FAIL
    print(json.dumps(rows, indent=2, default=str) if args.json else _render(rows))
    return ExitCode.OK


def _change(args: argparse.Namespace, op: str, arg: int) -> int:
    """Apply directly under the root's lock when no daemon runs, else ask the daemon."""
    from trainerd.cli import _root
    from trainerd.supervisor.daemon import AlreadyRunning, take_root_lock
    from trainerd.supervisor.requests import submit, wait_answer

    layout = RootLayout(_root(args))
    if not layout.db.exists():
        print(f"trainerd {op}: no trainerd root at {layout.root}", file=sys.stderr)
        return ExitCode.FAIL
    try:
        fd = take_root_lock(layout)
    except AlreadyRunning:
        fd = None
    if fd is not None:
        try:
            return _apply_directly(layout, op, arg, _configured_base(args) if op == "rebase" else None,
                                   settings=_configured_settings(args, layout))
        finally:
            os.close(fd)
    req = submit(layout, op, arg)
    ans = wait_answer(req, args.wait)
    if ans is None:
        print(f"trainerd {op}: the daemon has not answered yet; the request stays in {req} and is "
              "carried out when it gets to it", file=sys.stderr)
        return ExitCode.TEMPFAIL
    _print_answer(op, ans)
    return {"done": ExitCode.OK, "refused": ExitCode.FAIL}.get(ans["state"], ExitCode.TEMPFAIL)


def _print_answer(op: str, ans: dict[str, Any]) -> None:
    from trainerd.cli_ops import print_answer

    print_answer(op, ans)


def _configured_settings(args: argparse.Namespace, layout: RootLayout) -> Any:
    """The config's settings (gc applies its retention keys) or the defaults, for this root."""
    from trainerd.cli import _config_path, _load_settings
    from trainerd.config import Settings

    settings = _load_settings(_config_path(args)) if _config_path(args) else Settings()
    settings.root = str(layout.root)
    return settings


def _configured_base(args: argparse.Namespace) -> dict[str, Any] | None:
    """The base model of the config (``--config`` / $TRAINERD_CONFIG), for a rebase with no daemon."""
    from trainerd.basemodel import Watched
    from trainerd.cli import _config_path, _load_settings

    if not _config_path(args):
        return None
    return Watched(_load_settings(_config_path(args)).model.path).get()


def _apply_directly(layout: RootLayout, op: str, arg: int, base: dict[str, Any] | None = None, *,
                    settings: Any = None) -> int:
    from trainerd import logs
    from trainerd.config import Settings
    from trainerd.ledger import Ledger
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
        filing = Filing(layout, led, log)
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
    _print_answer(op, {"state": "done", **out})
    return ExitCode.OK


def cmd_promote(args: argparse.Namespace) -> int:
    return _change(args, "promote", args.batch)


def cmd_rollback(args: argparse.Namespace) -> int:
    return _change(args, "rollback", args.version)


def cmd_rebase(args: argparse.Namespace) -> int:
    return _change(args, "rebase", 0)


def cmd_fsck(args: argparse.Namespace) -> int:
    """Report where the ledger and the root's folders disagree; --repair fixes what it can."""
    from trainerd import logs
    from trainerd.cli import _root
    from trainerd.ledger import Ledger
    from trainerd.supervisor import recovery
    from trainerd.supervisor.daemon import AlreadyRunning, take_root_lock

    layout = RootLayout(_root(args))
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
        fd = take_root_lock(layout)
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
    s = sub.add_parser("fsck", parents=[common], help="check the ledger against the root's folders")
    s.add_argument("--repair", action="store_true", help="fix what can be fixed (no daemon may run)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_fsck)
    s = sub.add_parser("history", parents=[common], help="the adapter chain: versions, parents, figures, decisions")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_history)
    s = sub.add_parser("promote", parents=[common], help="publish a rejected candidate anyway, as the next version")
    s.add_argument("batch", type=int, help="the rejected batch's id")
    s.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the daemon's answer (default 60)")
    s.set_defaults(fn=cmd_promote)
    s = sub.add_parser("rollback", parents=[common], help="publish a copy of an earlier version as the next version")
    s.add_argument("version", type=int)
    s.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the daemon's answer (default 60)")
    s.set_defaults(fn=cmd_rollback)
    s = sub.add_parser("rebase", parents=[common],
                       help="start a new adapter chain on the configured base model (after changing model.path)")
    s.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the daemon's answer (default 60)")
    s.set_defaults(fn=cmd_rebase)
