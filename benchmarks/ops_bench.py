"""Issue 14's figures: `trainerd status` on a big root, and what a running publish hook costs the loop.

    .venv/bin/python benchmarks/ops_bench.py [--batches 10000] [--ticks 2000] [--out bench-out/ops.json]

1. status: a root whose ledger holds N finished batches (plus a queue of 50 in three lanes) and N
   versions, with a disk-usage.json; `collect_status` + render in-process (median of 7) and the
   whole `python -m trainerd status` command (median of 5). Target: <= 0.2 s.
2. hooks: an in-process Supervisor (fake workers, no worker running) ticks with `now` injected;
   the median and p99 of one `tick()` with no hook, and while a hook (`sleep 30`) runs, and the one
   tick that starts a hook (fork/exec). The hook is a child the loop only polls: the difference is
   one `Popen.poll()` (a waitpid WNOHANG).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from common import machine_info, write_json  # noqa: E402


def make_big_root(root: Path, n: int) -> None:
    from trainerd.core.contract import RootLayout
    from trainerd.core.fsutil import atomic_write_json
    from trainerd.supervisor.ledger import Ledger

    layout = RootLayout(root)
    layout.make()
    led = Ledger(layout.db)
    now = time.time()
    rows = [(f"file-{i:06d}.jsonl", f"{i:064x}", 1000 + i, "done", 1, i, "done", "blessed", 0,
             now - n + i, now - n + i, now - n + i) for i in range(1, n + 1)]
    rows += [(f"queued-{i}.jsonl", f"{n + i:064x}", 10, "queued", 0, None, None, None, (i % 3) - 1, now, now, None)
             for i in range(1, 51)]
    with led.transaction() as db:  # a benchmark fixture: rows straight in, one transaction
        db.executemany("INSERT INTO batches(name, sha256, size_bytes, state, attempts, adapter_version, last_reason,"
                       " decision, priority, created_at, updated_at, finished_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        db.executemany("INSERT INTO adapter_versions(n, batch_id, path, created_at, parent) VALUES (?,?,?,?,?)",
                       [(i, i, str(layout.adapter_dir(i)), now, i - 1 or None) for i in range(1, n + 1)])
    led.close()
    atomic_write_json(layout.disk_usage, {"measured_at": now, "kinds": {"batches": 1 << 30, "adapters": 1 << 28},
                                          "total": 5 << 28, "min_free_bytes": 1 << 30, "cache": {}})


def bench_status(n: int) -> dict:
    from trainerd.supervisor.views.status import collect_status, render_status

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        make_big_root(root, n)
        inproc = []
        for _ in range(7):
            t0 = time.perf_counter()
            render_status(collect_status(root))
            inproc.append(time.perf_counter() - t0)
        cli = []
        for _ in range(5):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "trainerd", "status", "--root", str(root)], check=True,
                           capture_output=True, cwd=REPO)
            cli.append(time.perf_counter() - t0)
    return {"batches": n, "collect_render_s": round(statistics.median(inproc), 4),
            "cli_s": round(statistics.median(cli), 4)}


def bench_hooks(ticks: int) -> dict:
    from support.config import config_dict
    from trainerd.core.config import from_dict
    from trainerd.supervisor.daemon import Supervisor
    from trainerd.supervisor import hooks

    fake = REPO / "tests" / "bin" / "fake_worker.py"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settings = from_dict(config_dict(tmp / "root", tmp / "no-model", {"train": None, "data": None},
                                         supervisor={"settle_s": 0, "rescan_s": 3600},
                                         publish={"hook": ["/bin/sleep", "30"], "hook_timeout_s": 600},
                                         log={"file": False, "level": "error"}))
        # The measuring child runs `python -m trainerd.supervisor.diskuse`: it must import this checkout.
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        sup = Supervisor(settings, worker_cmd=[sys.executable, str(fake)], env=env)
        sup.open()
        try:
            now = time.time()
            sup.tick(now)
            while sup.retention.child is not None:  # the start-up disk measurement
                time.sleep(0.05)
                sup.tick(now)

            def timed(k: int) -> list[float]:
                out = []
                for i in range(k):
                    t0 = time.perf_counter()
                    sup.tick(now + 1 + i * 1e-3)
                    out.append(time.perf_counter() - t0)
                return out

            idle = timed(ticks)
            (sup.layout.adapters / "1").mkdir()
            hooks.record_version(sup.layout, 1, 1, "x.jsonl", "blessed")
            t0 = time.perf_counter()
            sup.tick(now + 2)
            start_s = time.perf_counter() - t0
            assert sup.hooks.run is not None
            running = timed(ticks)
            sup.hooks.close()
        finally:
            sup.retention.close()
            sup.close()
    q = lambda xs, p: sorted(xs)[int(p * (len(xs) - 1))]  # noqa: E731
    return {"ticks": ticks, "idle_tick_median_us": round(statistics.median(idle) * 1e6, 1),
            "idle_tick_p99_us": round(q(idle, 0.99) * 1e6, 1),
            "hook_running_tick_median_us": round(statistics.median(running) * 1e6, 1),
            "hook_running_tick_p99_us": round(q(running, 0.99) * 1e6, 1),
            "hook_start_tick_ms": round(start_s * 1e3, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=10000)
    ap.add_argument("--ticks", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=REPO / "bench-out" / "ops.json")
    args = ap.parse_args()
    res = {"machine": machine_info(), "status": bench_status(args.batches), "hooks": bench_hooks(args.ticks)}
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=2))
    write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
