"""Atomic checkpoints: write a temporary folder, fsync it, rename it into place.

A checkpoint is ``checkpoints/step-%08d/`` holding the adapter (safetensors), optimizer,
scheduler and RNG states, and ``state.json`` (written last, so its presence plus every file
named in it marks a complete checkpoint). Resume takes the newest complete one and skips torn
ones (a crash mid-write leaves only a ``.tmp-*`` folder, never a half ``step-*``).

A checkpoint is taken (:func:`snapshot`) between two optimizer steps and written
(:func:`write`) either at once in the step loop, or, for a large state, by a background thread
from a private copy (worker/saver.py) while training goes on: the rules above hold either way.

Hazard: saving must not need a large buffer of its own (an OOM while saving loses everything).
The adapter is a few MB; ``torch.save`` to a path streams each tensor record to the file
rather than building the archive in memory; optimizer state is LoRA-sized. A background write
holds one copy of the adapter and optimizer state (CPU memory) until it is on disk.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainerd.core import faults
from trainerd.core.fsutil import free_bytes, publish_dir

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


@dataclass
class Snapshot:
    """What a checkpoint holds, taken between two optimizer steps: the adapter's tensors, the
    optimizer and scheduler states, the RNG and ``state.json``'s body. ``copied``: every tensor is
    a private CPU copy, so a background thread may write it while training goes on; otherwise the
    tensors are the live ones and it must be written before the next step."""

    step: int
    adapter: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    state: dict[str, Any]
    config_json: str              # adapter_config.json, as peft writes it
    copied: bool

    @property
    def nbytes(self) -> int:
        return state_bytes(self.adapter) + state_bytes(self.optimizer)


def state_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def _copied(obj: Any, into: Any = None) -> Any:
    """A deep copy with every tensor in CPU memory. ``into``: an earlier copy of the same state whose
    tensors are reused (``copy_``): no allocation and no page faults, the one cost left is the memcpy
    (a GPU tensor's first copy goes to pinned memory, so later device-to-host copies run at full speed)."""
    if isinstance(obj, torch.Tensor):
        src = obj.detach()
        if isinstance(into, torch.Tensor) and into.shape == src.shape and into.dtype == src.dtype \
                and into.device.type == "cpu":
            return into.copy_(src)
        if src.device.type == "cuda":
            return torch.empty(src.shape, dtype=src.dtype, pin_memory=True).copy_(src)
        return src.to("cpu", copy=True)
    if isinstance(obj, dict):
        prev = into if isinstance(into, dict) else {}
        return {k: _copied(v, prev.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        prev = into if isinstance(into, (list, tuple)) and len(into) == len(obj) else [None] * len(obj)
        out = [_copied(v, p) for v, p in zip(obj, prev)]
        return out if isinstance(obj, list) else tuple(out)
    return copy.deepcopy(obj)


def snapshot(step: int, *, model: Any, optimizer: Any, scheduler: Any, rng: dict[str, Any],
             state: dict[str, Any], copy_tensors: bool, staging: Snapshot | None = None) -> Snapshot:
    """The checkpoint of ``step``, taken now: the live tensors (write it before the next optimizer
    step), or with ``copy_tensors`` a private copy (see :func:`stage`)."""
    from peft import get_peft_model_state_dict

    # The same tensors peft's save_pretrained writes (the trainable adapter weights, by name). The
    # scheduler's and the RNG's states are small: copied now, whatever happens to the rest.
    adapter = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    snap = Snapshot(step, adapter, optimizer.state_dict(), copy.deepcopy(scheduler.state_dict()), rng, dict(state),
                    _config_json(model), False)
    return stage(snap, staging) if copy_tensors else snap


def stage(live: Snapshot, staging: Snapshot | None = None) -> Snapshot:
    """A copy of ``live``'s tensors that training cannot change, into the buffers of ``staging`` (an
    earlier copy that is on disk by now) where they fit. Must finish before the next optimizer step."""
    return dataclasses.replace(live, adapter=_copied(live.adapter, staging.adapter if staging else None),
                               optimizer=_copied(live.optimizer, staging.optimizer if staging else None), copied=True)


def _config_json(model: Any) -> str:
    """adapter_config.json as ``PeftConfig.save_pretrained`` writes it (sets as lists), marked for
    inference as peft marks a saved adapter (a resume loads it trainable all the same)."""
    cfg = model.peft_config["default"].to_dict()
    cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}
    cfg["inference_mode"] = True
    return json.dumps(cfg, indent=2, sort_keys=True, default=str)


def write(ckpt_root: Path, snap: Snapshot, *, keep: int, protect: int | None = None) -> Path:
    """Write ``snap`` as ``checkpoints/step-%08d`` (tmp folder, every file fsynced, rename) and
    prune the older ones. Safe in a background thread for a copied snapshot."""
    from safetensors.torch import save_file

    ckpt_root.mkdir(parents=True, exist_ok=True)
    step = snap.step
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(snap.adapter, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(snap.config_json)
        torch.save(snap.optimizer, tmp / "optimizer.pt")
        faults.die_at("crash_in_checkpoint")
        faults.freeze_at("stop_in_checkpoint", once=ckpt_root.parent / ".fault-stop_in_checkpoint")
        torch.save(snap.scheduler, tmp / "scheduler.pt")
        torch.save(snap.rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**snap.state, "step": step, "saved_at": time.time()}, indent=2))
        # replace: re-saving the same step (e.g. a stop right after a periodic save)
        publish_dir(tmp, final, replace=True)
    except BaseException:
        # Disk full (or any other failure): the torn folder would hold the space the next
        # attempt needs; the previous complete checkpoint is untouched either way.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(ckpt_root, keep, protect)
    return final


def save(ckpt_root: Path, step: int, *, model: Any, optimizer: Any, scheduler: Any,
         rng: dict[str, Any], state: dict[str, Any], keep: int, protect: int | None = None) -> Path:
    """Snapshot and write now, in this thread (no copies)."""
    snap = snapshot(step, model=model, optimizer=optimizer, scheduler=scheduler, rng=rng, state=state,
                    copy_tensors=False)
    return write(ckpt_root, snap, keep=keep, protect=protect)


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


def load_adapter(model: Any, path: Path) -> None:
    """Put a checkpoint's adapter weights into ``model`` (early stopping's best step)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))


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
