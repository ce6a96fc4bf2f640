"""``trainerd history``: the adapter chain, read: every published version with its parent, batch,
steps, tokens and gate figures, and every candidate the gate rejected, with the reason.

Only reads (the ledger read-only, the lineage.json of each version it shows): the newest entries by
default, every one with ``--all`` (paged; trainerd/supervisor/views/paging.py).
"""

from __future__ import annotations

import argparse
import heapq
import json
import sqlite3
import sys
import time
from collections.abc import Iterator
from typing import Any

from trainerd.core.contract import ExitCode, RootLayout
from trainerd.core.fsutil import read_json_or_none
from trainerd.supervisor.ledger import goodput
from trainerd.supervisor.views import heldout
from trainerd.supervisor.views.paging import DEFAULT_LIMIT, PAGE

__all__ = ["cmd_history", "collect_history", "history_totals"]


def _fmt_loss(pair: Any, fig: dict[str, Any] | None = None) -> str:
    """``3.214->0.912 ±0.081 n12``: held-out loss before -> after, the change's standard error, examples."""
    if fig and fig.get("change") is not None:
        se = f" ±{fig['stderr']:.3f}" if fig.get("stderr") is not None else ""
        return f"{fig['before']:.3f}->{fig['after']:.3f}{se} n{fig.get('examples')}"
    if not pair or pair[0] is None or pair[1] is None:
        return "-"
    return f"{pair[0]:.3f}->{pair[1]:.3f}"


def _gate_summary(gate: dict[str, Any] | None) -> tuple[Any, Any]:
    """(new set [champion, candidate], worst history group {set, change, allowed}) from a gate decision."""
    if not gate:
        return None, None
    sets = gate.get("sets") or []
    new = next((s for s in sets if s["kind"] in ("new", "seen")), None)
    worst = (gate.get("history") or {}).get("worst")
    if worst is None and "history" not in gate:  # a decision from before the evaluation memory
        older = [s for s in sets if s["kind"] not in ("new", "seen")]
        worst = max(older, key=lambda s: s["change"]) if older else None
        worst = {"set": worst["name"], "change": worst["change"], "allowed": worst["allowed"]} if worst else None
    return ([new["champion"], new["candidate"]] if new else None,
            {"set": worst["set"], "change": worst["change"], "allowed": worst["allowed"]} if worst else None)


def _gate_words(gate: dict[str, Any] | None, heals: int, batch: int, *, published: bool = True) -> str | None:
    """What the decision cannot show in its columns: not gated and why; the healing tries."""
    parts = []
    if gate and gate.get("verdict") == "ungated":
        parts.append(f"not gated: {gate.get('note')}")
    if heals:
        tries = f"{heals} healing tr{'y' if heals == 1 else 'ies'}"
        parts.append(f"{'healed after ' + tries if published else tries + ' did not heal it'} "
                     f"(batches/{batch:06d}/tries.json)")
    return "; ".join(parts) or None


def _version_row(layout: RootLayout, v: Any, b: Any) -> dict[str, Any]:
    lin = read_json_or_none(layout.adapter_dir(v.n) / "lineage.json") or {}
    gate = json.loads(b.gate_json) if b and b.gate_json and v.kind != "rollback" else None
    new, worst = _gate_summary(gate)
    heals = b.heals if b and v.kind != "rollback" else 0
    # An ungated publish is a version of kind blessed in the ledger: the table says ungated.
    kind = "ungated" if v.kind == "blessed" and b is not None and b.decision == "ungated" else v.kind
    return {"version": v.n, "kind": kind, "parent": v.parent, "rollback_of": v.source,
            "batch": v.batch_id, "file": b.name if b else None, "steps": lin.get("steps"),
            "tokens": lin.get("tokens"), "new_set_loss": new, "worst_earlier": worst,
            "heldout": heldout.of_version(layout, lin, v.batch_id) if v.kind != "rollback" else None,
            "decision": v.kind if v.kind != "blessed" else (b.decision if b else "blessed"),
            "gated": None if gate is None else gate.get("verdict", "blessed") != "ungated",
            "heals": heals, "note": _gate_words(gate, heals, v.batch_id), "at": v.created_at,
            **_faults(b if v.kind != "rollback" else None)}


def _rejected_row(layout: RootLayout, b: Any) -> dict[str, Any]:
    new, worst = _gate_summary(json.loads(b.gate_json) if b.gate_json else None)
    res = read_json_or_none(layout.batch(b.id).result) or {}
    return {"version": None, "kind": "rejected", "parent": b.parent_version, "rollback_of": None,
            "batch": b.id, "file": b.name, "steps": res.get("step"), "tokens": res.get("tokens"),
            "new_set_loss": new, "worst_earlier": worst, "decision": "rejected", "gated": True,
            "heldout": heldout.of_eval(read_json_or_none(layout.batch(b.id).eval_result)),
            "heals": b.heals, "note": _gate_words(None, b.heals, b.id, published=False),
            "reason": b.last_reason, "at": b.finished_at, **_faults(b)}


def collect_history(root: Any, *, limit: int | None = DEFAULT_LIMIT) -> list[dict[str, Any]] | Iterator[dict[str, Any]]:
    """The newest ``limit`` entries of the chain (versions and rejected candidates), oldest first:
    a page of the ledger and one lineage.json per entry shown. ``limit`` None: every entry, read a
    page at a time as the iterator is consumed (``--all``)."""
    from trainerd.supervisor.ledger import Ledger
    from trainerd.supervisor.ledger.states import BatchState

    layout = RootLayout(root)
    if not layout.db.exists():
        return []
    if limit is None:
        return _every_entry(layout)
    led = Ledger.open_readonly(layout.db)
    try:
        versions = led.versions(newest_first=True, limit=limit)
        rejected = led.recently_finished(limit, BatchState.REJECTED)
        batches = led.batches_by_id({v.batch_id for v in versions})
    finally:
        led.close()
    rows = [_version_row(layout, v, batches.get(v.batch_id)) for v in versions]
    rows += [_rejected_row(layout, b) for b in rejected]
    rows.sort(key=lambda r: r["at"] or 0)
    return rows[-limit:] if limit else []


def _faults(b: Any) -> dict[str, Any]:
    """The batch's faults survived and its goodput (issue 24), for a history row."""
    if b is None:
        return {"faults_survived": None, "crashes_without_progress": None, "goodput": None}
    return {"faults_survived": b.faults_survived, "crashes_without_progress": b.crashes_without_progress,
            "goodput": goodput.goodput(b.goodput)}


def _every_entry(layout: RootLayout) -> Iterator[dict[str, Any]]:
    """Every version and rejected candidate, oldest first, merged as both are read in pages."""
    from trainerd.supervisor.ledger import Ledger
    from trainerd.supervisor.ledger.states import BatchState

    led = Ledger.open_readonly(layout.db)

    def versions() -> Iterator[dict[str, Any]]:
        after = 0
        while page := led.versions(limit=PAGE, before=None, after=after):
            batches = led.batches_by_id({v.batch_id for v in page})
            yield from (_version_row(layout, v, batches.get(v.batch_id)) for v in page)
            after = page[-1].n

    def rejected() -> Iterator[dict[str, Any]]:
        offset = 0
        while page := led.recently_finished(PAGE, BatchState.REJECTED, offset=offset, oldest_first=True):
            yield from (_rejected_row(layout, b) for b in page)
            offset += len(page)

    try:
        yield from heapq.merge(versions(), rejected(), key=lambda r: r["at"] or 0)
    finally:
        led.close()


def history_totals(root: Any) -> dict[str, int]:
    """The chain's totals from the ledger's running totals: versions by kind (blessed and ungated
    apart), removed, rejected."""
    from trainerd.supervisor.ledger import Ledger

    layout = RootLayout(root)
    if not layout.db.exists():
        return {}
    led = Ledger.open_readonly(layout.db)
    try:
        totals = {**led.totals("versions:"), "rejected": led.counts().get("rejected", 0)}
        # An ungated publish is a version of kind blessed: the decisions' total tells them apart.
        ungated = min(led.totals("decisions:").get("ungated", 0), totals.get("blessed", 0))
        if ungated:
            totals["blessed"] = totals.get("blessed", 0) - ungated
            totals["ungated"] = ungated
        return totals
    except sqlite3.Error:
        return {}
    finally:
        led.close()


def _render(rows: Any, totals: dict[str, int] | None = None, limit: int | None = None) -> str:
    out = [f"{'version':>7} {'kind':<9} {'parent':>6} {'batch':>6} {'steps':>6} {'tokens':>8} "
           f"{'held-out loss (±se, n)':<27} {'worst earlier':<22} {'faults/goodput':<14} {'when':<16} file"]
    for r in rows:
        worst = r["worst_earlier"]
        w = f"{worst['change']:+.3f} ({worst['set']})"[:22] if worst else "-"
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["at"])) if r["at"] else "-"
        parent = "base" if r["parent"] is None and r["kind"] != "rollback" else str(r["parent"])
        if r["kind"] == "rollback":
            parent = f"={r['rollback_of']}"
        fg = "-" if r.get("faults_survived") is None else \
            f"{r['faults_survived']}/{r['goodput']:.3f}" if r.get("goodput") is not None else f"{r['faults_survived']}/-"
        out.append(f"{r['version'] if r['version'] is not None else '-':>7} {r['kind']:<9} {parent:>6} "
                   f"{r['batch'] or '-':>6} {r['steps'] if r['steps'] is not None else '-':>6} "
                   f"{r['tokens'] if r['tokens'] is not None else '-':>8} {_fmt_loss(r['new_set_loss'], r.get('heldout')):<27} "
                   f"{w:<22} {fg:<14} {when:<16} {r['file'] or ''}")
        for line in (r.get("reason"), r.get("note")):
            if line:
                out.append(f"{'':>8}{line}")
    if totals:
        kinds = ", ".join(f"{totals[k]} {k}" for k in ("blessed", "ungated", "forced", "rollback") if totals.get(k))
        n = sum(totals.get(k, 0) for k in ("blessed", "ungated", "forced", "rollback"))
        line = f"totals  {n} version(s)" + (f" ({kinds})" if kinds else "") + f", {totals.get('rejected', 0)} rejected"
        if totals.get("removed"):
            line += f", {totals['removed']} folder(s) removed by retention"
        if limit is not None and n + totals.get("rejected", 0) > limit:
            line += f"; the newest {limit} shown (--limit N, --all)"
        out.append(line)
    return "\n".join(out)


def cmd_history(args: argparse.Namespace) -> int:
    from trainerd.supervisor.views import paging

    root, limit = args.layout.root, paging.limit_of(args)
    try:
        rows = collect_history(root, limit=limit)
        if args.json:
            paging.dump_json(rows, sys.stdout)  # --all: written as read
            print()
        else:
            print(_render(rows, history_totals(root), limit))
    except sqlite3.Error as e:
        print(f"trainerd history: the ledger cannot be read: {e}", file=sys.stderr)
        return ExitCode.FAIL
    return ExitCode.OK
