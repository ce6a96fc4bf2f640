"""``trainerd``: the entry point. It only assembles the commands' parsers, in the order ``trainerd
--help`` lists them, and runs the one asked for: daemon.py (run, status, pause, resume), files.py
(submit, validate), check.py (check), chain.py (fsck, history, promote, rollback, rebase), ops.py
(cancel, gc), logs.py (logs), ask.py (ask, learned). Where the root is, and the check that it is
one, for every command: root.py, before the command reads or writes anything.

Exit codes (sysexits; docs/cli.md has the table, tests/test_cli_conventions.py holds the code
to it): 0 ok, 1 failure (refused, not found, problems found), 2 usage, 65 a file would be
rejected, 66 a named file or the root does not exist, 69 something needed cannot be had now,
75 temporary (a daemon already runs, the daemon has not answered yet), 78 bad config.
``trainerd check`` alone answers in Nagios plugin codes (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN).
"""

from __future__ import annotations

import argparse
import sys

from trainerd.cli.ask import add_commands as add_ask_commands
from trainerd.cli.chain import add_commands as add_chain_commands
from trainerd.cli.check import add_commands as add_check_commands
from trainerd.cli.check import is_check_command
from trainerd.cli.daemon import add_pause_resume, add_run, add_status
from trainerd.cli.files import add_submit, add_validate
from trainerd.cli.logs import add_commands as add_logs_commands
from trainerd.cli.ops import add_commands as add_ops_commands
from trainerd.cli.root import (
    ROOT_ORDER,
    NotARoot,
    VersionAction,
    enable_completion,
    print_config_error,
    require_root,
)
from trainerd.core.contract import ExitCode

__all__ = ["build_parser", "main"]


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
    add_run(sub, common)  # trainerd/cli/daemon.py
    add_submit(sub, common)  # trainerd/cli/files.py
    add_status(sub, common)
    add_check_commands(sub, common)  # trainerd check (trainerd/cli/check.py, trainerd/supervisor/views/health.py)
    add_pause_resume(sub, common)
    add_chain_commands(sub, common)
    add_ops_commands(sub, common)  # trainerd cancel, gc (trainerd/cli/ops.py)
    add_logs_commands(sub, common)  # trainerd logs (trainerd/cli/logs.py)
    add_ask_commands(sub, common)  # trainerd ask (trainerd/cli/ask.py, trainerd/worker/ask.py)
    add_validate(sub, common)
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
            return print_config_error(e)
        raise
    except BrokenPipeError:  # `trainerd status | head`
        return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
