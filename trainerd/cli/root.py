"""What every subcommand shares: where its root is, the check that it is one, how it is declared
(help, description, examples), ``--version`` and tab completion.

A typo in ``--root`` must not look like a healthy, idle daemon (a monitoring script could not
tell "down" from "fine"), and ``trainerd pause --root /tmp/any`` must not write a ``.stop``
there. So every command that reads or changes a root gets it from :func:`require_root`, which
refuses a folder that is not a trainerd root before anything is read or written: exit 66
(EX_NOINPUT), naming the folder, where its name came from and what is missing. Only
``trainerd run`` creates a root.

The search order, said once (``--root``'s help, docs/operating.md and docs/cli.md quote it):
``--root``, else ``$TRAINERD_ROOT``, else the ``root`` of the config (``--config`` or
``$TRAINERD_CONFIG``), else the current folder when it is a trainerd root (systemd runs the
daemon there, so an operator in it just types the command), else ``/var/lib/trainerd``.

Stdlib only and light: ``status`` goes through here and answers in tens of milliseconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trainerd.core.contract import ExitCode, RootLayout

__all__ = ["DEFAULT_ROOT", "ROOT_ORDER", "NotARoot", "VersionAction", "config_path", "enable_completion", "find_root",
           "load_settings", "require_root", "subcommand"]

DEFAULT_ROOT = "/var/lib/trainerd"
ROOT_ORDER = ("--root, else $TRAINERD_ROOT, else the config's root (--config or $TRAINERD_CONFIG), "
              f"else the current folder when it is a trainerd root, else {DEFAULT_ROOT}")


class NotARoot(Exception):
    """The folder a command was pointed at is not a trainerd root (exit 66)."""


def config_path(args: argparse.Namespace) -> str | None:
    """``--config``, else ``$TRAINERD_CONFIG``, else None."""
    return getattr(args, "config", None) or os.environ.get("TRAINERD_CONFIG") or None


def load_settings(path: str | None) -> Any:
    """Settings from the config file, or the defaults when there is none. ConfigError propagates."""
    if path:
        from trainerd.core import config  # yaml costs ~20 ms: only when a config is read

        return config.load(path)
    from trainerd.core.settings import Settings

    return Settings()


def print_config_error(e: Exception) -> int:
    """A config that cannot be loaded: its message (file, key, reason) and exit 78."""
    print(f"trainerd: {e}", file=sys.stderr)
    return ExitCode.CONFIG


def find_root(args: argparse.Namespace) -> tuple[Path, str]:
    """The root a command means, and where that came from (for an error message)."""
    if getattr(args, "root", None):
        return Path(args.root).resolve(), "given with --root"
    if os.environ.get("TRAINERD_ROOT"):
        return Path(os.environ["TRAINERD_ROOT"]).resolve(), "given in $TRAINERD_ROOT"
    cfg = config_path(args)
    if cfg:
        return Path(load_settings(cfg).root), f"the root in the config {cfg}"
    cwd = Path.cwd()
    if RootLayout(cwd).looks_like_root():
        return cwd, "the current folder"
    return Path(DEFAULT_ROOT), ("the default: no --root, $TRAINERD_ROOT or config given, and the current "
                                "folder is not a trainerd root")


def require_root(args: argparse.Namespace) -> RootLayout:
    """The root's layout, or NotARoot naming the folder and what is missing. Reads two names
    under it; writes nothing."""
    root, source = find_root(args)
    layout = RootLayout(root)
    why = layout.missing()
    if why is not None:
        raise NotARoot(f"{root} is not a trainerd root: {why} ({source}; only `trainerd run` creates a root)")
    return layout


def subcommand(sub: Any, name: str, parents: Sequence[argparse.ArgumentParser], fn: Callable[..., int], *,
               help: str, description: str, examples: Sequence[str], root: bool = True) -> argparse.ArgumentParser:
    """Declare ``trainerd NAME``: its one-line help, a description and examples for ``--help``, and
    whether :func:`trainerd.cli.main` checks its root first (``root=False``: run, validate, and
    check, which answers a wrong root in Nagios' terms itself)."""
    p = sub.add_parser(name, parents=list(parents), help=help, description=textwrap.fill(description, 78),
                       epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(fn=fn, needs_root=root)
    return p


class VersionAction(argparse.Action):
    """``--version``: the installed package's version, looked up only when asked (status stays fast)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kw: Any):
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS,
                         help="print trainerd's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from trainerd import package_version

        print(f"trainerd {package_version()}")  # stdout, as argparse's own version action
        parser.exit()


def enable_completion(parser: argparse.ArgumentParser) -> None:
    """Tab completion through argcomplete, when it is installed and the shell asks for it
    (``eval "$(register-python-argcomplete trainerd)"``): argparse has none of its own, and it is
    not worth a dependency. Costs nothing otherwise: the shell's request is an environment variable."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)
