#!/usr/bin/env python3
"""Supervisor benchmark: its own cost idle and while a worker trains, `trainerd status` latency,
and how long a file waits between landing in the inbox and the worker's first step.

    python benchmarks/supervisor_bench.py [OUT.json] [--idle-s 30] [--lines 1200] [--metrics-rows 2000]

Runs the real daemon (`python -m trainerd run`) with the real worker on the tiny test model
(trainerd.worker.testing) in a temporary root. Targets (issue 3): supervisor RSS <= 40 MB and
<= 0.1% of a core idle; status <= 0.2 s. Prints the figures and writes them as JSON
(default bench-out/supervisor_bench.json).

Idle is measured side by side: two daemons at once, one with the Prometheus textfile on (the
default, every 5 s) and one with ``metrics.textfile: ""``, so the machine's noise lands on both.
The training part runs with metrics on. ``metrics_write`` times the metrics' own work in-process
(gather + write) on a ledger of ``--metrics-rows`` batches with two attempts each.

CPU is measured from /proc (psutil cpu_times of the daemon process only, not the worker).
The tiny model steps ~20 times a second and the worker logs every step, so "while training"
includes relaying ~20 log lines/s; a real model logs one line every few seconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    e.pop("TRAINERD_WORKER_CMD", None)
    return e


def ts(s: str) -> float:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def sample_lines(n: int, start: int = 0) -> list[str]:
    from workerutil import sample_lines as sl

    return sl(n, start=start)


def status_times(root: Path, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trainerd", "status", "--root", str(root)], env=env(),
                       stdout=subprocess.DEVNULL, check=True)
        out.append(time.perf_counter() - t)
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
        flags = open("/proc/cpuinfo").read()
        return name + (" (AMX)" if "amx_tile" in flags else "") + (" (avx512_bf16)" if "avx512_bf16" in flags else "")
    except OSError:
        return "?"


def start_daemon(tmp: Path, name: str, model: Path, *, metrics: bool) -> tuple[subprocess.Popen, Any]:
    root = tmp / name
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(json.dumps({
        "root": str(root), "model": {"path": str(model)},
        "train": {"seq_len": 32, "micro_batch_size": 2, "grad_accum_steps": 2, "checkpoint_every_steps": 20,
                  "threads": 1, "warmup_steps": 2},
        "data": {"chunk_lines": 64},
        "supervisor": {"settle_s": 0.2, "rescan_s": 5.0, "stop_grace_s": 60},
        "disk": {"min_free_bytes": 0},
        "metrics": {} if metrics else {"textfile": ""},
    }))
    out_log = open(tmp / f"{name}.out", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "trainerd", "run", "--config", str(cfg)], env=env(),
                            stdout=out_log, stderr=subprocess.STDOUT)
    return proc, out_log


def wait_ready(proc: subprocess.Popen, root: Path, tmp: Path) -> None:
    log_path = root / "logs" / "trainerd.jsonl"
    while True:
        try:
            if '"supervisor_ready"' in log_path.read_text():
                return
        except FileNotFoundError:
            pass
        assert proc.poll() is None, f"daemon on {root} exited {proc.returncode}"
        time.sleep(0.01)


def metrics_file_age(root: Path) -> float | None:
    """Seconds since the textfile was last written (<= metrics.interval_s while the daemon idles)."""
    p = root / "metrics" / "trainerd.prom"
    return round(time.time() - p.stat().st_mtime, 2) if p.exists() else None


def metrics_write_cost(tmp: Path, rows: int) -> dict:
    """Metrics.tick's gather + write, in-process, on a ledger of ``rows`` batches x 2 attempts:
    a periodic write (the derived totals cached) and a write after a ledger change (recomputed)."""
    from types import SimpleNamespace

    from trainerd.config import from_dict
    from trainerd.contract import RootLayout
    from trainerd.ledger import Ledger
    from trainerd.memguard import MemoryGuard
    from trainerd.metrics import Metrics

    settings = from_dict({"root": str(tmp / "root")})
    layout = RootLayout(settings.root)
    layout.make()
    led = Ledger(layout.db)
    result = {"status": "done", "tokens": 12345, "step": 40, "errors": [{"line": i, "offset": i * 100,
              "reason": "invalid JSON: Expecting value"} for i in range(20)]}
    with led.transaction() as db:
        for i in range(1, rows + 1):
            db.execute("INSERT INTO batches(id, name, state, created_at, updated_at, attempts) VALUES (?,?,?,?,?,2)",
                       (i, f"f{i}.jsonl", "done", 0.0, 0.0))
            for n, outcome in ((1, "stopped"), (2, "done")):
                db.execute("INSERT INTO attempts(batch_id, n, started_at, ended_at, outcome, reason, result_json)"
                           " VALUES (?,?,?,?,?,?,?)", (i, n, 0.0, 1.0, outcome, "memory", json.dumps(result)))
    daemon = SimpleNamespace(settings=settings, ledger=led, layout=layout, guard=MemoryGuard(settings.memory),
                             running=None, paused=False, stopping=False)
    m = Metrics(SimpleNamespace(info=lambda *a, **k: None, warning=lambda *a, **k: None))
    times_periodic, times_changed = [], []
    for i in range(21):
        t = time.perf_counter()
        m.tick(1000.0 + 10 * i, daemon)
        if i:
            times_periodic.append(time.perf_counter() - t)
    for i in range(10):
        led.bump("bench")  # any commit changes the ledger's change count: totals are recomputed
        t = time.perf_counter()
        m.tick(2000.0 + 10 * i, daemon)
        times_changed.append(time.perf_counter() - t)
    led.close()
    size = (layout.root / "metrics" / "trainerd.prom").stat().st_size
    return {"ledger_batches": rows, "ledger_attempts": 2 * rows, "file_bytes": size,
            "periodic_write_ms": round(1000 * statistics.median(times_periodic), 2),
            "after_ledger_change_ms": round(1000 * statistics.median(times_changed), 2),
            "cpu_percent_of_core_at_5s": round(100 * statistics.median(times_periodic) / 5.0, 4)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=str(REPO / "bench-out" / "supervisor_bench.json"))
    ap.add_argument("--idle-s", type=float, default=30.0)
    ap.add_argument("--lines", type=int, default=1200)
    ap.add_argument("--metrics-rows", type=int, default=2000, help="batches in the ledger for metrics_write")
    ap.add_argument("--keep", action="store_true", help="keep the scratch root for inspection")
    args = ap.parse_args()

    from trainerd.worker.testing import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="trainerd-bench-"))
    model = build_tiny_model(tmp / "model")
    root = tmp / "root"
    results: dict = {"machine": {"cpus": os.cpu_count(), "cpu": cpu_name(), "loadavg_start": os.getloadavg()}}
    t_start = time.perf_counter()
    daemon, out_log = start_daemon(tmp, "root", model, metrics=True)
    quiet, quiet_log = start_daemon(tmp, "root-metrics-off", model, metrics=False)
    try:
        log_path = root / "logs" / "trainerd.jsonl"

        def events() -> list[dict]:
            try:
                return [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
            except FileNotFoundError:
                return []

        for d, r in ((daemon, root), (quiet, tmp / "root-metrics-off")):
            wait_ready(d, r, tmp)
            if d is daemon:
                results["startup_to_ready_s"] = round(time.perf_counter() - t_start, 3)
        proc, proc_off = psutil.Process(daemon.pid), psutil.Process(quiet.pid)

        # --- idle, metrics on and off side by side -----------------------------------
        time.sleep(2.0)
        c0, c0_off, w0 = cpu_s(proc), cpu_s(proc_off), time.monotonic()
        time.sleep(args.idle_s)
        c1, c1_off, w1 = cpu_s(proc), cpu_s(proc_off), time.monotonic()
        for key, p, a, b in (("idle", proc, c0, c1), ("idle_metrics_off", proc_off, c0_off, c1_off)):
            mem = p.memory_full_info()
            results[key] = {"seconds": round(w1 - w0, 1), "cpu_percent_of_core": round(100 * (b - a) / (w1 - w0), 4),
                            "rss_mb": round(mem.rss / 2**20, 1), "uss_mb": round(mem.uss / 2**20, 1)}
        results["idle"]["metrics_file_age_s"] = metrics_file_age(root)
        quiet.send_signal(signal.SIGTERM)
        quiet.wait(60)
        st = status_times(root, 10)
        results["status_idle_s"] = {"median": round(statistics.median(st), 4), "max": round(max(st), 4)}

        # --- a file lands -------------------------------------------------------------
        part = root / "inbox" / ".bench.jsonl.part"
        part.write_text("\n".join(sample_lines(args.lines)) + "\n")
        t_land = time.time()
        os.rename(part, root / "inbox" / "bench.jsonl")
        rss_max, cpu_t0, w_t0 = 0, None, None
        first = None
        while True:
            evs = events()
            step = [e for e in evs if e["event"] == "step"]
            rss_max = max(rss_max, proc.memory_info().rss)
            if step and first is None:
                first = step[0]
                cpu_t0, w_t0 = cpu_s(proc), time.monotonic()
                st_train = status_times(root, 10)
            if any(e["event"] in ("adapter_published", "batch_failed") for e in evs):
                cpu_t1, w_t1 = cpu_s(proc), time.monotonic()
                break
            assert daemon.poll() is None
            time.sleep(0.2)
        evs = events()

        def at(name: str) -> dict:
            return next(e for e in evs if e["event"] == name)

        queued, started, loaded = at("batch_queued"), at("worker_started"), at("model_loaded")
        tstart = at("training_started")
        steps = [e for e in evs if e["event"] == "step"]
        land_to_step = ts(first["timestamp"]) - t_land
        results["landing"] = {
            "inbox_to_claimed_s": round(ts(queued["timestamp"]) - t_land, 3),
            "inbox_to_worker_started_s": round(ts(started["timestamp"]) - t_land, 3),
            "worker_imports_s": round(ts(loaded["timestamp"]) - loaded["load_s"] - ts(started["timestamp"]), 3),
            "model_load_s": loaded["load_s"],
            "inbox_to_training_started_s": round(ts(tstart["timestamp"]) - t_land, 3),
            "inbox_to_first_step_s": round(land_to_step, 3),
            "inbox_to_first_step_minus_model_load_s": round(land_to_step - loaded["load_s"], 3),
            "first_step_number": first["step"],
        }
        results["training"] = {
            "seconds": round(w_t1 - w_t0, 1), "steps": len(steps),
            "supervisor_cpu_percent_of_core": round(100 * (cpu_t1 - cpu_t0) / (w_t1 - w_t0), 3),
            "supervisor_rss_max_mb": round(rss_max / 2**20, 1),
            "worker_log_lines_per_s": round(len(steps) / max(1e-9, w_t1 - w_t0), 1),
        }
        results["status_training_s"] = {"median": round(statistics.median(st_train), 4),
                                        "max": round(max(st_train), 4)}
        t = time.perf_counter()
        daemon.send_signal(signal.SIGTERM)
        results["sigterm_exit_code"] = daemon.wait(60)
        results["sigterm_to_exit_s"] = round(time.perf_counter() - t, 3)
    finally:
        for d in (daemon, quiet):
            if d.poll() is None:
                d.kill()
                d.wait()
        out_log.close()
        quiet_log.close()
    results["metrics_write"] = metrics_write_cost(tmp / "metrics-bench", args.metrics_rows)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["targets"] = {"idle_rss_mb<=40": results["idle"]["rss_mb"] <= 40,
                          "idle_rss_mb<=40 (metrics off)": results["idle_metrics_off"]["rss_mb"] <= 40,
                          "idle_cpu_percent<=0.1": results["idle"]["cpu_percent_of_core"] <= 0.1,
                          "status_s<=0.2": results["status_idle_s"]["median"] <= 0.2}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    if args.keep:
        print(f"written to {out}; scratch root kept at {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
