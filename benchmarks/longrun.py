#!/usr/bin/env python3
"""Weeks on one disk (issue 18): does a batch cost the same after N batches as after 100?

    nice -n 10 .venv/bin/python benchmarks/longrun.py --mode fake --batches 2000      # (a) ~15-40 min
    nice -n 10 .venv/bin/python benchmarks/longrun.py --mode real --batches 200       # (b) ~20-40 min
    .venv/bin/python benchmarks/longrun.py --mode fake --batches 120 --samples 10,100,120   # a smoke run

One real daemon (`python -m trainerd run`, the default configuration but for a short settle time and
`disk.min_free_bytes: 0`) on a fresh root, fed so that a file always waits in the inbox: the
daemon is never idle, so the time from one batch's publish to the next worker's start is the
supervisor's own work between them. `--mode fake` runs the fast fake worker (tests/bin/fake_worker.py
via TRAINERD_WORKER_CMD: a publish in ~0.1 s, so thousands of batches fit in minutes); `--mode real`
the real worker on the tiny random model (trainerd.worker.testing), 20-40 distinct lines per file.

At each sample point N (default 10, 100, 1000, 2000 done batches) it records, over the window of
the last `--window` batches before N:

- the supervisor's RSS (and USS) at N, and its CPU seconds per batch over the window (psutil,
  the daemon process only, not its children);
- the median time from `adapter_published` to the next `worker_started` (the daemon's log);
- bytes (allocated blocks) and files added under the root per batch, and the root's total;
- `trainerd status` and `trainerd history` (the commands, median of 3 fresh interpreters, and
  collect_status / collect_history in-process, median of 5);
- start-up to ready: the daemon is stopped (SIGTERM) and started again, timed from exec to the
  `supervisor_ready` line (this restarts it 4 times in a run, which exercises restart too).

Then, per figure, the ratio of its value at the largest N to its value at N = 100 (target <= 1.2;
RSS: + <= 5 MiB), and a projection to N = 10,000 from a least-squares line through the samples at
N >= 100, printed side by side. Figures go to stdout and JSON (default bench-out/longrun-<mode>.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
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
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from common import machine_info, write_json  # noqa: E402
from trainerd.core.contract import RootLayout  # noqa: E402
from trainerd.supervisor.diskuse import measure  # noqa: E402

FAKE = REPO / "tests" / "bin" / "fake_worker.py"
PROJECT_TO = 10_000


def env(mode: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    if mode == "fake":
        e["TRAINERD_WORKER_CMD"] = f"{sys.executable} {FAKE}"
    else:
        e.pop("TRAINERD_WORKER_CMD", None)
    return e


def ts(s: str) -> float:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


TRANSIENT = ("state.db-wal", "state.db-shm")  # SQLite's log, checkpointed in bursts: noise, not growth


def tree(root: Path) -> tuple[int, int]:
    """(allocated bytes, files) under ``root``, never following a link (less the ledger's WAL)."""
    total = files = 0
    for dirpath, dirs, names in os.walk(root):
        for n in names + dirs:
            if dirpath == str(root) and n in TRANSIENT:
                continue
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            total += st.st_blocks * 512
            files += n in names
    return total, files


class Feed:
    """Files for the inbox: the fake worker's plan line, or 20-40 distinct lines for the real one."""

    def __init__(self, mode: str, root: Path):
        self.mode, self.root, self.n = mode, root, 0

    def drop(self) -> None:
        self.n += 1
        name = f"f{self.n:06d}.jsonl"
        if self.mode == "fake":
            text = json.dumps({"plan": ["done"], "salt": name}) + "\n"
        else:
            from workerutil import sample_lines

            count = 20 + (self.n * 7) % 21
            text = "\n".join(sample_lines(count, start=self.n * 50)) + "\n"
        part = self.root / "inbox" / f".{name}.part"
        part.write_text(text)
        os.rename(part, self.root / "inbox" / name)


class Daemon:
    def __init__(self, tmp: Path, mode: str, model: Path):
        self.tmp, self.mode = tmp, mode
        self.root = tmp / "root"
        self.config = tmp / "trainerd.yaml"
        cfg: dict[str, Any] = {"root": str(self.root), "model": {"path": str(model)},
                               "supervisor": {"settle_s": 0.1, "rescan_s": 1.0},
                               "disk": {"min_free_bytes": 0}}
        if mode == "real":  # the tiny model's settings (the default seq 256 x 4 x 4 is for SmolLM2)
            cfg["train"] = {"seq_len": 32, "micro_batch_size": 2, "grad_accum_steps": 2, "threads": 1,
                            "warmup_steps": 2}
        self.config.write_text(json.dumps(cfg))
        self.out = tmp / "daemon.out"
        self.proc: subprocess.Popen | None = None
        self.offset = 0  # how far daemon.out has been read
        self.held: list[dict[str, Any]] = []  # lines read while waiting for ready: still the caller's

    def start(self) -> float:
        """Start and wait for ``supervisor_ready``; returns seconds from exec to ready."""
        t0 = time.time()
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "trainerd", "run", "--config", str(self.config)],
                                         env=env(self.mode), stdout=out, stderr=subprocess.STDOUT)
        while True:
            for ev in self._read():
                self.held.append(ev)
                if ev.get("event") == "supervisor_ready":
                    return ts(ev["timestamp"]) - t0
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}: {self.out}"
            time.sleep(0.02)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        self.proc = None

    def events(self) -> list[dict[str, Any]]:
        """The daemon's stdout lines (its JSON log) since the last call."""
        held, self.held = self.held, []
        return held + self._read()

    def _read(self) -> list[dict[str, Any]]:
        with open(self.out, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        cut = data.rfind(b"\n") + 1
        self.offset += cut
        out = []
        for line in data[:cut].splitlines():
            if line.startswith(b"{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out


def timed_cli(root: Path, mode: str, *args: str, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trainerd", *args, "--root", str(root)], env=env(mode),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_inproc(fn: Any, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from trainerd.cli.history import collect_history
    from trainerd.supervisor.views.status import collect_status, render_status

    tmp = Path(tempfile.mkdtemp(prefix="trainerd-longrun-", dir=args.tmp))
    if args.mode == "real":
        from trainerd.worker.testing import build_tiny_model

        model = build_tiny_model(tmp / "model")
    else:
        model = tmp / "no-model"
    d = Daemon(tmp, args.mode, model)
    samples = sorted(set(args.samples))
    result: dict[str, Any] = {"mode": args.mode, "batches": args.batches, "window": args.window, "samples": []}
    startup = d.start()
    proc = psutil.Process(d.proc.pid)
    feed = Feed(args.mode, d.root)
    done = 0
    published: dict[int, float] = {}  # batch -> publish time
    gaps: list[tuple[int, float]] = []  # (done count at the publish, publish -> next worker_started)
    last_publish: float | None = None
    window_start: dict[str, Any] = {}
    restarted_at = 0
    t_begin = time.time()
    for _ in range(3):
        feed.drop()
    try:
        while done < args.batches:
            for ev in d.events():
                e = ev.get("event")
                if e == "adapter_published":
                    done += 1
                    last_publish = ts(ev["timestamp"])
                    published[ev.get("batch")] = last_publish
                elif e == "worker_started" and last_publish is not None:
                    gaps.append((done, ts(ev["timestamp"]) - last_publish))
                    last_publish = None
                elif e in ("batch_failed", "adapter_rejected"):
                    done += 1  # counted as a batch through; the benchmark's files are all good
                    result.setdefault("not_published", []).append(ev.get("batch"))
                elif e == "claim_vanished" or e == "batch_queued":
                    if feed.n < args.batches:
                        feed.drop()  # keep the queue fed: the daemon is never idle
            if d.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {d.proc.returncode}; see {d.out}")
            due = next((n for n in samples if done >= n and not any(s["sample"] == n for s in result["samples"])), None)
            if due is not None:
                w0 = window_start.get(due) or {"cpu": 0.0, "tree": (0, 0), "done": 0, "kinds": {}}
                kinds = measure(RootLayout(d.root))
                cpu = sum(proc.cpu_times()[:2])
                size, files = tree(d.root)
                mem = proc.memory_full_info()
                w = done - w0["done"]
                window_gaps = [g for n, g in gaps if w0["done"] < n <= done]
                s: dict[str, Any] = {
                    "sample": due, "n": done, "wall_s_since_start": round(time.time() - t_begin, 1),
                    "daemon_batches": done - restarted_at,  # its life so far: RSS settles in the first few hundred
                    "rss_mib": round(mem.rss / 2**20, 2), "uss_mib": round(mem.uss / 2**20, 2),
                    "cpu_ms_per_batch": round(1000 * (cpu - w0["cpu"]) / max(1, w), 2),
                    "publish_to_next_start_ms": round(1000 * statistics.median(window_gaps), 1) if window_gaps else None,
                    "bytes_per_batch": round((size - w0["tree"][0]) / max(1, w)),
                    "files_per_batch": round((files - w0["tree"][1]) / max(1, w), 2),
                    "root_bytes": size, "root_files": files,
                    # where a batch's bytes go (trainerd.supervisor.diskuse's kinds: the README's formula, measured)
                    "kind_bytes_per_batch": {k: round((v - w0["kinds"].get(k, 0)) / max(1, w)) for k, v in kinds.items()},
                    "ledger_bytes": (d.root / "state.db").stat().st_size,
                    "ledger_wal_bytes": sum(p.stat().st_size for p in d.root.glob("state.db-wal") if p.is_file()),
                    "log_bytes": sum(p.stat().st_size for p in (d.root / "logs").iterdir() if p.is_file()),
                }
                s["status_cli_s"] = round(timed_cli(d.root, args.mode, "status"), 4)
                s["history_cli_s"] = round(timed_cli(d.root, args.mode, "history"), 4)
                s["status_inproc_ms"] = round(1000 * timed_inproc(lambda: render_status(collect_status(d.root))), 2)
                s["history_inproc_ms"] = round(1000 * timed_inproc(lambda: collect_history(d.root)), 2)
                d.stop()
                s["startup_to_ready_s"] = round(d.start(), 3)
                restarted_at = done
                proc = psutil.Process(d.proc.pid)
                result["samples"].append(s)
                print(json.dumps(s), flush=True)
                gaps = [(n, g) for n, g in gaps if n > done]
                last_publish = None
            for n in samples:  # a window opens `window` batches before its sample point
                if n not in window_start and done >= max(0, n - args.window) and done < n:
                    window_start[n] = {"cpu": sum(proc.cpu_times()[:2]), "tree": tree(d.root), "done": done,
                                       "kinds": measure(RootLayout(d.root))}
            time.sleep(0.05)
        result["first_startup_to_ready_s"] = round(startup, 3)
        result["wall_s"] = round(time.time() - t_begin, 1)
    finally:
        if d.proc is not None:
            d.stop()
    result["root"] = str(d.root)
    result["disk_usage_json"] = json.loads((d.root / "disk-usage.json").read_text()) \
        if (d.root / "disk-usage.json").exists() else None
    return result


FIGURES = [("rss_mib", "supervisor RSS (MiB)"), ("cpu_ms_per_batch", "supervisor CPU per batch (ms)"),
           ("publish_to_next_start_ms", "publish -> next worker start (ms)"),
           ("startup_to_ready_s", "start-up to ready (s)"), ("status_cli_s", "trainerd status (s)"),
           ("history_cli_s", "trainerd history (s)"), ("status_inproc_ms", "collect_status (ms)"),
           ("history_inproc_ms", "collect_history (ms)"), ("bytes_per_batch", "bytes added per batch"),
           ("files_per_batch", "files added per batch"), ("root_bytes", "root total (bytes)"),
           ("ledger_bytes", "ledger (bytes)"), ("log_bytes", "logs (bytes)")]
# Figures that should not grow per batch (the targets); the totals grow by design and are projected.
FLAT = {"rss_mib", "cpu_ms_per_batch", "publish_to_next_start_ms", "startup_to_ready_s", "status_cli_s",
        "history_cli_s", "status_inproc_ms", "history_inproc_ms", "bytes_per_batch", "files_per_batch"}


def project(samples: list[dict[str, Any]], key: str) -> float | None:
    """Least squares through the samples at N >= 100, evaluated at N = 10,000."""
    pts = [(s["n"], s[key]) for s in samples if s["n"] >= 100 and s.get(key) is not None]
    if len(pts) < 2:
        return None
    mx, my = statistics.mean(p[0] for p in pts), statistics.mean(p[1] for p in pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0
    return my + slope * (PROJECT_TO - mx)


def verdicts(samples: list[dict[str, Any]]) -> dict[str, Any]:
    base = next((s for s in samples if s["sample"] == 100), None)
    last = samples[-1] if samples else None
    out: dict[str, Any] = {}
    for key, _ in FIGURES:
        v100, vmax = (base or {}).get(key), (last or {}).get(key)
        entry: dict[str, Any] = {"at_100": v100, "at_max": vmax, "n_max": last["n"] if last else None,
                                 "projected_10000": project(samples, key)}
        if key in FLAT and v100 not in (None, 0) and vmax is not None:
            if key == "rss_mib":
                entry["delta"] = round(vmax - v100, 2)
                entry["ok"] = vmax - v100 <= 5.0
            else:
                entry["ratio"] = round(vmax / v100, 3)
                entry["ok"] = vmax <= 1.2 * v100
        out[key] = entry
    return out


def print_table(res: dict[str, Any]) -> None:
    ns = [s["sample"] for s in res["samples"]]
    head = f"{'figure':<36}" + "".join(f"{'N=' + str(n):>13}" for n in ns) + f"{'N=10000 proj':>15}  {'max vs 100':>12}"
    print(head)
    for key, label in FIGURES:
        vals = [s.get(key) for s in res["samples"]]
        v = res["verdicts"][key]
        proj = v["projected_10000"]
        cmp_ = (f"+{v['delta']} MiB" if "delta" in v else f"x{v['ratio']}" if "ratio" in v else "")
        cmp_ += (" ok" if v.get("ok") else " OVER") if "ok" in v else ""
        print(f"{label:<36}" + "".join(f"{_fmt(x):>13}" for x in vals) + f"{_fmt(proj):>15}  {cmp_:>12}")


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and abs(x) < 1000:
        return f"{x:.3g}" if abs(x) < 1 else f"{x:.1f}"
    return f"{int(x):,}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("fake", "real"), default="fake")
    ap.add_argument("--batches", type=int, default=None, help="default 2000 (fake), 200 (real)")
    ap.add_argument("--samples", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="done counts to sample at (default 10,100,1000,2000 fake; 10,50,100,200 real)")
    ap.add_argument("--window", type=int, default=20, help="batches before each sample the per-batch figures cover")
    ap.add_argument("--tmp", default=None, help="where the scratch root goes (default: the system's temp folder)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.batches = args.batches or (2000 if args.mode == "fake" else 200)
    args.samples = [n for n in (args.samples or ([10, 100, 1000, 2000] if args.mode == "fake" else [10, 50, 100, 200]))
                    if n <= args.batches]
    out = args.out or REPO / "bench-out" / f"longrun-{args.mode}.json"
    res = {"machine": machine_info(), "loadavg_start": os.getloadavg(), **run(args)}
    res["loadavg_end"] = os.getloadavg()
    res["verdicts"] = verdicts(res["samples"])
    print_table(res)
    write_json(out, res)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
