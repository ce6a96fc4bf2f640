"""The adapter chain's memory: what each batch is judged against, and where each version came from.

- At a batch's first start its inputs are frozen in its folder: ``parent.json`` (the champion it
  continues and is judged against) and ``evalsets.json`` (every earlier batch's set and every
  standing suite, as they are now: a resume, a retry or a new suite cannot change the decision).
- The evaluation sets are kept by content under ``root/evalsets/``: ``batches/<id>.jsonl`` (the
  new set of every published batch) and ``suites/<name>.<sha12>.jsonl`` (each version of each
  standing suite an operator placed in ``root/evals/``).
- Every published version carries ``lineage.json``: parent, batch, file and sha256, steps,
  tokens, seed and settings, library versions, the gate's figures and thresholds, the held-out loss
  before and after with the change's standard error (trainerd/heldout.py), the decision
  (blessed / forced / rollback). Following ``parent`` always leads back to the base model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from trainerd import heldout
from trainerd.contract import RootLayout
from trainerd.fsutil import atomic_write_json, fsync_dir, open_regular, read_json_or_none
from trainerd.ledger import AdapterVersion, Batch

__all__ = ["freeze_inputs", "lineage_of", "store_new_set", "write_lineage"]

LINEAGE = "lineage.json"


def _sha256(path: Path) -> str:
    with open_regular(path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _copy_atomic(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    with open_regular(src) as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def _snapshot_suites(layout: RootLayout, log: Any) -> list[dict[str, Any]]:
    """Every regular ``root/evals/*.jsonl``, kept by content; what a batch is judged on."""
    out = []
    if not layout.suites.is_dir():
        return out
    store = layout.evalsets / "suites"
    for p in sorted(layout.suites.glob("*.jsonl")):
        if p.name.startswith(".") or p.is_symlink() or not p.is_file():
            continue
        try:
            sha = _sha256(p)
            kept = store / f"{p.stem}.{sha[:12]}.jsonl"
            if not kept.exists():
                store.mkdir(parents=True, exist_ok=True)
                _copy_atomic(p, kept)
                log.info("eval_suite_kept", suite=p.name, sha256=sha, path=str(kept))
        except OSError as e:
            log.warning("eval_suite_unreadable", suite=str(p), error=str(e))
            continue
        out.append({"name": f"suite {p.name}", "kind": "suite", "path": str(kept), "sha256": sha, "batch": None})
    return out


def freeze_inputs(layout: RootLayout, batch: Batch, parent_dir: Path | None, base: dict[str, Any] | None,
                  log: Any, *, rebase: dict[str, Any] | None = None) -> None:
    """At a batch's first start: its parent, its base model and the sets it will be judged on
    (idempotent)."""
    files = layout.batch(batch.id)
    if not files.parent.exists():
        atomic_write_json(files.parent, {"version": batch.parent_version, "base": base, "rebase": rebase,
                                         "path": str(parent_dir) if parent_dir else None})
    if files.evalsets.exists():
        return
    sets = []
    for p in sorted((layout.evalsets / "batches").glob("*.jsonl")):
        if p.stem.isdigit() and int(p.stem) != batch.id:
            sets.append({"name": f"batch {p.stem}", "kind": "earlier", "path": str(p), "sha256": _sha256(p),
                         "batch": int(p.stem)})
    sets += _snapshot_suites(layout, log)
    atomic_write_json(files.evalsets, {"sets": sets, "frozen_at": time.time()})


def store_new_set(layout: RootLayout, batch: Batch) -> None:
    """Keep a published batch's new set (its held-out slice or its eval file) for every later
    batch to be judged on too (idempotent)."""
    files = layout.batch(batch.id)
    split = read_json_or_none(files.split) or {}
    new = split.get("new_set")
    if not new or not (files.dir / new).is_file():
        return
    dest = layout.evalsets / "batches" / f"{layout.batch_name(batch.id)}.jsonl"
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    _copy_atomic(files.dir / new, dest)


def lineage_of(layout: RootLayout, batch: Batch, version: AdapterVersion, *, kind: str) -> dict[str, Any]:
    """lineage.json for ``version``, published from ``batch``."""
    files = layout.batch(batch.id)
    trained = read_json_or_none((layout.rejected_dir(batch.id) if kind == "forced" else files.published)
                                / "trainerd.json") or {}
    settings = read_json_or_none(files.settings) or {}
    ev = read_json_or_none(files.eval_result) or {}
    result = read_json_or_none(files.result) or {}
    gate = json.loads(batch.gate_json) if batch.gate_json else None
    parent = read_json_or_none(files.parent) or {}
    return {
        "version": version.n, "kind": kind, "parent": version.parent, "decision": batch.decision,
        "batch": batch.id, "file": batch.name, "sha256": batch.sha256, "created_at": version.created_at,
        "steps": trained.get("steps"), "tokens": trained.get("tokens"), "seed": trained.get("seed"),
        "base_model": trained.get("base_model"), "base": parent.get("base"), "rebase": parent.get("rebase"),
        "versions": trained.get("versions"),
        "precision": trained.get("precision") or ev.get("precision"),
        "settings": {k: settings.get(k) for k in ("model", "lora", "train", "data", "eval", "gate")},
        "gate": gate,
        "eval": [{"name": s["name"], "kind": s["kind"], "sha256": s["sha256"], "used": s["used"],
                  "champion": s["champion"]["mean_loss"], "candidate": s["candidate"]["mean_loss"]}
                 for s in ev.get("sets", [])],
        "replay": result.get("replay"),
        "heldout": heldout.of_eval(ev),  # before/after on the batch's own new set, with the change's standard error
        "eval_measurements": ev.get("measurements"),
        "champion": (ev.get("champion") or {}).get("path"),
    }


def write_lineage(adapter_dir: Path, lineage: dict[str, Any]) -> None:
    atomic_write_json(adapter_dir / LINEAGE, lineage)


# --- the chain's base model -----------------------------------------------------------------


def chain_base(layout: RootLayout, latest: AdapterVersion | None) -> tuple[dict[str, Any] | None, bool]:
    """(the base model the chain continues on, whether a rebase starts a new chain with the next
    version). After ``trainerd rebase`` it is the one named there; else the newest version's;
    None when nothing says (no version yet, or versions from before bases were recorded)."""
    rebase = read_json_or_none(layout.chain)
    if rebase is not None and (latest is None or (rebase.get("since_version") or 0) >= latest.n):
        return rebase.get("base"), True
    if latest is None:
        return None, False
    lin = read_json_or_none(layout.adapter_dir(latest.n) / LINEAGE) or {}
    return lin.get("base"), False


def write_rebase(layout: RootLayout, base: dict[str, Any], latest: AdapterVersion | None,
                 previous: dict[str, Any] | None) -> None:
    atomic_write_json(layout.chain, {"base": base, "since_version": latest.n if latest else None,
                                     "previous_base": previous, "at": time.time()})
