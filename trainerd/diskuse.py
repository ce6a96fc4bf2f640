"""Disk use under the root by kind, and the deleting half of retention: a child process's work.

``python -m trainerd.diskuse ROOT [--plan PLAN.json] [--min-free-bytes N]`` removes every path of the
plan the daemon made (supervisor/retention.py decides what may go; this only deletes, never
following a symlink), then measures what each kind of thing under the root takes and writes
``root/disk-usage.json`` atomically. ``trainerd status`` only reads that file (plus one statvfs), so
it stays fast on a root of any size; the file says when it was measured.

Measuring walks the tree with ``lstat`` (allocated blocks, what ``du`` says). Folders that do not
change once written — published versions ``adapters/<n>``, rejected candidates, the folders of
finished batches — are cached in the file by (inode, mtime): a root with thousands of finished
batches is measured by one ``stat`` per such folder, not a walk of every checkpoint in it.

Stdlib only; it never imports the supervisor (a separate process, started by it between workers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import Any

from trainerd.contract import RootLayout
from trainerd.fsutil import atomic_write_json, free_bytes, read_json_or_none

__all__ = ["KINDS", "apply_plan", "measure", "read_usage", "tree_bytes"]

# kind -> folders under the root (adapters/ excludes rejected/ and the current link)
KINDS: dict[str, tuple[str, ...]] = {
    "batches": ("batches",),
    "adapters": ("adapters",),
    "rejected": ("adapters/rejected",),
    "replay": ("replay",),
    "curves": ("tensorboard",),
    "originals": ("done", "failed"),
    "evalsets": ("evalsets",),
    "logs": ("logs",),
}


def tree_bytes(path: str | os.PathLike[str], skip: frozenset[str] = frozenset()) -> int:
    """Allocated bytes of ``path`` and everything under it, never following a symlink."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    total = st.st_blocks * 512
    if not stat.S_ISDIR(st.st_mode):
        return total
    stack = [os.fspath(path)]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if e.name in skip and d == os.fspath(path):
                continue
            try:
                est = e.stat(follow_symlinks=False)
            except OSError:
                continue
            total += est.st_blocks * 512
            if stat.S_ISDIR(est.st_mode):
                stack.append(e.path)
    return total


def _final_batches(layout: RootLayout) -> set[str]:
    """Folder names of batches whose end is filed (their folders no longer change but by promote)."""
    if not layout.db.exists():
        return set()
    try:
        from trainerd.ledger import Ledger
        from trainerd.states import FINAL_STATES

        led = Ledger.open_readonly(layout.db)
        try:
            return {layout.batch_name(b.id) for b in led.batches(*FINAL_STATES)}
        finally:
            led.close()
    except Exception:  # a measurement; never fail it for the ledger
        return set()


def measure(layout: RootLayout, cache: dict[str, Any] | None = None) -> tuple[dict[str, int], dict[str, Any]]:
    """(bytes by kind, the cache to keep). See the module docstring for what is cached."""
    cache = dict(cache or {})
    fresh: dict[str, Any] = {}
    final = _final_batches(layout)

    def cached(p: Path) -> int:
        try:
            st = os.lstat(p)
        except OSError:
            return 0
        key, sig = str(p.relative_to(layout.root)), [st.st_ino, st.st_mtime_ns]
        hit = cache.get(key)
        if hit and hit[0] == sig:
            size = hit[1]
        else:
            size = tree_bytes(p)
        fresh[key] = [sig, size]
        return size

    out: dict[str, int] = {}
    for kind, folders in KINDS.items():
        total = 0
        for rel in folders:
            base = layout.root / rel
            if kind == "adapters":
                total += _entry_bytes(base)
                for e in _entries(base):
                    if e.name == "rejected" or e.is_symlink():
                        total += _entry_bytes(Path(e.path)) if e.is_symlink() else 0
                    elif e.is_dir(follow_symlinks=False) and e.name.isdigit():
                        total += cached(Path(e.path))
                    else:
                        total += tree_bytes(e.path)
            elif kind in ("rejected", "batches"):
                total += _entry_bytes(base)
                for e in _entries(base):
                    immutable = kind == "rejected" or e.name in final
                    total += cached(Path(e.path)) if immutable and e.is_dir(follow_symlinks=False) else tree_bytes(e.path)
            else:
                total += tree_bytes(base)
        out[kind] = total
    return out, fresh


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        return list(os.scandir(folder))
    except OSError:
        return []


def _entry_bytes(p: Path) -> int:
    try:
        return os.lstat(p).st_blocks * 512
    except OSError:
        return 0


def read_usage(layout: RootLayout) -> dict[str, Any] | None:
    """What the last measurement wrote (``trainerd status`` reads this; no walk)."""
    return read_json_or_none(layout.disk_usage)


def remove(path: Path) -> int:
    """Delete ``path`` (a file, a symlink or a folder tree; never follows a link); bytes freed."""
    size = tree_bytes(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
    return size


def apply_plan(layout: RootLayout, items: list[dict[str, Any]], log: Any) -> tuple[int, int]:
    """Remove every item of a retention plan; returns (removed, bytes freed). A path outside the
    root, or one that is gone, is skipped; an error is logged and the rest goes on."""
    root = os.path.realpath(layout.root)
    removed = freed = 0
    for item in items:
        p = Path(item["path"])
        parent = os.path.realpath(p.parent)
        if not (parent == root or parent.startswith(root + os.sep)):
            log("retention_skipped", path=str(p), reason="outside the root")
            continue
        try:
            n = remove(p)
        except OSError as e:
            log("retention_remove_failed", path=str(p), kind=item.get("kind"), error=str(e))
            continue
        removed += 1
        freed += n
        log("retention_removed", path=str(p), kind=item.get("kind"), why=item.get("why"), bytes=n)
    return removed, freed


def write_usage(layout: RootLayout, min_free_bytes: int | None, elapsed_from: float) -> dict[str, Any]:
    old = read_usage(layout) or {}
    kinds, cache = measure(layout, old.get("cache"))
    body = {"measured_at": time.time(), "measure_s": round(time.monotonic() - elapsed_from, 3),
            "kinds": kinds, "total": sum(kinds.values()), "free_bytes": free_bytes(layout.root),
            "min_free_bytes": min_free_bytes, "cache": cache}
    atomic_write_json(layout.disk_usage, body, durable=False)  # a hint, re-measured often
    return body


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainerd.diskuse", description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--plan", type=Path, help="a retention plan (JSON: items, result) to carry out first")
    p.add_argument("--min-free-bytes", type=int, default=None)
    args = p.parse_args(argv)
    layout = RootLayout(args.root)
    t0 = time.monotonic()

    def log(event: str, **kw: Any) -> None:
        # JSON lines on stdout: the daemon relays them into its log (trainerd.child.Child).
        print(json.dumps({"event": event, "level": "info" if "failed" not in event else "error", **kw}), flush=True)

    removed = freed = 0
    plan = read_json_or_none(args.plan) if args.plan else None
    if plan is not None:
        removed, freed = apply_plan(layout, plan.get("items") or [], log)
    usage = write_usage(layout, args.min_free_bytes, t0)
    if plan is not None and plan.get("result"):
        atomic_write_json(Path(plan["result"]), {"removed": removed, "freed_bytes": freed,
                                                 "total_bytes": usage["total"], "finished_at": time.time()})
    log("disk_usage_measured", total_bytes=usage["total"], measure_s=usage["measure_s"], removed=removed,
        freed_bytes=freed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
