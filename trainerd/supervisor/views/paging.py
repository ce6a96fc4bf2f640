"""Paging for the commands that list the chain (``trainerd status``, ``trainerd history``).

After weeks a root holds thousands of batches and versions; a command that read and printed all of
them would grow with the chain. So they show the newest few by default (``--limit N``) with totals
from the ledger's running totals, and every row only on ``--all``, read in keyset pages and
written as they are read: ``--json --all`` streams one JSON document (never built whole in memory).

Stdlib only (the CLI side).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["DEFAULT_LIMIT", "PAGE", "add_arguments", "dump_json", "limit_of"]

DEFAULT_LIMIT = 10
PAGE = 500  # rows read per query while streaming


def add_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N",
                   help=f"the newest N {what} (default {DEFAULT_LIMIT})")
    g.add_argument("--all", action="store_true", help=f"every {what}, however many (--json streams them)")


def limit_of(args: argparse.Namespace) -> int | None:
    """The rows to show: None for all of them."""
    return None if getattr(args, "all", False) else max(0, int(getattr(args, "limit", DEFAULT_LIMIT)))


def dump_json(obj: Any, out: IO[str], indent: int = 2, _level: int = 0) -> None:
    """``json.dump`` that writes an iterator (a generator of rows) as a list element by element, at
    any depth; everything else as ``json.dumps`` would (``default=str``)."""
    pad, inner = " " * (indent * _level), " " * (indent * (_level + 1))
    if isinstance(obj, dict):
        if not obj:
            out.write("{}")
            return
        out.write("{\n")
        for i, (k, v) in enumerate(obj.items()):
            out.write(f"{inner}{json.dumps(str(k))}: ")
            dump_json(v, out, indent, _level + 1)
            out.write(",\n" if i < len(obj) - 1 else "\n")
        out.write(pad + "}")
    elif isinstance(obj, (list, tuple, Iterator)):
        first = True
        out.write("[")
        for v in obj:
            out.write(("\n" if first else ",\n") + inner)
            dump_json(v, out, indent, _level + 1)
            first = False
        out.write("]" if first else "\n" + pad + "]")
    else:
        out.write(json.dumps(obj, default=str))
