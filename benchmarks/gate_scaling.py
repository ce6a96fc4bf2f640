#!/usr/bin/env python3
"""The gate's cost per batch at N = 10 and N = 10,000 published batches (issue 17): it must not grow.

Builds two synthetic roots as a long-running daemon would have left them: N published batches
in the ledger (one version each), each with its new set of ``--set-lines`` held-out examples kept
under ``evalsets/batches/`` (the layout of every release so far), and the newest version's
adapter (a real one, trained once on the tiny model). The daemon's start upgrades each root in
place (the evaluation memory built from the kept sets: timed, once). Then the real supervisor,
in this process, runs real batches through the real worker (the tiny test model), alternating
the two roots, and measures per batch:

- the supervisor's start-of-batch time (``Attempts.start``: plan, settings, frozen inputs,
  ledger, spawn) and its publish (``Filing.finish_done``: the memory's next version, replay);
- the worker's evaluation preparation: the first split (exclusion lookups in the shared index,
  ``split_s``) and loading + tokenizing what it is judged on (``prepare_s``), from its log;
- the bytes written into the batch folder (split.json, evalsets.json, eval.json, everything).

Target: each at N = 10,000 within 1.2x of N = 10 (medians over ``--rounds`` batches each).

    .venv/bin/python benchmarks/gate_scaling.py                 # N = 10 and 10,000, 3 rounds
    .venv/bin/python benchmarks/gate_scaling.py --n 10 2000 --rounds 2

Writes ``bench-out/gate_scaling.json``. Say which CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, write_json  # noqa: E402
from continual import cpu_name  # noqa: E402
sys.path.insert(0, str(REPO / "tests"))

from trainerd.core import logs  # noqa: E402
from trainerd.core.config import from_dict  # noqa: E402
from trainerd.core.contract import RootLayout  # noqa: E402
from trainerd.supervisor.ledger import Ledger  # noqa: E402

LINE = '{{"prompt": "Q: what is fact {i} of batch {b}? A:", "completion": " answer {b} {i} is {w}."}}'


def settings_for(root: Path, model: Path) -> Any:
    from support.config import config_dict

    return from_dict(config_dict(root, model, train={"epochs": 1, "threads": 1},
                                 supervisor={"stop_grace_s": 10}, metrics={"textfile": ""}))


def build_root(root: Path, n: int, set_lines: int, adapter: Path) -> None:
    """N published batches, their kept new sets, the newest version's adapter (module docstring)."""
    layout = RootLayout(root)
    layout.make()
    led = Ledger(layout.db)
    now = time.time() - n * 60
    with led.transaction() as db:
        for b in range(1, n + 1):
            sha = hashlib.sha256(f"batch {b}".encode()).hexdigest()
            db.execute("INSERT INTO batches(id, name, sha256, size_bytes, state, attempts, adapter_version,"
                       " parent_version, decision, created_at, updated_at, finished_at) VALUES"
                       " (?,?,?,?,?,?,?,?,?,?,?,?)",
                       (b, f"b{b}.jsonl", sha, 1000, "done", 1, b, b - 1 if b > 1 else None, "blessed",
                        now + 60 * b, now + 60 * b, now + 60 * b))
            # Only the newest version's folder is kept (retention.keep_adapters: 1): the others are
            # recorded as removed, as retention leaves them.
            db.execute("INSERT INTO adapter_versions(n, batch_id, path, created_at, parent, kind, removed_at)"
                       " VALUES (?,?,?,?,?,?,?)", (b, b, str(layout.adapter_dir(b)), now + 60 * b,
                                                   b - 1 if b > 1 else None, "blessed", None if b == n else now))
    led.close()
    sets = layout.evalsets / "batches"
    sets.mkdir(parents=True)
    for b in range(1, n + 1):
        (sets / f"{b:06d}.jsonl").write_text("".join(LINE.format(i=i, b=b, w="yes") + "\n" for i in range(set_lines)))
    shutil.copytree(adapter, layout.adapter_dir(n))
    (layout.adapter_dir(n) / "lineage.json").write_text(json.dumps({"version": n, "kind": "blessed"}))
    os.symlink(str(n), layout.current)


def reference_adapter(tmp: Path, model: Path) -> Path:
    """One real adapter of the tiny model (what every synthetic chain's newest version is)."""
    from workerutil import make_batch, run_worker

    batch = make_batch(tmp, model, [LINE.format(i=i, b=0, w="ref") for i in range(40)], name="ref",
                       train={"epochs": 1})
    rc, result, _ = run_worker(batch)
    assert rc == 0, result
    return batch / "final_adapter"


class Timed:
    """Wraps a bound method and keeps each call's seconds."""

    def __init__(self, obj: Any, name: str):
        self.obj, self.name, self.real, self.seconds = obj, name, getattr(obj, name), []
        setattr(obj, name, self)

    def __call__(self, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.real(*a, **kw)
        finally:
            self.seconds.append(time.perf_counter() - t0)


def _eval_side() -> tuple[Timed, Timed]:
    """The evaluation's own share of the start and of the publish: freezing the inputs, and the
    memory's next version (module functions, wrapped where the supervisor calls them)."""
    from trainerd.supervisor import attempts, filing

    return Timed(attempts, "freeze_inputs"), Timed(filing, "store_new_set")


EVAL_SIDE = _eval_side()


class Chain:
    """One root with its supervisor open in this process."""

    def __init__(self, root: Path, model: Path):
        from trainerd.supervisor.daemon import Supervisor

        self.layout = RootLayout(root)
        t0 = time.perf_counter()
        self.sup = Supervisor(settings_for(root, model), log=logs.get_logger(root=root.name))
        self.sup.open()
        self.open_s = time.perf_counter() - t0
        self.start = Timed(self.sup.attempts, "start")
        self.publish = Timed(self.sup.filing, "finish_done")
        self.freeze, self.store = EVAL_SIDE  # shared by both chains: their batches run one at a time
        self.rows: list[dict[str, Any]] = []

    def one_batch(self, k: int) -> dict[str, Any]:
        inbox = self.layout.inbox
        tmp = inbox / f".new{k}.part"
        tmp.write_text("".join(LINE.format(i=i, b=f"new{k}", w="maybe") + "\n" for i in range(120)))
        os.rename(tmp, inbox / f"new{k}.jsonl")
        starts, pubs, freezes, stores = (len(t.seconds) for t in (self.start, self.publish, self.freeze, self.store))
        deadline = time.monotonic() + 600
        while len(self.publish.seconds) == pubs or self.sup.running is not None:
            assert time.monotonic() < deadline, "the batch did not finish in 10 minutes"
            self.sup.tick(time.time())
            if self.sup.running is not None:
                self.sup.running.child.wait(0.05)
            else:
                time.sleep(0.02)
        batch = max(self.sup.ledger.batches(), key=lambda b: b.id)
        assert batch.state.value == "done", (batch.state, batch.last_reason)
        files = self.layout.batch(batch.id)
        ev = json.loads(files.eval_result.read_text())
        split_s = next(e["split_s"] for e in _events(LOG, "data_split")
                       if e.get("batch") == batch.id and e.get("root") == self.layout.root.name)
        sizes = {p.name: p.stat().st_size for p in files.dir.iterdir() if p.is_file()}
        row = {"batch": batch.id, "start_s": self.start.seconds[starts], "publish_s": self.publish.seconds[pubs],
               "freeze_s": self.freeze.seconds[freezes], "memory_update_s": self.store.seconds[stores],
               "split_s": split_s, "prepare_s": ev["prepare_s"], "eval_s": ev["seconds"],
               "memory_examples": next((s["used"] for s in ev["sets"] if s["kind"] == "memory"), 0),
               "bytes": {k: sizes.get(k) for k in ("split.json", "evalsets.json", "eval.json")},
               "folder_bytes": sum(sizes.values())}
        self.rows.append(row)
        return row

    def close(self) -> None:
        self.sup.close()


LOG = Path(tempfile.gettempdir()) / f"gate-scaling-{os.getpid()}.jsonl"  # both chains' log lines


def _events(path: Path, name: str) -> list[dict[str, Any]]:
    out = []
    with open(path) as f:
        for line in f:
            if f'"{name}"' in line:
                out.append(json.loads(line))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs=2, default=[10, 10_000], metavar=("SMALL", "LARGE"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set-lines", type=int, default=64)
    p.add_argument("--out", type=Path, default=REPO / "bench-out" / "gate_scaling.json")
    a = p.parse_args()
    from trainerd.worker.testing import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="gate-scaling-"))
    try:
        model = build_tiny_model(tmp / "model")
        adapter = reference_adapter(tmp / "ref", model)
        chains = {}
        logs.configure(fmt="json", stream=open(os.devnull, "w"), file=LOG)
        for n in a.n:
            t0 = time.perf_counter()
            build_root(tmp / f"n{n}", n, a.set_lines, adapter)
            built = time.perf_counter() - t0
            chains[n] = Chain(tmp / f"n{n}", model)
            print(f"N = {n}: root built in {built:.1f} s; the daemon's start (upgrade in place: the memory "
                  f"built from {n} kept sets) {chains[n].open_s:.2f} s", flush=True)
        for k in range(a.rounds):
            for n, c in chains.items():
                r = c.one_batch(k)
                print(f"  N = {n:>6} batch {r['batch']}: start {r['start_s'] * 1e3:.0f} ms (freezing the inputs "
                      f"{r['freeze_s'] * 1e3:.0f} ms), split {r['split_s'] * 1e3:.0f} ms, "
                      f"eval prepare {r['prepare_s'] * 1e3:.0f} ms (memory {r['memory_examples']} examples), "
                      f"publish {r['publish_s'] * 1e3:.0f} ms (the memory's next version {r['memory_update_s'] * 1e3:.0f} ms), "
                      f"folder {r['folder_bytes']} B {r['bytes']}", flush=True)
        for c in chains.values():
            c.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        LOG.unlink(missing_ok=True)
    small, large = a.n
    med = {n: {k: statistics.median(r[k] for r in c.rows)
               for k in ("start_s", "freeze_s", "split_s", "prepare_s", "eval_s", "publish_s", "memory_update_s",
                         "folder_bytes")}
           for n, c in chains.items()}
    ratios = {k: med[large][k] / med[small][k] for k in med[small] if med[small][k]}
    out = {"cpu": cpu_name(), "n": a.n, "rounds": a.rounds, "set_lines": a.set_lines,
           "open_s": {n: c.open_s for n, c in chains.items()}, "median": med, "ratio_large_to_small": ratios,
           "rows": {n: c.rows for n, c in chains.items()}, "target": "each ratio <= 1.2"}
    print(f"medians, N = {small} -> {large} (ratio; target <= 1.2):")
    for k, v in ratios.items():
        print(f"  {k:<13} {med[small][k]:.4g} -> {med[large][k]:.4g}  x{v:.2f}")
    print(f"cpu: {out['cpu']}")
    write_json(a.out, out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
