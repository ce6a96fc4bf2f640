"""The adapter chain's memory: what each batch is judged against, and where each version came from.

- At a batch's first start its inputs are frozen in its folder: ``parent.json`` (the champion it
  continues and is judged against) and ``evalsets.json`` (the evaluation memory's version and
  sha256, and every standing suite, as they are now: a resume, a retry or a new suite cannot
  change the decision). O(1) whatever the chain's length: one version, not N files.
- The evaluation sets are kept by content under ``root/evalsets/``: ``batches/<id>.jsonl`` (the
  new set of every published batch, indexed into the evaluation memory at its publish:
  trainerd/core/evalmemory.py) and ``suites/<name>.<sha12>.jsonl`` (each version of each standing
  suite an operator placed in ``root/evals/``).
- Every published version carries ``lineage.json``: parent, batch, file and sha256, steps,
  tokens, seed and settings, library versions, the gate's figures and thresholds, the held-out loss
  before and after with the change's standard error (trainerd/supervisor/views/heldout.py), the decision
  (blessed / forced / rollback), and its faults: how many it survived, its goodput and what each
  cost. Following ``parent`` always leads back to the base model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from trainerd.supervisor.ledger import goodput
from trainerd.supervisor.views import heldout
from trainerd.core.settings import EvalSettings
from trainerd.core.contract import RootLayout
from trainerd.core.evalmemory import EvalMemory
from trainerd.core.fsutil import atomic_write_json, fsync_dir, open_regular, read_json_or_none
from trainerd.supervisor.ledger import AdapterVersion, Batch

__all__ = ["abandon_sets", "freeze_inputs", "lineage_of", "store_new_set", "write_lineage"]

EVALSETS_VERSION = 2

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
    mem = EvalMemory.open_readonly(layout.evalsets)
    try:
        ref = mem.current() if mem is not None else None
    finally:
        if mem is not None:
            mem.close()
    atomic_write_json(files.evalsets, {"version": EVALSETS_VERSION, "memory": ref.as_dict() if ref else None,
                                       "sets": _snapshot_suites(layout, log), "frozen_at": time.time()})


def measured_tokens(files: Any) -> dict[str, int]:
    """Each example's token count as this batch's evaluation measured it (new set and memory)."""
    ev = read_json_or_none(files.eval_result) or {}
    return {p["hash"]: p["len"] for s in ev.get("sets", []) if s.get("kind") in ("new", "seen", "memory")
            for p in (s.get("candidate") or {}).get("per_example", []) if p.get("len")}


def store_new_set(layout: RootLayout, batch: Batch, ev: EvalSettings, log: Any) -> None:
    """Keep a published batch's new set (its held-out slice, its eval file, or its one "seen"
    content) for every later batch to be judged on too: copied to evalsets/batches/, indexed into
    the evaluation memory, and the memory's next version made (idempotent: a repeat adds nothing)."""
    files = layout.batch(batch.id)
    split = read_json_or_none(files.split) or {}
    new = split.get("new_set")
    dest = layout.evalsets / "batches" / f"{layout.batch_name(batch.id)}.jsonl"
    if new and (files.dir / new).is_file() and not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        _copy_atomic(files.dir / new, dest)
    with EvalMemory.open(layout.evalsets) as mem:
        if dest.exists():
            mem.add_batch(batch.id, seen=split.get("new_set_kind") == "seen", tokens=measured_tokens(files))
        mem.refresh(ev.memory_examples, ev.memory_tokens, log)


def abandon_sets(layout: RootLayout, batch_ids: list[int], ev: EvalSettings, log: Any) -> None:
    """A rollback: these batches' sets leave the memory (made again as it was before them)."""
    with EvalMemory.open(layout.evalsets) as mem:
        mem.abandon(batch_ids)
        mem.refresh(ev.memory_examples, ev.memory_tokens, log)


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
    memory = next((s.get("memory") for s in ev.get("sets", []) if s.get("kind") == "memory"), None)
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
        "memory": memory,
        "heals": read_json_or_none(files.tries),
        "replay": result.get("replay"),
        "heldout": heldout.of_eval(ev),  # before/after on the batch's own new set, with the change's standard error
        "eval_measurements": ev.get("measurements"),
        "champion": (ev.get("champion") or {}).get("path"),
        # How it got through its faults (issue 24): crashes counted by progress, goodput, seconds lost.
        "faults": {"survived": batch.faults_survived, "crashes_without_progress": batch.crashes_without_progress,
                   "attempts": batch.attempts, **goodput.summary(batch.goodput)},
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
