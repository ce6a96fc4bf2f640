"""Issue 25's figures: what `trainerd check` costs beside `trainerd status`, and what the metrics'
trainerd_health adds to a metrics write after a ledger change.

    .venv/bin/python benchmarks/check_bench.py [--batches 10000] [--rounds 5] [--out bench-out/check.json]

On ops_bench.py's big root (N finished batches, 50 queued in three lanes, N versions): the whole
`python -m trainerd status` and `python -m trainerd check` commands, alternating, median of
``--rounds`` each (a fresh interpreter every time: what a Nagios check or a systemd timer pays);
and in-process, `health.ledger_events` (the daemon's part, run once per ledger change) and
`health.HealthWatch.conditions` with an unchanged ledger (every other metrics write), median of 7
and of 200. Target: check <= 0.2 s like status; the daemon's part a few ms per ledger change.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import machine_info, write_json  # noqa: E402
from ops_bench import make_big_root  # noqa: E402


def _cli(root: Path, command: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "trainerd", command, "--root", str(root)], capture_output=True, cwd=REPO)
    return time.perf_counter() - t0


class _Daemon:
    """What HealthWatch reads of a Supervisor: its ledger, layout and settings."""

    def __init__(self, root: Path):
        from trainerd.core.settings import Settings
        from trainerd.core.contract import RootLayout
        from trainerd.supervisor.ledger import Ledger

        self.layout = RootLayout(root)
        self.ledger = Ledger(self.layout.db)
        self.settings = Settings(root=str(root))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "bench-out" / "check.json")
    args = ap.parse_args()
    from trainerd.supervisor.views.health import HealthWatch, ledger_events

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        make_big_root(root, args.batches)
        status, check = [], []
        for _ in range(args.rounds):  # alternating: the same machine noise for both
            status.append(_cli(root, "status"))
            check.append(_cli(root, "check"))
        d = _Daemon(root)
        try:
            now = time.time()
            events = []
            for _ in range(7):
                t0 = time.perf_counter()
                ledger_events(d.ledger.db, now - 3600, now)
                events.append(time.perf_counter() - t0)
            watch = HealthWatch()
            watch.conditions(d, now)
            cached = []
            for i in range(200):
                t0 = time.perf_counter()
                watch.conditions(d, now + i)
                cached.append(time.perf_counter() - t0)
        finally:
            d.ledger.close()
    res = {"machine": machine_info(), "batches": args.batches,
           "status_cli_s": round(statistics.median(status), 4), "check_cli_s": round(statistics.median(check), 4),
           "check_over_status": round(statistics.median(check) / statistics.median(status), 3),
           "ledger_events_ms": round(statistics.median(events) * 1e3, 3),
           "conditions_unchanged_ledger_us": round(statistics.median(cached) * 1e6, 1)}
    for k, v in res.items():
        if k != "machine":
            print(f"{k:32} {v}")
    write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
