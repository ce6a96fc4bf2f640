#!/usr/bin/env python3
"""Goodput under faults (issue 24): one long batch through the real daemon while a killer SIGKILLs
its worker every T seconds, today's fixed checkpoint interval against ``auto`` (Young/Daly), side
by side in one run; and what a checkpoint of a large adapter costs the step loop, written in the
loop against in the background.

    python benchmarks/goodput.py [OUT.json] [--models tiny,smol] [--periods 30,120,600]
                                 [--faults 4] [--large-state] [--only-large-state]

For each model and period T it runs the batch undisturbed once (the reference: its adapter, its
wall time, its goodput), then ``fixed`` (checkpoint_every_steps 50, checkpoint_every_s 600, the
defaults of earlier releases) and ``auto`` (the new defaults), alternating which goes first. A
killer thread waits T seconds, SIGKILLs the running worker (as an operator's ``kill -9`` or a
preemption would: not the kernel's OOM killer), waits T again, and so on, until the batch is done.
The batch should be long enough for ``--faults`` kills: ``--lines`` sets its size (the reference's
wall time is printed; a contender that finished before its faults says so). ``retry.max_attempts``
is lifted to 1000: a period shorter than a restart would otherwise end in quarantine (correctly: no
attempt can progress), and its goodput is the figure wanted here.

Per contender, from the ledger (trainerd/supervisor/ledger/goodput.py accounts every attempt) and the files:
goodput (useful step time / wall time, the whole batch, load and evaluation included), seconds
lost per fault split into recomputed work, restart and back-off, the restart's phases, checkpoint
overhead (checkpoint stalls / step time), the measured checkpoint cost C, and whether the adapter
is byte-identical to the undisturbed run's. ``steady`` is what a batch long enough to forget its
start converges to at that fault rate: ``(1 - C/I) * (1 - lost per fault / T)``; ``at_3h`` applies
the same model to a fault every 3 hours (Llama 3's rate) with the interval auto would pick there
(lost per fault = restart + back-off + I/2 + one step, conservatively).

``--large-state``: a synthetic LoRA state the size of Llama-3-8B with r=16 on every linear layer
(42 M adapter parameters in fp32 + AdamW's two moments: ~0.5 GB), checkpointed by the worker's own
code (trainerd/worker/checkpoint.py): in the loop (the stall is the whole write) and from a copy in
a background thread (the stall is the copy), while a matmul loop stands in for training steps
(their slowdown during the background write is measured too).

Writes JSON (default bench-out/goodput.json) and prints a table. CPU: see "machine" in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import DEFAULT_MODEL, child_env, synthetic_lines  # noqa: E402

from trainerd.core import cadence  # noqa: E402
from trainerd.core.fsutil import read_json_or_none  # noqa: E402

WEIGHTS = "adapter_model.safetensors"
FIXED = {"checkpoint_every_steps": 50, "checkpoint_every_s": 600}  # the defaults before issue 24
AUTO = {"checkpoint_every_steps": 0, "checkpoint_every_s": "auto"}
# threads: the tiny model gains nothing from a second thread, and on a shared machine a second
# OpenMP thread mostly spins.
SHAPES = {"tiny": {"seq_len": 32, "micro_batch_size": 2, "grad_accum_steps": 2, "threads": 1, "dtype": "float32",
                   "lines": 20000},
          "smol": {"seq_len": 128, "micro_batch_size": 2, "grad_accum_steps": 2, "threads": 2, "dtype": "auto",
                   "lines": 3000}}
# --shape smol=seq_len:64,micro_batch_size:2,grad_accum_steps:1 changes a model's step (a busy machine).


def cpu_name() -> str:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return "?"
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    return name + (" (AMX)" if "amx_tile" in text else "") + (" (avx512_bf16)" if "avx512_bf16" in text else "")


class Run:
    """One daemon on its own root, training one file, with an optional killer."""

    def __init__(self, tmp: Path, name: str, model: Path, shape: dict[str, Any], ckpt: dict[str, Any], data: Path):
        self.root = tmp / name / "root"
        self.root.parent.mkdir(parents=True)
        self.config = tmp / name / "trainerd.yaml"
        t = {k: v for k, v in shape.items() if k not in ("dtype", "lines")}
        self.config.write_text(json.dumps({
            "root": str(self.root), "model": {"path": str(model), "dtype": shape["dtype"]},
            "train": {**t, "warmup_steps": 5, **ckpt},
            "data": {"chunk_lines": 500}, "eval": {"max_tokens": 2048},
            "supervisor": {"settle_s": 0.3, "rescan_s": 1.0}, "disk": {"min_free_bytes": 0},
            # A fault period shorter than a restart leaves no attempt room to progress: by the
            # policy that is a crash loop (quarantined after retry.max_attempts). Lifted here so
            # such a period shows its goodput instead; the back-off stays the default.
            "retry": {"max_attempts": 1000},
            "log": {"format": "json"}}))
        self.data, self.kills, self.missed = data, [], 0
        self.proc: subprocess.Popen | None = None

    def worker_pid(self) -> int | None:
        return ((read_json_or_none(self.root / "daemon.json") or {}).get("running") or {}).get("pid")

    def state(self) -> str | None:
        from trainerd.supervisor.views.status import collect_status

        rows = collect_status(self.root)["batches"]
        return rows[0]["state"] if rows else None

    def go(self, period: float | None, max_wall_s: float, max_faults: int = 0) -> float:
        env = child_env(2)
        env.pop("TRAINERD_WORKER_CMD", None)
        out = open(self.root.parent / "daemon.out", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "trainerd", "run", "--config",
                                      str(self.config)], env=env, stdout=out, stderr=subprocess.STDOUT)
        while not (self.root / "inbox").is_dir():
            time.sleep(0.1)
        t0 = time.monotonic()
        part = self.root / "inbox" / ".a.jsonl.part"
        shutil.copyfile(self.data, part)
        os.rename(part, self.root / "inbox" / "a.jsonl")
        halt = threading.Event()
        killer = threading.Thread(target=self._kill_every, args=(period, halt, max_faults), daemon=True) \
            if period else None
        if killer:
            killer.start()
        try:
            while self.state() not in ("done", "failed", "rejected"):
                if time.monotonic() - t0 > max_wall_s:
                    print(f"  ({self.root.parent.name}: stopped after {max_wall_s:.0f} s, not finished)")
                    break
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {self.proc.returncode}; see {out.name}")
                time.sleep(0.5)
        finally:
            halt.set()
            wall = time.monotonic() - t0
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(300)
            out.close()
        return wall

    def _kill_every(self, period: float, halt: threading.Event, max_faults: int) -> None:
        """SIGKILL the worker T seconds after the previous kill (a fault that finds no worker, in a
        back-off or between attempts, waits for the next one); after ``max_faults`` (0: no limit)
        the batch finishes undisturbed."""
        while not halt.wait(period) and not (max_faults and len(self.kills) >= max_faults):
            pid = None
            while pid is None and not halt.is_set():
                pid = self.worker_pid()
                if pid is None:
                    self.missed += 1
                    halt.wait(0.2)
            if pid is None:
                return
            try:
                os.kill(pid, signal.SIGKILL)
                self.kills.append(time.time())
            except ProcessLookupError:
                pass

    def figures(self, ref_weights: bytes | None, period: float | None) -> dict[str, Any]:
        from trainerd.supervisor.ledger import goodput
        from trainerd.supervisor.ledger import Ledger

        led = Ledger.open_readonly(self.root / "state.db")
        try:
            b = led.batches()[0]
            accounts = [a.account or {} for a in led.attempts(b.id)]
        finally:
            led.close()
        s = goodput.summary(b.goodput)
        steps, step_s = sum(a.get("steps", 0) for a in accounts), sum(a.get("step_s", 0.0) for a in accounts)
        ck_s, ck_n = sum(a.get("checkpoint_s", 0.0) for a in accounts), sum(a.get("checkpoints", 0) for a in accounts)
        restarts = [a for a in accounts if a.get("after_fault")]
        phases: dict[str, list[float]] = {}
        for a in restarts:
            for k, v in (a.get("phases") or {}).items():
                phases.setdefault(k, []).append(v)
        weights = self.root / "adapters" / "1" / WEIGHTS
        out = {"state": b.state.value, "attempts": b.attempts, "kills": len(self.kills),
               "faults_survived": b.faults_survived, "crashes_without_progress": b.crashes_without_progress,
               "total_steps": b.total_steps, "goodput": s["goodput"], "useful_s": s["useful_s"], "wall_s": s["wall_s"],
               "lost_per_fault_s": s["lost_per_fault_s"],
               "restart_s_median": round(statistics.median([a["restart_s"] for a in restarts]), 2) if restarts else None,
               "restart_phases_median": {k: round(statistics.median(v), 2) for k, v in phases.items()},
               "step_s": round(step_s / steps, 4) if steps else None,
               "checkpoints": ck_n, "checkpoint_cost_s": round(ck_s / ck_n, 4) if ck_n else None,
               "checkpoint_overhead": round(ck_s / step_s, 5) if step_s else None,
               "intervals_s": sorted({a.get("checkpoint_interval_s") for a in accounts if a.get("checkpoint_interval_s")}),
               "bit_identical": (weights.read_bytes() == ref_weights) if ref_weights is not None and weights.exists()
               else None}
        if period and out["step_s"] and out["checkpoint_cost_s"]:
            out.update(model(out, period))
        return out


def model(f: dict[str, Any], period: float) -> dict[str, Any]:
    """Steady-state goodput at this fault period, and at one fault every 3 h with auto's interval."""
    c, step = f["checkpoint_cost_s"], f["step_s"]
    lost = f["lost_per_fault_s"]["total"]
    steady = max(0.0, (1 - f["checkpoint_overhead"]) * (1 - lost / period))
    mtbf = 3 * 3600.0
    interval = max(cadence.checkpoint_interval_s(c, mtbf)[0], step)
    per_fault = (f["restart_s_median"] or 0.0) + f["lost_per_fault_s"]["backoff"] + interval / 2 + step
    at_3h = (1 - c / interval) * (1 - per_fault / mtbf)
    return {"steady": round(steady, 4), "at_3h": round(at_3h, 5), "at_3h_interval_s": round(interval, 1)}


def large_state(tmp: Path, rounds: int = 4) -> dict[str, Any]:
    """Checkpoint of a ~0.5 GB LoRA state: in the loop vs from a copy in the background thread."""
    import torch

    from trainerd.worker import checkpoint as ckpt

    torch.manual_seed(0)
    # Llama-3-8B: hidden 4096, 32 layers, kv 1024, MLP 14336; LoRA r=16 on q k v o gate up down.
    shapes = {"q": (4096, 4096), "k": (4096, 1024), "v": (4096, 1024), "o": (4096, 4096),
              "gate": (4096, 14336), "up": (4096, 14336), "down": (14336, 4096)}
    adapter = {}
    for layer in range(32):
        for name, (i, o) in shapes.items():
            adapter[f"base_model.model.layers.{layer}.{name}.lora_A.weight"] = torch.randn(16, i) * 0.01
            adapter[f"base_model.model.layers.{layer}.{name}.lora_B.weight"] = torch.randn(o, 16) * 0.01
    opt = {"state": {k: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(v), "exp_avg_sq": torch.rand_like(v)}
                     for k, v in enumerate(adapter.values())}, "param_groups": [{"lr": 1e-4, "params": list(range(len(adapter)))}]}
    params = sum(v.numel() for v in adapter.values())

    def live() -> ckpt.Snapshot:
        return ckpt.Snapshot(1, adapter, opt, {"last_epoch": 1}, {"torch": torch.get_rng_state()}, {"cursor": {}},
                             "{}", False)

    x = torch.randn(1024, 1024)

    def step() -> float:  # a stand-in for a training step's forward and backward: CPU-bound matmuls
        t = time.perf_counter()
        for _ in range(8):
            x @ x
        return time.perf_counter() - t

    root = tmp / "large" / "checkpoints"
    base = statistics.median(step() for _ in range(10))
    out: dict[str, Any] = {"adapter_params": params, "state_bytes": live().nbytes, "step_s": round(base, 4),
                           "rounds": []}
    staging: list[Any] = [None]
    for r in range(rounds):
        t = time.perf_counter()
        ckpt.write(root, live(), keep=1)  # in the loop: the whole write stalls it
        sync_s = time.perf_counter() - t
        # As worker/saver.py does it: the writer thread copies (into the last copy's buffers from
        # the second round on) and writes; the loop runs the next step's forward and backward, then
        # waits, before the optimizer step, for what is left of the copy.
        copied, done = threading.Event(), {}

        def writer(snap: ckpt.Snapshot = live()) -> None:
            staging[0] = ckpt.stage(snap, staging[0])
            copied.set()
            done["copy_s"] = time.perf_counter() - t0
            ckpt.write(root, staging[0], keep=1)
            done["write_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        th = threading.Thread(target=writer)
        th.start()
        during = [step()]
        t = time.perf_counter()
        copied.wait()
        stall = time.perf_counter() - t
        while th.is_alive():
            during.append(step())
        th.join()
        # Its cost to the loop, as the worker counts it: the wait, and what the steps beside the
        # copy and the write took beyond a step without them.
        cost = stall + sum(max(0.0, d - base) for d in during)
        out["rounds"].append({"in_loop_stall_s": round(sync_s, 3), "background_wait_s": round(stall, 3),
                              "background_cost_s": round(cost, 3),
                              "staging": "allocated" if r == 0 else "reused", "copy_s": round(done["copy_s"], 3),
                              "background_write_s": round(done["write_s"], 3), "steps_during_write": len(during),
                              "step_slowdown_during_write": round(statistics.median(during) / base, 3)})
    steady = out["rounds"][1:] or out["rounds"]  # a long run reuses its staging buffers
    sync = statistics.median(x["in_loop_stall_s"] for x in out["rounds"])
    stall = statistics.median(x["background_cost_s"] for x in steady)
    write = statistics.median(x["background_write_s"] for x in steady)
    for name, c, w in (("in_loop", sync, 0.0), ("background", stall, write)):
        interval, rule = cadence.checkpoint_interval_s(c, 3 * 3600.0, write_s=w)
        out[name] = {"cost_s": c, "interval_at_3h_s": round(interval, 1), "rule": rule,
                     "overhead_at_3h": round(c / interval, 5)}
    shutil.rmtree(tmp / "large", ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=str(REPO / "bench-out" / "goodput.json"))
    ap.add_argument("--models", default="tiny,smol", help="tiny (the test model) and/or smol (SmolLM2-135M)")
    ap.add_argument("--periods", default="30,120,600", help="seconds between kills, comma-separated")
    ap.add_argument("--lines", type=str, default="", help="lines per model, e.g. tiny=20000,smol=3000")
    ap.add_argument("--max-wall-s", type=float, default=7200.0, help="give up on a run after this long")
    ap.add_argument("--max-faults", type=int, default=0, help="stop killing after this many (0: until done)")
    ap.add_argument("--threads", type=str, default="", help="torch threads per model, e.g. smol=1")
    ap.add_argument("--shape", action="append", default=[],
                    help="a model's step, e.g. smol=seq_len:64,micro_batch_size:2,grad_accum_steps:1")
    ap.add_argument("--large-state", action="store_true", help="also measure the ~0.5 GB checkpoint")
    ap.add_argument("--only-large-state", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folders")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="trainerd-goodput-"))
    results: dict[str, Any] = {"machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
                               "argv": sys.argv[1:], "runs": []}
    sizes = dict(kv.split("=") for kv in args.lines.split(",") if kv)
    for kv in (x for x in args.threads.split(",") if x):
        name, n = kv.split("=")
        SHAPES[name]["threads"] = int(n)
    for spec in args.shape:
        name, kvs = spec.split("=", 1)
        SHAPES[name].update({k: int(v) for k, v in (x.split(":") for x in kvs.split(","))})
    try:
        if args.large_state or args.only_large_state:
            results["large_state"] = large_state(tmp)
            print(json.dumps(results["large_state"], indent=1))
        for name in ([] if args.only_large_state else args.models.split(",")):
            results["runs"] += bench_model(tmp, name, int(sizes.get(name, SHAPES[name]["lines"])),
                                           [float(p) for p in args.periods.split(",")], args.max_wall_s,
                                           args.max_faults)
            save(args.out, results)
    finally:
        results["machine"]["loadavg_end"] = os.getloadavg()
        save(args.out, results)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print_table(results)
    print(f"written: {args.out}")
    return 0


def bench_model(tmp: Path, name: str, lines: int, periods: list[float], max_wall_s: float,
                max_faults: int) -> list[dict[str, Any]]:
    if name == "tiny":
        from trainerd.worker.testing import build_tiny_model

        model = build_tiny_model(tmp / "tiny-model")
    else:
        model = DEFAULT_MODEL
    shape = SHAPES[name]
    data = tmp / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in synthetic_lines(lines, seed=24)) + "\n")
    ref = Run(tmp, f"{name}-reference", model, shape, AUTO, data)
    wall = ref.go(None, max_wall_s)
    ref_weights = (ref.root / "adapters" / "1" / WEIGHTS).read_bytes()
    out = [{"model": name, "period_s": None, "contender": "undisturbed", "run_wall_s": round(wall, 1),
            "loadavg": os.getloadavg(), **ref.figures(None, None)}]
    print(f"{name}: undisturbed {wall:.0f} s, goodput {out[0]['goodput']}, {out[0]['total_steps']} steps")
    for i, period in enumerate(periods):
        order = [("fixed", FIXED), ("auto", AUTO)]
        for contender, ckpt in (order if i % 2 == 0 else order[::-1]):
            run = Run(tmp, f"{name}-{int(period)}-{contender}", model, shape, ckpt, data)
            w = run.go(period, max_wall_s, max_faults)
            row = {"model": name, "period_s": period, "contender": contender, "run_wall_s": round(w, 1),
                   "loadavg": os.getloadavg(), "missed_kill_polls": run.missed, **run.figures(ref_weights, period)}
            out.append(row)
            print(f"{name} T={period:.0f} {contender}: {row['kills']} kills ({row['faults_survived']} survived), "
                  f"goodput {row['goodput']}, lost/fault "
                  f"{row['lost_per_fault_s']}, bit-identical {row['bit_identical']}")
    return out


def save(path: str, results: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, p)


def print_table(results: dict[str, Any]) -> None:
    print(f"\nCPU: {results['machine']['cpu']}, loadavg {results['machine']['loadavg_start']}")
    head = (f"{'model':<5} {'T s':>5} {'who':<11} {'kills':>5} {'goodput':>7} {'steady':>7} {'@3h':>7} {'lost/f':>6} "
            f"{'recomp':>6} {'restart':>7} {'backoff':>7} {'ckpt ovh':>8} {'C s':>6} {'step s':>6} {'same':>5}")
    print(head)
    for r in results["runs"]:
        lost = r.get("lost_per_fault_s") or {}
        print(f"{r['model']:<5} {r['period_s'] or '-':>5} {r['contender']:<11} {r['kills']:>5} {r['goodput'] or '-':>7} "
              f"{r.get('steady', '-'):>7} {r.get('at_3h', '-'):>7} {lost.get('total', '-'):>6} {lost.get('recomputed', '-'):>6} "
              f"{lost.get('restart', '-'):>7} {lost.get('backoff', '-'):>7} {r['checkpoint_overhead'] or '-':>8} "
              f"{r['checkpoint_cost_s'] or '-':>6} {r['step_s'] or '-':>6} {str(r['bit_identical']):>5}")
    if "large_state" in results:
        ls = results["large_state"]
        print(f"large state {ls['state_bytes'] / 2**20:.0f} MiB: cost to the loop in the loop {ls['in_loop']['cost_s']} s, "
              f"in the background {ls['background']['cost_s']} s (write {ls['rounds'][-1]['background_write_s']} s, "
              f"steps x{ls['rounds'][-1]['step_slowdown_during_write']} meanwhile); interval at a fault every 3 h: "
              f"{ls['in_loop']['interval_at_3h_s']} s vs {ls['background']['interval_at_3h_s']} s")


if __name__ == "__main__":
    sys.exit(main())
