"""``trainerd submit | validate``: data files checked line by line the way the daemon will, and
placed in the inbox atomically (the daemon sees the whole file or nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from trainerd.cli.root import config_path, load_settings, print_config_error, subcommand
from trainerd.core.contract import LANES, ExitCode
from trainerd.supervisor.inbox import eval_partner, is_candidate_name

__all__ = ["add_submit", "add_validate"]


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
        settings = load_settings(config_path(args))
    except ConfigError as e:
        return print_config_error(e)
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
        settings = load_settings(config_path(args))
    except ConfigError as e:
        return print_config_error(e)
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


def add_submit(sub: Any, common: argparse.ArgumentParser) -> None:
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


def add_validate(sub: Any, common: argparse.ArgumentParser) -> None:
    s = subcommand(sub, "validate", [common], cmd_validate, root=False,
                   help="line-level report; exit 65 if it would be rejected",
                   description="Check data files line by line as the daemon will, without a root: every bad line "
                   "with its number, byte offset and reason. Exit 65 when a file would be rejected, 66 when one "
                   "cannot be read.", examples=["trainerd validate data.jsonl", "trainerd validate --json a.jsonl "
                                                "b.jsonl.gz"])
    s.add_argument("files", nargs="+", metavar="FILE", help="data files: *.jsonl, *.jsonl.gz or *.jsonl.zst")
    s.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
