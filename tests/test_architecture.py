"""Which room may import which (docs/architecture.md), read from the source: every import in
every module, function-level ones included, so a lazy import cannot slip past."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "trainerd"
HEAVY = {"torch", "transformers", "peft", "datasets", "accelerate", "tensorboardX", "huggingface_hub"}


def _module_of(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


MODULES = {_module_of(p): p for p in PKG.rglob("*.py")}


def _imports() -> dict[str, set[str]]:
    """module (dotted) -> every module it imports (dotted). ``from trainerd.x import y`` names
    trainerd.x, and trainerd.x.y too where y is a module; a relative import is made absolute."""
    out: dict[str, set[str]] = {}
    for mod, path in MODULES.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
        out[mod] = found
    return out


IMPORTS = _imports()


def _ours(imps: set[str]) -> set[str]:
    return {i for i in imps if i in MODULES}


def _loads(mod: str) -> set[str]:
    """What importing ``mod`` may load, itself included: its packages' ``__init__`` and every module it
    imports at any level (a lazy import too), transitively."""
    seen: set[str] = set()
    todo = [mod]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES]
        if m in IMPORTS:
            todo += sorted(IMPORTS[m] & set(MODULES) | {i for i in IMPORTS[m] if i.split(".")[0] in HEAVY})
    return seen


def _in(mod: str, *packages: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in packages)


WORKER = "trainerd.worker"
CORE = "trainerd.core"
# The torch-free side: the supervisor process, its memory guard, the CLI's process, and the kernel.
TORCH_FREE = sorted(m for m in MODULES if not _in(m, WORKER))


def test_the_layout_is_by_process():
    """trainerd/ holds the processes' packages and the kernel, and no loose module but the package's
    version and ``python -m trainerd``: the tree says which process runs a file."""
    loose = sorted(m for m, p in MODULES.items() if p.parent == PKG and p.name not in {"__init__.py", "__main__.py"})
    packages = sorted(p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert loose == []
    assert packages == ["cli", "core", "memguard", "supervisor", "worker"]


@pytest.mark.parametrize("package", ["cli", "core", "memguard", "supervisor", "supervisor.ledger",
                                     "supervisor.views", "worker"])
def test_every_package_says_what_it_may_import(package):
    """Each package's opening docstring says what the package is and what it may import."""
    doc = ast.get_docstring(ast.parse(MODULES[f"trainerd.{package}"].read_text())) or ""
    assert "import" in doc, f"trainerd/{package.replace('.', '/')}/__init__.py: no word on what it may import"


def test_only_the_worker_imports_torch_and_co():
    """Nothing outside trainerd/worker/ imports torch, transformers, peft, datasets or accelerate."""
    bad = {m: sorted(i for i in IMPORTS[m] if i.split(".")[0] in HEAVY) for m in TORCH_FREE}
    assert {m: v for m, v in bad.items() if v} == {}


@pytest.mark.parametrize("side", ["trainerd.supervisor", "trainerd.cli", "trainerd.memguard", "trainerd.core",
                                  "trainerd.__main__"])
def test_the_torch_free_side_reaches_no_torch_even_transitively(side):
    """Every module of the supervisor side, the CLI and the kernel, with everything it may import (lazy
    imports and packages' __init__ included, transitively), reaches neither the worker nor torch & co."""
    bad = {}
    for m in (m for m in TORCH_FREE if _in(m, side)):
        reached = sorted(i for i in _loads(m) if _in(i, WORKER) or i.split(".")[0] in HEAVY)
        if reached:
            bad[m] = reached
    assert bad == {}


def test_the_worker_uses_only_the_kernel():
    """The worker imports no room of the supervisor side (supervisor, memguard, cli): only trainerd.core.
    The two processes talk through argv, files and exit codes."""
    bad = {m: sorted(i for i in _ours(IMPORTS[m]) if not _in(i, WORKER, CORE, "trainerd") or i == "trainerd.__main__")
           for m in MODULES if _in(m, WORKER)}
    assert {m: v for m, v in bad.items() if v} == {}


def test_the_kernel_imports_only_itself():
    """A kernel module (contract, fsutil, config, ...) imports nothing of trainerd but the kernel."""
    bad = {m: sorted(i for i in _ours(IMPORTS[m]) if not _in(i, CORE)) for m in MODULES if _in(m, CORE)}
    assert {m: v for m, v in bad.items() if v} == {}


def test_the_guard_decides_and_never_acts():
    """memguard imports nothing of the supervisor: it returns decisions, stopping.py carries them out."""
    bad = {m: sorted(i for i in _ours(IMPORTS[m]) if not _in(i, "trainerd.memguard", CORE))
           for m in MODULES if _in(m, "trainerd.memguard")}
    assert {m: v for m, v in bad.items() if v} == {}


def test_the_ledger_and_the_views_stand_below_the_daemon():
    """The ledger imports only itself and the kernel; the views (status, health, ...) only the ledger, the
    kernel and each other: ``trainerd status`` never loads the daemon's rooms. (``trainerd.supervisor``
    itself, the package's __init__, imports nothing.)"""
    ledger, views = "trainerd.supervisor.ledger", "trainerd.supervisor.views"
    allowed = {ledger: (ledger, CORE), views: (ledger, views, CORE)}
    bad = {m: sorted(i for i in _ours(IMPORTS[m]) if i != "trainerd.supervisor" and not _in(i, *allowed[room]))
           for room in allowed for m in MODULES if _in(m, room)}
    assert {m: v for m, v in bad.items() if v} == {}
    assert _ours(IMPORTS["trainerd.supervisor"]) == set()


def test_the_supervisor_never_imports_the_cli():
    """The supervisor side serves the CLI and never imports it; a CLI command never imports the entry
    point that assembles the commands (no circle through ``trainerd.cli.entry``)."""
    bad = {m: sorted(i for i in _ours(IMPORTS[m]) if _in(i, "trainerd.cli"))
           for m in MODULES if _in(m, "trainerd.supervisor", "trainerd.memguard", CORE)}
    bad.update({m: ["trainerd.cli.entry"] for m in MODULES
                if _in(m, "trainerd.cli") and m not in {"trainerd.cli", "trainerd.cli.entry"}
                and "trainerd.cli.entry" in IMPORTS[m]})
    assert {m: v for m, v in bad.items() if v} == {}


def test_no_import_circles():
    """No two modules import each other, directly or round a longer loop (lazy imports count): every
    room can be read after the rooms it imports. A package importing its own submodule is no circle."""
    graph = {m: {i for i in _ours(IMPORTS[m]) if i != m and not m.startswith(i + ".")
                 and not (MODULES[m].name == "__init__.py" and i.startswith(m + "."))} for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    assert circles == []


def test_policy_is_pure():
    """The exit policy imports no I/O room (no ledger writes, no files, no processes beyond types)."""
    imps = IMPORTS["trainerd.supervisor.policy"]
    assert not {"os", "subprocess", "shutil", "psutil", "trainerd.supervisor.filing",
                "trainerd.supervisor.attempts", "trainerd.supervisor.forensics"} & imps


# --- the package map in docs/architecture.md ------------------------------------------------

MAP_DOC = PKG.parent / "docs" / "architecture.md"
MAP_MARK = "<!-- package map: checked by tests/test_architecture.py -->"
# Where each process's rooms live (the map's second column).
PROCESS_HOME = {"cli": ("trainerd.cli", "trainerd.__main__"), "both": (CORE, "trainerd"),
                "supervisor": ("trainerd.supervisor", "trainerd.memguard"),
                "supervisor+cli": ("trainerd.supervisor.views",), "worker": (WORKER,)}


def _package_map() -> list[tuple[str, str, list[Path]]]:
    """(the line's paths, its process, the files it names) for every line of the map."""
    text = MAP_DOC.read_text().split(MAP_MARK, 1)[1]
    block = text.split("```", 2)[1].strip("\n").splitlines()
    out = []
    for ln in block:
        cols = re.split(r"\s{2,}", ln.strip(), maxsplit=2)
        assert len(cols) == 3, f"a map line is `PATHS  PROCESS  what it holds`: {ln!r}"
        paths, process = cols[0], cols[1]
        m = re.fullmatch(r"(.*/)\{([\w,]+)\}(\.py)", paths)
        names = [m[1] + n + m[3] for n in m[2].split(",")] if m else [paths]
        out.append((paths, process, [PKG.parent / n for n in names]))
    return out


def test_the_package_map_is_the_tree():
    """docs/architecture.md's package map names only rooms that exist, with a process they may run in,
    and every module of trainerd/ is on exactly one line of it (a file's own line over its folder's)."""
    lines = _package_map()
    assert 15 <= len(lines) <= 30, "about twenty lines, one a room"
    owner: dict[str, list[str]] = {}
    for paths, process, files in lines:
        assert process in PROCESS_HOME, f"{paths}: unknown process {process!r}"
        for f in files:
            assert f.exists(), f"{paths}: no {f.relative_to(PKG.parent)}"
            mods = [_module_of(p) for p in f.rglob("*.py")] if f.is_dir() else [_module_of(f)]
            for mod in mods:
                assert _in(mod, *PROCESS_HOME[process]), f"{mod} is on a {process!r} line but lives elsewhere"
                owner.setdefault(mod, []).append(f"{'dir' if f.is_dir() else 'file'}:{paths}")
    twice = {m: o for m, o in owner.items() if sum(x.startswith("file:") for x in o) > 1
             or (not any(x.startswith("file:") for x in o) and len(o) > 1)}
    assert twice == {}, "a module on two lines"
    assert sorted(set(MODULES) - set(owner)) == [], "modules on no line of the map"
