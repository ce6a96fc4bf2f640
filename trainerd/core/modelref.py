"""What ``model.path`` names: a model folder, or a Hugging Face Hub model id (stdlib only).

The rule, as transformers' own ``from_pretrained`` reads a name: a value that names an existing
folder (relative to the config file) is that folder; one that starts with ``/``, ``./``, ``../``
or ``~`` is always a folder; anything else of the form ``org/name`` is a hub id.
The config keeps a folder as its absolute path and a hub id as written.

A hub id is fetched once, by ``trainerd run`` at its start (``python -m trainerd.worker.fetch``:
huggingface_hub lives on the worker's side), into the standard Hugging Face cache; after that
every process resolves it to the cached snapshot folder, read here without huggingface_hub (the
supervisor never imports it): ``<cache>/models--org--name/refs/main`` holds the commit of the
snapshot, ``<cache>/models--org--name/snapshots/<commit>/`` its files. So the worker loads a
folder, offline, and the base model's identity (trainerd/supervisor/basemodel.py) is that of the snapshot's
files: a new revision of the model on the hub is a different base, held until ``trainerd rebase``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

__all__ = ["fetch", "hub_cache", "is_hub_id", "local_dir", "resolve_setting", "revision"]

# ``org/name`` (a bare ``name`` is read as a folder: the hub's legacy unprefixed ids all have an
# ``org/`` name now, e.g. openai-community/gpt2).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def _looks_like_a_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value in (".", "..")


def resolve_setting(value: str, base_dir: Path) -> str:
    """``model.path`` as the config keeps it: a folder's absolute path, or a hub id unchanged."""
    candidate = base_dir / os.path.expanduser(value)
    if _looks_like_a_path(value) or candidate.exists() or not _HUB_ID.fullmatch(value):
        return str(candidate.resolve())
    return value


def is_hub_id(value: str) -> bool:
    """Whether a resolved ``model.path`` is a hub id (a folder is absolute by then)."""
    return not os.path.isabs(value) and not _looks_like_a_path(value) and bool(_HUB_ID.fullmatch(value))


def hub_cache() -> Path:
    """The Hugging Face hub cache, found as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def _repo(model_id: str) -> Path:
    return hub_cache() / ("models--" + model_id.replace("/", "--"))


def revision(model_id: str) -> str | None:
    """The commit the cache's ``main`` points at, or None when the model is not cached."""
    try:
        return (_repo(model_id) / "refs" / "main").read_text().strip() or None
    except OSError:
        return None


def local_dir(value: str) -> Path | None:
    """The folder that holds the model: the folder itself, or a hub id's cached snapshot; None when
    there is no such folder, or the hub model is not cached (or has no config.json yet)."""
    if not is_hub_id(value):
        return Path(value) if os.path.isdir(value) else None
    rev = revision(value)
    snap = _repo(value) / "snapshots" / rev if rev else None
    return snap if snap is not None and (snap / "config.json").is_file() else None


def fetch(model_id: str) -> str | None:
    """Make sure a hub model is in the cache: None when it is (now), else why not. The download runs
    in a child, ``python -m trainerd.worker.fetch`` (huggingface_hub is the worker's side's); its
    progress and errors go to our stderr."""
    if local_dir(model_id) is not None:
        return None
    print(f"trainerd: fetching {model_id} from the Hugging Face hub into {hub_cache()}", file=sys.stderr)
    p = subprocess.run([sys.executable, "-m", "trainerd.worker.fetch", model_id], stdout=subprocess.DEVNULL,
                       check=False)
    if p.returncode == 0 and local_dir(model_id) is not None:
        return None
    return "is not in the Hugging Face cache and cannot be fetched now (see above)"
