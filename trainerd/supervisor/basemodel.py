"""Which base model a LoRA adapter belongs to: an identity cheap to compute, without torch.

An adapter is a delta on one base model; continued on another it produces nonsense that the
next steps would happily publish. The identity is the sha256 of: the model's config.json, and
for every weight file (``*.safetensors``, ``*.bin``, ``*.gguf``, ``*.pt``) its name, its size
and a sample of its content (64 KiB at its start, middle and end). Reading ~200 KiB per file
tells a different model, or different weights under the same config, in milliseconds.

A hub id (``model.path: org/name``) is identified by the files of its cached snapshot, the same
way: the same files in a folder are the same base; a new revision on the hub is another base.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from trainerd.core.modelref import is_hub_id, local_dir

__all__ = ["Watched", "identity", "short"]

_WEIGHTS = ("*.safetensors", "*.bin", "*.gguf", "*.pt")
_SAMPLE = 64 << 10


def _sample(path: Path, size: int, h: Any) -> None:
    with open(path, "rb") as f:
        for at in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
            f.seek(at)
            h.update(f.read(_SAMPLE))


def identity(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"id", "path", "files"}``: ``id`` is what compares (a model moved to another folder keeps
    it); OSError when the folder cannot be read."""
    d = Path(model_dir)
    h = hashlib.sha256()
    try:
        cfg = json.loads((d / "config.json").read_text())
        h.update(json.dumps(cfg, sort_keys=True).encode())
    except ValueError as e:
        raise OSError(f"{d / 'config.json'}: not JSON: {e}") from e
    files = []
    for pattern in _WEIGHTS:
        for p in sorted(d.glob(pattern)):
            size = p.stat().st_size
            h.update(f"{p.name}\0{size}\0".encode())
            _sample(p, size, h)
            files.append({"name": p.name, "bytes": size})
    return {"id": h.hexdigest(), "path": str(d.resolve()), "files": files,
            "model_type": cfg.get("model_type"), "architectures": cfg.get("architectures")}


def short(ident: dict[str, Any] | None) -> str:
    """``<path> (<first 12 hex>)`` (``<org/name>@<revision> (...)`` for a hub model) for a log line or a status."""
    if not ident:
        return "unknown"
    where = f"{ident['hub_id']}@{str(ident.get('revision'))[:12]}" if ident.get("hub_id") else ident.get("path")
    return f"{where} ({str(ident.get('id'))[:12]})"


class Watched:
    """The identity of the configured base model (``model.path``: a folder, or a hub id whose
    cached snapshot is read: trainerd/core/modelref.py), recomputed only when its files change (a stat
    of each per call), or None while it cannot be read."""

    def __init__(self, model_path: str | os.PathLike[str]):
        self.value = os.fspath(model_path)
        self._key: tuple | None = None
        self._ident: dict[str, Any] | None = None

    @staticmethod
    def _stat_key(d: Path) -> tuple:
        out: list[Any] = [str(d)]  # a hub model's new revision is another snapshot folder
        for pattern in ("config.json", *_WEIGHTS):
            for p in sorted(d.glob(pattern)):
                st = p.stat()
                out.append((p.name, st.st_size, st.st_mtime_ns, st.st_ino))
        return tuple(out)

    def get(self) -> dict[str, Any] | None:
        d = local_dir(self.value)
        try:
            if d is None:
                raise OSError(f"{self.value}: not in the Hugging Face cache")
            key = self._stat_key(d)
            if key != self._key or self._ident is None:
                ident = identity(d)
                if is_hub_id(self.value):
                    ident.update(hub_id=self.value, revision=d.name)
                self._ident, self._key = ident, key
        except OSError:
            self._ident = self._key = None
        return self._ident
