"""Which room may import which (docs/architecture.md), read from the source: every import in
every module, function-level ones included, so a lazy import cannot slip past."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "trainerd"
HEAVY = {"torch", "transformers", "peft", "datasets", "accelerate", "tensorboardX"}
# The shared vocabulary both processes use: stdlib (and yaml, structlog) only, no other room.
BASE = {"contract", "states", "fsutil", "faults", "config", "lines", "logs", "sdnotify", "schema", "planning", "replay", "rows",
        "evalmemory",
        "compressed", "aggregates",
        "basemodel", "modelref", "cadence", "goodput"}
# What the worker process may use of the supervisor side's rooms: the base, nothing else. The
# two processes talk through argv, files and exit codes.
SUPERVISOR_ONLY = {"supervisor", "memguard", "ledger", "status", "cli", "cli_chain", "cli_logs", "cli_ask", "child",
                   "inbox", "writers", "metrics", "__main__", "cli_root", "cli_check", "cli_ops", "health",
                   "heldout"}


def _room(module: str) -> str:
    """trainerd.supervisor.attempts -> supervisor; trainerd.fsutil -> fsutil."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports() -> dict[str, set[str]]:
    """module (dotted) -> every module it imports (dotted; ``from trainerd import x`` -> trainerd.x)."""
    out: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        mod = ".".join(rel.parts).removesuffix(".__init__")
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                if node.module == "trainerd":
                    found.update(f"trainerd.{a.name}" for a in node.names)
        out[mod] = found
    return out


IMPORTS = _imports()


def test_only_the_worker_imports_torch_and_co():
    """Nothing outside trainerd/worker/ imports torch, transformers, peft, datasets or accelerate."""
    bad = {m: sorted(i for i in imps if i.split(".")[0] in HEAVY)
           for m, imps in IMPORTS.items() if _room(m) != "worker"}
    assert {m: v for m, v in bad.items() if v} == {}


def test_the_worker_uses_only_the_shared_rooms():
    """The worker imports no room of the supervisor side (supervisor, memguard, ledger, status, cli, ...)."""
    bad = {m: sorted(i for i in imps if i.startswith("trainerd.") and _room(i) in SUPERVISOR_ONLY)
           for m, imps in IMPORTS.items() if _room(m) == "worker"}
    assert {m: v for m, v in bad.items() if v} == {}


@pytest.mark.parametrize("room", sorted(BASE))
def test_shared_rooms_import_only_each_other(room):
    """A shared room (contract, fsutil, config, ...) imports no room but the other shared ones."""
    mods = [m for m in IMPORTS if _room(m) == room]
    assert mods, f"no module for room {room}"
    bad = {m: sorted(i for i in IMPORTS[m] if i.startswith("trainerd.") and _room(i) not in BASE)
           for m in mods}
    assert {m: v for m, v in bad.items() if v} == {}


def test_the_guard_decides_and_never_acts():
    """memguard imports nothing of the supervisor: it returns decisions, stopping.py carries them out."""
    bad = {m: sorted(i for i in imps if i.startswith("trainerd.") and _room(i) in {"supervisor", "ledger", "child"})
           for m, imps in IMPORTS.items() if _room(m) == "memguard"}
    assert {m: v for m, v in bad.items() if v} == {}


def test_policy_is_pure():
    """The exit policy imports no I/O room (no ledger writes, no files, no processes beyond types)."""
    imps = IMPORTS["trainerd.supervisor.policy"]
    assert not {"os", "subprocess", "shutil", "psutil", "trainerd.supervisor.filing",
                "trainerd.supervisor.attempts", "trainerd.supervisor.forensics"} & imps
