"""``trainerd check``: one line and a Nagios plugin exit code that say whether all is well.

0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (not a root, an unreadable ledger or config, a usage
error): the conventions Nagios, Icinga, Sensu and a systemd ``OnFailure=`` unit all read. The
conditions and their severities are trainerd/supervisor/views/health.py's; the thresholds come from the flags,
else the config's ``check.*`` keys, else their defaults. Read-only, unless ``--state-file`` is
given: then that file (outside the root) remembers when the last check ran, and events count
since then instead of over the window.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

from trainerd.cli.root import NotARoot, config_path, load_settings, require_root, subcommand
from trainerd.core.fsutil import atomic_write_json, read_json_or_none

__all__ = ["add_commands", "duration_s", "is_check_command"]

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d`` in seconds (argparse type)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (say 90, 90s, 15m, 2h or 1d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def is_check_command(argv: list[str]) -> bool:
    """Whether a command line asks for ``trainerd check``, whose usage errors are UNKNOWN (3): a
    Nagios plugin must not answer them with argparse's 2, which reads as CRITICAL."""
    return next((a for a in argv if not a.startswith("-")), None) == "check"


def _unknown(why: str) -> int:
    from trainerd.supervisor.views.health import Severity

    print(f"TRAINERD UNKNOWN - {why}")
    return Severity.UNKNOWN


def _since(state_file: Path | None, root: Path, now: float, window_s: float) -> float:
    """Where events start counting: the previous check (--state-file, for this root), else the window."""
    prev = (read_json_or_none(state_file) or {}) if state_file else {}
    at = prev.get("checked_at")
    if prev.get("root") == str(root) and isinstance(at, (int, float)) and at <= now:
        return float(at)
    return now - window_s


def cmd_check(args: argparse.Namespace) -> int:
    from trainerd.supervisor.views.health import Thresholds, assess, gather, line, worst

    now = time.time()
    try:
        layout = require_root(args)
        settings: Any = load_settings(config_path(args)) if config_path(args) else None
    except NotARoot as e:
        return _unknown(str(e))
    except ValueError as e:  # config.ConfigError
        return _unknown(f"the config cannot be used: {e}".replace("\n", "; "))
    base = Thresholds.from_settings(settings) if settings is not None else Thresholds()
    t = Thresholds(base.paused_warning_s if args.paused_warning is None else args.paused_warning,
                   base.window_s if args.window is None else args.window)
    state_file = Path(args.state_file) if args.state_file else None
    since = _since(state_file, layout.root, now, t.window_s)
    try:
        facts = gather(layout, now, since, min_free_bytes=settings.disk.min_free_bytes if settings else None)
    except (OSError, sqlite3.Error) as e:
        return _unknown(f"{layout.root}: the ledger cannot be read: {e}")
    conditions = assess(facts, t)
    if state_file is not None:
        # Before the verdict is printed: a check that cannot remember itself says UNKNOWN alone.
        try:
            state_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(state_file, {"root": str(layout.root), "checked_at": now})
        except OSError as e:
            return _unknown(f"cannot write the state file {state_file}: {e.strerror or e}")
    if args.json:
        print(json.dumps({"state": worst(conditions).name, "line": line(conditions, facts, t),
                          "conditions": [{"name": c.name, "state": c.severity.name, "text": c.text}
                                         for c in conditions]}, indent=2))
    else:
        print(line(conditions, facts, t))
    return worst(conditions)


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    s = subcommand(sub, "check", [common], cmd_check, root=False,
                   help="one line and a Nagios exit code: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN",
                   description="Whether all is well, for monitoring (Nagios/Icinga plugin conventions): exit 0 OK, "
                   "1 WARNING, 2 CRITICAL, 3 UNKNOWN, and one line saying why, e.g. \"TRAINERD CRITICAL - daemon "
                   "down since ...\". CRITICAL: daemon down, disk below disk.min_free_bytes, a kernel OOM kill "
                   "within the window. WARNING: paused longer than the threshold, a batch quarantined within the "
                   "window, the head of the queue waiting out a crash back-off. Thresholds: these flags, else "
                   "the config's check.* keys. Read-only unless --state-file is given.",
                   examples=["trainerd check --root /var/lib/trainerd",
                             "trainerd check --config /etc/trainerd/trainerd.yaml --paused-warning 2h --window 30m",
                             "trainerd check --state-file /var/lib/nagios/trainerd-check.json"])
    s.add_argument("--paused-warning", type=duration_s, metavar="DURATION",
                   help="WARNING when paused longer than this (90, 15m, 2h, 1d; default: check.paused_warning_s, 1h)")
    s.add_argument("--window", type=duration_s, metavar="DURATION",
                   help="how long a quarantined batch or a kernel OOM kill is reported after it happened "
                        "(default: check.window_s, 1h)")
    s.add_argument("--state-file", metavar="FILE",
                   help="count events since the previous check, remembered in FILE (outside the root; written "
                        "after each check) instead of over the window")
    s.add_argument("--json", action="store_true", help="every condition with its state, as JSON (same exit code)")
