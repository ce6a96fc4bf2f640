"""Disk use under the root by kind, and the deleting half of retention: a child process's work.

``python -m trainerd.supervisor.diskuse ROOT [--plan PLAN.json] [--measure] [--min-free-bytes N]`` removes
every path of the plan the daemon made (supervisor/retention.py decides what may go; this only
deletes, never following a symlink) and reports the bytes freed by kind; with ``--measure`` it
walks the whole root and writes ``root/disk-usage.json`` from scratch.

The daemon does not walk the root to know its size: it keeps a book (supervisor/diskbook.py) of
what each kind holds, adding a folder's bytes once when it is settled (a finished batch's folder,
a published version, an original filed, its replay file) and taking off what retention removes;
only the live part (unfinished batches, the logs) is measured again, and it is bounded. The full
walk here corrects the book once a day (drift from a crash between a filing and its entry), at
the first start on a root, and on ``trainerd gc`` without a daemon. ``disk-usage.json`` holds the
totals by kind only: a fixed size, whatever the root's (``trainerd status`` reads it whole).

Measuring walks with ``lstat`` (allocated blocks, what ``du`` says). Stdlib only; it never imports
the supervisor (a separate process, started by it between workers).
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

from trainerd.core.contract import RootLayout
from trainerd.core.fsutil import atomic_write_json, free_bytes, read_json_or_none

__all__ = ["KINDS", "apply_plan", "batch_live", "measure", "measure_live", "read_usage", "shared_live", "tree_bytes",
           "write_usage"]

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


def measure(layout: RootLayout) -> dict[str, int]:
    """Bytes by kind, the whole root walked (the daily correction; never in the daemon's loop)."""
    out: dict[str, int] = {}
    for kind, folders in KINDS.items():
        total = 0
        for rel in folders:
            base = layout.root / rel
            if kind == "adapters":  # adapters/ less adapters/rejected/ (its own kind)
                total += _entry_bytes(base) + sum(tree_bytes(e.path) for e in _entries(base) if e.name != "rejected")
            else:
                total += tree_bytes(base)
        out[kind] = total
    return out


def measure_live(layout: RootLayout, unfinished: list[int]) -> dict[str, int]:
    """The part that still changes, by kind: unfinished batches' folders and TensorBoard runs, the
    versions run (one appended file), the logs (bounded by their rotation), the standing suites'
    copies (the operator's few files). Bounded by the queue, not the chain."""
    live = shared_live(layout)
    for bid in unfinished:
        folder, curves = batch_live(layout, bid)
        live["batches"] += folder
        live["curves"] += curves
    return live


def batch_live(layout: RootLayout, bid: int) -> tuple[int, int]:
    """An unfinished batch's (folder, TensorBoard run) bytes."""
    name = layout.batch_name(bid)
    return tree_bytes(layout.batches / name), tree_bytes(layout.tensorboard / name)


def shared_live(layout: RootLayout) -> dict[str, int]:
    """The live part that belongs to no batch: the versions run, the logs, the standing suites."""
    live = dict.fromkeys(KINDS, 0)
    live["curves"] = tree_bytes(layout.tensorboard / "versions")
    live["logs"] = tree_bytes(layout.logs)
    live["evalsets"] = tree_bytes(layout.evalsets / "suites")
    return live


def unfinished_ids(layout: RootLayout) -> list[int]:
    """The ids of batches not at their end (the ledger read-only; [] when there is none)."""
    if not layout.db.exists():
        return []
    try:
        from trainerd.supervisor.ledger import Ledger

        led = Ledger.open_readonly(layout.db)
        try:
            return [b.id for b in led.unfinished()]
        finally:
            led.close()
    except Exception:  # a measurement; never fail it for the ledger
        return []


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


# retention's item kinds -> the kinds disk use is reported by
ITEM_KINDS = {"original": "originals", "adapter": "adapters", "batch": "batches", "rejected": "rejected",
              "curves": "curves"}


def apply_plan(layout: RootLayout, items: list[dict[str, Any]], log: Any) -> tuple[int, dict[str, int]]:
    """Remove every item of a retention plan; returns (removed, bytes freed by kind). A path outside
    the root, or one that is gone, is skipped; an error is logged and the rest goes on."""
    root = os.path.realpath(layout.root)
    removed = 0
    freed: dict[str, int] = {}
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
        kind = ITEM_KINDS.get(str(item.get("kind")), str(item.get("kind")))
        freed[kind] = freed.get(kind, 0) + n
        log("retention_removed", path=str(p), kind=item.get("kind"), why=item.get("why"), bytes=n)
    return removed, freed


def write_usage(layout: RootLayout, min_free_bytes: int | None, elapsed_from: float) -> dict[str, Any]:
    """Walk the whole root and write disk-usage.json from scratch: the totals by kind, and the
    settled part (everything less the live part) the daemon's book goes on from."""
    kinds = measure(layout)
    live = measure_live(layout, unfinished_ids(layout))
    now = time.time()
    body = {"measured_at": now, "full_measure_at": now, "measure_s": round(time.monotonic() - elapsed_from, 3),
            "kinds": kinds, "total": sum(kinds.values()), "free_bytes": free_bytes(layout.root),
            "min_free_bytes": min_free_bytes,
            "settled": {k: max(0, kinds[k] - live.get(k, 0)) for k in kinds}}
    atomic_write_json(layout.disk_usage, body, durable=False)  # a figure, corrected daily
    return body


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainerd.supervisor.diskuse", description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--plan", type=Path, help="a retention plan (JSON: items, result) to carry out first")
    p.add_argument("--measure", action="store_true", help="walk the whole root and write disk-usage.json")
    p.add_argument("--min-free-bytes", type=int, default=None)
    args = p.parse_args(argv)
    layout = RootLayout(args.root)
    t0 = time.monotonic()

    def log(event: str, **kw: Any) -> None:
        # JSON lines on stdout: the daemon relays them into its log (trainerd.supervisor.child.Child).
        print(json.dumps({"event": event, "level": "info" if "failed" not in event else "error", **kw}), flush=True)

    removed, freed = 0, {}
    plan = read_json_or_none(args.plan) if args.plan else None
    if plan is not None:
        removed, freed = apply_plan(layout, plan.get("items") or [], log)
        if plan.get("result"):
            atomic_write_json(Path(plan["result"]), {"removed": removed, "freed_bytes": sum(freed.values()),
                                                     "freed_by_kind": freed, "finished_at": time.time()})
    if args.measure:
        usage = write_usage(layout, args.min_free_bytes, t0)
        log("disk_usage_measured", total_bytes=usage["total"], measure_s=usage["measure_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
