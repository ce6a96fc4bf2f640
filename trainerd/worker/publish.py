"""The batch's adapter, written complete before it appears where the supervisor looks for it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from trainerd.core import faults
from trainerd.core.fsutil import atomic_write_json, publish_dir
from trainerd.worker import checkpoint as ckpt
from trainerd.worker.checkpoint import DiskFull

__all__ = ["library_versions", "write_adapter"]


def library_versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def write_adapter(model: Any, dest: Path, meta: dict[str, Any], checkpoints: Path, log: Any) -> Path:
    """``model``'s adapter and ``meta`` (trainerd.json) at ``dest``, via a temporary folder and one
    rename: never half an adapter at ``dest``; DiskFull when there is no room for it."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    # Half adapters of earlier attempts that died mid-write (SIGKILL, power loss): never
    # visible (they were never renamed), but they hold space; only this worker writes here.
    for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        atomic_write_json(tmp / "trainerd.json", {**meta, "versions": library_versions()})
        faults.die_at("crash_in_publish")
        publish_dir(tmp, dest, replace=True)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave half an adapter holding the space
        if ckpt.disk_full(e, dest.parent, ckpt.newest_bytes(checkpoints) // 2):
            raise DiskFull(f"cannot write the adapter to {dest}: {e}") from e
        raise
    log.info("adapter_written", path=str(dest), steps=meta.get("steps"))
    return dest
