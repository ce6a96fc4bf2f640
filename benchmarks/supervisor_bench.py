#!/usr/bin/env python3
"""Supervisor benchmark: its own cost idle and while a worker trains, `trainerd status` latency,
how long a file waits between landing in the inbox and the worker's first step, and a burst.

    python benchmarks/supervisor_bench.py [OUT.json] [--idle-s 30] [--lines 1200] [--metrics-rows 2000]
                                          [--burst-files 2000] [--busy 0,300] [--busy-fds 33] [--only-burst]

The burst (issue 23): a daemon with a worker running (the fake worker, waiting: the guard samples
it) gets ``--burst-files`` small files renamed into its inbox at once, with 0 and with 300 other
processes each holding ``--busy-fds`` open files (~10k fds, the host of the issue), side by side:
files/s claimed, the longest turn of its loop, the guard's measured sampling interval (p50/max)
from daemon.json. Goals: longest turn <= 0.1 s, guard interval <= 2 x memory.interval_ms,
>= 200 files/s.

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

    from trainerd.core.config import from_dict
    from trainerd.core.contract import RootLayout
    from trainerd.supervisor.ledger import Ledger
    from trainerd.memguard import MemoryGuard
    from trainerd.supervisor.metrics import Metrics

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


WINDOW_S = 60.0  # the daemon's loop figures: the last minute (trainerd/supervisor/loophealth.py)


def _counts(root: Path) -> dict[str, int]:
    from trainerd.supervisor.ledger import Ledger

    try:
        led = Ledger.open_readonly(root / "state.db")
    except (OSError, Exception):  # noqa: BLE001 - not created yet
        return {}
    try:
        return led.counts()
    finally:
        led.close()


def burst_case(tmp: Path, model: Path, busy: int, files: int, busy_fds: int) -> dict:
    """One burst on a fresh daemon whose worker (the fake one, waiting) is being guarded."""
    name = f"burst-busy{busy}"
    root = tmp / name
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(json.dumps({
        "root": str(root), "model": {"path": str(model)}, "disk": {"min_free_bytes": 0},
        "supervisor": {"settle_s": 0.5, "rescan_s": 5.0, "stop_grace_s": 10},
        "train": {"seq_len": 32, "micro_batch_size": 2, "grad_accum_steps": 2},
    }))
    e = env()
    e["TRAINERD_WORKER_CMD"] = f"{sys.executable} {REPO / 'tests' / 'bin' / 'fake_worker.py'}"
    out_log = open(tmp / f"{name}.out", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "trainerd", "run", "--config", str(cfg)], env=e,
                            stdout=out_log, stderr=subprocess.STDOUT)
    held = [os.open(tmp / f"held-{i}", os.O_RDONLY | os.O_CREAT, 0o600) for i in range(busy_fds)]
    sleepers: list[subprocess.Popen] = []
    try:
        wait_ready(proc, root, tmp)
        (root / "inbox" / ".w.part").write_text(json.dumps({"plan": ["wait"], "salt": "worker"}) + "\n")
        os.rename(root / "inbox" / ".w.part", root / "inbox" / "worker.jsonl")
        log_path = root / "logs" / "trainerd.jsonl"
        while '"worker_started"' not in log_path.read_text():
            assert proc.poll() is None
            time.sleep(0.05)
        started = time.monotonic()
        for _ in range(busy):
            sleepers.append(subprocess.Popen(["sleep", "3600"], pass_fds=held))
        fds = sum(len(os.listdir(f"/proc/{p}/fd")) for p in os.listdir("/proc") if p.isdigit()
                  and os.access(f"/proc/{p}/fd", os.R_OK))
        stage = tmp / f"{name}-stage"
        stage.mkdir()
        paths = []
        for i in range(files):
            p = stage / f"b{i:05d}.jsonl"
            p.write_text(json.dumps({"plan": ["done"], "salt": f"{name}-{i}"}) + "\n")
            paths.append(p)
        # The loop's figures cover the last minute: let the worker's start (a turn of its own,
        # ~0.1-0.3 s of fsyncs and a process spawn) leave that window before the burst lands.
        time.sleep(max(0.0, started + WINDOW_S + 1.0 - time.monotonic()))
        rss_before = round(psutil.Process(proc.pid).memory_info().rss / 2**20, 1)
        t0 = time.monotonic()
        for p in paths:
            os.rename(p, root / "inbox" / p.name)
        while _counts(root).get("queued", 0) < files:
            assert proc.poll() is None, f"daemon exited {proc.returncode}"
            time.sleep(0.05)
        took = time.monotonic() - t0
        t_done = time.time()
        rss_mb = round(psutil.Process(proc.pid).memory_info().rss / 2**20, 1)
        while True:  # daemon.json's loop figures are refreshed every 10 s at most
            state = json.loads((root / "daemon.json").read_text())
            if state.get("updated_at", 0) > t_done and state.get("loop"):
                break
            time.sleep(0.5)
        loop = state["loop"]
        slow = [json.loads(x) for x in log_path.read_text().splitlines() if '"loop_turn_slow"' in x]
        return {"busy_processes": busy, "fds_on_host": fds, "files": files, "seconds": round(took, 2),
                "files_per_s": round(files / took, 1), "longest_turn_s": loop["longest_turn_s"],
                "longest_turn_doing": loop["longest_turn_doing"], "guard_interval_s": loop["guard_interval_s"],
                "guard_interval_ms": loop["guard_interval_ms"], "slow_turns_logged": len(slow),
                "supervisor_rss_mb_before": rss_before, "supervisor_rss_mb_after": rss_mb}
    finally:
        for sp in sleepers:
            sp.kill()
            sp.wait()
        for fd in held:
            os.close(fd)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out_log.close()


def burst(tmp: Path, model: Path, args: argparse.Namespace) -> dict:
    cases = [burst_case(tmp, model, int(b), args.burst_files, args.busy_fds) for b in args.busy.split(",")]
    for c in cases:
        c["goals"] = {"longest_turn_s<=0.1": (c["longest_turn_s"] or 0) <= 0.1,
                      "guard_interval_max<=2x": (c["guard_interval_s"]["max"] or 0) <= 2 * c["guard_interval_ms"] / 1000,
                      "files_per_s>=200": c["files_per_s"] >= 200}
    print("\nburst: busy procs | fds on host | files/s | longest turn s | guard interval p50 / max s")
    for c in cases:
        g = c["guard_interval_s"]
        print(f"       {c['busy_processes']:>10} | {c['fds_on_host']:>11} | {c['files_per_s']:>7} | "
              f"{c['longest_turn_s']:>14} | {g['p50']} / {g['max']}")
    return {"cases": cases}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=str(REPO / "bench-out" / "supervisor_bench.json"))
    ap.add_argument("--idle-s", type=float, default=30.0)
    ap.add_argument("--lines", type=int, default=1200)
    ap.add_argument("--metrics-rows", type=int, default=2000, help="batches in the ledger for metrics_write")
    ap.add_argument("--keep", action="store_true", help="keep the scratch root for inspection")
    ap.add_argument("--burst-files", type=int, default=2000)
    ap.add_argument("--busy", default="0,300", help="busy processes for each burst case, comma-separated")
    ap.add_argument("--busy-fds", type=int, default=33, help="open files each busy process holds")
    ap.add_argument("--only-burst", action="store_true", help="skip the idle/training/status parts")
    args = ap.parse_args()

    from trainerd.worker.testing import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="trainerd-bench-"))
    model = build_tiny_model(tmp / "model")
    root = tmp / "root"
    results: dict = {"machine": {"cpus": os.cpu_count(), "cpu": cpu_name(), "loadavg_start": os.getloadavg()}}
    if args.only_burst:
        results["burst"] = burst(tmp, model, args)
        return _write(results, args, tmp)
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
    results["burst"] = burst(tmp, model, args)
    results["targets"] = {"idle_rss_mb<=40": results["idle"]["rss_mb"] <= 40,
                          "idle_rss_mb<=40 (metrics off)": results["idle_metrics_off"]["rss_mb"] <= 40,
                          "idle_cpu_percent<=0.1": results["idle"]["cpu_percent_of_core"] <= 0.1,
                          "status_s<=0.2": results["status_idle_s"]["median"] <= 0.2}
    return _write(results, args, tmp)


def _write(results: dict, args: argparse.Namespace, tmp: Path) -> int:
    results["machine"]["loadavg_end"] = os.getloadavg()
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
