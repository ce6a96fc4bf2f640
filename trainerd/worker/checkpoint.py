"""Atomic checkpoints: write a temporary folder, fsync it, rename it into place.

A checkpoint is ``checkpoints/step-%08d/`` holding the adapter (safetensors), optimizer,
scheduler and RNG states, and ``state.json`` (written last, so its presence plus every file
named in it marks a complete checkpoint). Resume takes the newest complete one and skips torn
ones (a crash mid-write leaves only a ``.tmp-*`` folder, never a half ``step-*``).

Hazard: saving must not need a large buffer of its own (an OOM while saving loses everything).
The adapter is a few MB; ``torch.save`` to a path streams each tensor record to the file
rather than building the archive in memory; optimizer state is LoRA-sized.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from trainerd import faults
from trainerd.fsutil import free_bytes, publish_dir

STEP_RE = re.compile(r"^step-(\d{8})$")
FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng.pt",
         "state.json")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(ckpt_root: Path, step: int, *, model: Any, optimizer: Any, scheduler: Any,
         rng: dict[str, Any], state: dict[str, Any], keep: int, protect: int | None = None) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # save_pretrained writes adapter_model.safetensors + adapter_config.json (+ README.md).
        model.save_pretrained(str(tmp), safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        faults.die_at("crash_in_checkpoint")
        faults.freeze_at("stop_in_checkpoint", once=ckpt_root.parent / ".fault-stop_in_checkpoint")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "saved_at": time.time()}, indent=2))
        # replace: re-saving the same step (e.g. a stop right after a periodic save)
        publish_dir(tmp, final, replace=True)
    except BaseException:
        # Disk full (or any other failure): the torn folder would hold the space the next
        # attempt needs; the previous complete checkpoint is untouched either way.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(ckpt_root, keep, protect)
    return final


def complete(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, newest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in FILES):
            try:
                json.loads((p / "state.json").read_text())
            except (OSError, ValueError):
                continue
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def prune(ckpt_root: Path, keep: int, protect: int | None = None) -> None:
    """Keep the newest ``keep`` complete checkpoints (and step ``protect``: early stopping's best)."""
    kept = f"step-{protect:08d}" if protect is not None else None
    for old in complete(ckpt_root)[keep:]:
        if old.name != kept:
            shutil.rmtree(old, ignore_errors=True)
    for p in ckpt_root.iterdir():  # torn temporaries of dead processes
        if p.name.startswith(".tmp-step-") and not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def load_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text())


def load_tensors(path: Path, name: str) -> Any:
    # weights_only=True: a checkpoint is data, never code (tensors, dicts, tuples, numbers).
    return torch.load(path / name, weights_only=True)


# --- a full disk -------------------------------------------------------------------------


class DiskFull(Exception):
    """A checkpoint or the adapter could not be written for lack of space (exit 75, ``disk_full``)."""


def no_space(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception chain (safetensors wraps it in its message)."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def disk_full(exc: BaseException, folder: Path, need_bytes: int) -> bool:
    """Was this write failure the file system running out of space?

    torch.save reports a short write as a bare RuntimeError ("unexpected pos ..."), with no
    errno: then judge by the space left once the torn temporary is gone.
    """
    if no_space(exc):
        return True
    free = free_bytes(folder)
    return free is not None and free < max(need_bytes, 1 << 20)


def tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def newest_bytes(ckpt_root: Path) -> int:
    """The size of the newest complete checkpoint (what the next one will roughly need)."""
    newest = complete(ckpt_root)
    return tree_bytes(newest[0]) if newest else 0
