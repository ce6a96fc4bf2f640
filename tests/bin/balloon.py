#!/usr/bin/env python3
"""A stand-in worker that grows memory at a given rate, in "steps".

    balloon.py --rate-mib-s 200 [--max-mib N] [--start-mib N] [--jump-mib N --jump-after-s S]
               [--stop-file PATH] [--checkpoint-s 0.3] [--checkpoint-mib 0]
               [--state PATH] [--ignore-term] [--step-s 0.02] [--max-s 60]

Each step touches rate x step_s bytes of anonymous memory (written, so the pages are really
resident) and counts one step; the step reached is pwritten to ``--state``.progress every
step (no fsync: the page cache outlives the process, so the harness can read what a killed
balloon reached). Between steps, when ``--stop-file`` exists, it "checkpoints": sleeps
``--checkpoint-s`` (allocating ``--checkpoint-mib`` more, as a real checkpoint's buffers
do), writes ``{"step": N}`` to ``--state`` atomically and exits 75. SIGTERM does the same
unless ``--ignore-term``. Without ``--stop-file`` it never honours a stop. At ``--max-mib``
it stops growing and keeps stepping; after ``--max-s`` it exits 0.

As the daemon's worker (``TRAINERD_WORKER_CMD="python balloon.py --rate-mib-s ..."``) it takes
the batch folder the daemon appends (and ignores ``--publish``/``--init-adapter``): its
``--stop-file`` is then that folder's ``.stop``, as the real worker's is.

``--jump-mib`` adds that much in one go after ``--jump-after-s`` and prints
``{"jumped_at": <CLOCK_MONOTONIC>}`` on stdout once it is resident; with ``--watch-cgroup DIR
--watch-bytes N`` it also prints ``{"crossed_at": ...}`` when the cgroup's working set first
reaches N during the jump (reaction-time benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

MiB = 1 << 20
_term = False


def _on_term(signum, frame):  # only record it; the loop acts
    global _term
    _term = True


def _cgroup_ws(d: str) -> int:
    """usage minus inactive_file, as the guard measures it (v1 or v2 files)."""
    v2 = os.path.exists(os.path.join(d, "memory.current"))
    usage = int(open(os.path.join(d, "memory.current" if v2 else "memory.usage_in_bytes")).read())
    key = "inactive_file" if v2 else "total_inactive_file"
    for line in open(os.path.join(d, "memory.stat")):
        k, _, v = line.partition(" ")
        if k == key:
            return usage - int(v)
    return usage


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate-mib-s", type=float, default=100.0)
    ap.add_argument("--max-mib", type=float, default=0.0)
    ap.add_argument("--start-mib", type=float, default=0.0)
    ap.add_argument("--jump-mib", type=float, default=0.0)
    ap.add_argument("--jump-after-s", type=float, default=0.5)
    ap.add_argument("--stop-file")
    ap.add_argument("--checkpoint-s", type=float, default=0.3)
    ap.add_argument("--checkpoint-mib", type=float, default=0.0)
    ap.add_argument("--state")
    ap.add_argument("--ignore-term", action="store_true")
    ap.add_argument("--step-s", type=float, default=0.02)
    ap.add_argument("--max-s", type=float, default=60.0)
    ap.add_argument("--watch-cgroup", help="cgroup dir whose working set to watch during the jump")
    ap.add_argument("--watch-bytes", type=int, default=0)
    ap.add_argument("batch_dir", nargs="?", help="as the daemon's worker: the batch folder (.stop in it)")
    ap.add_argument("--publish")
    ap.add_argument("--init-adapter")
    ap.add_argument("--mtbf-s", help="as the daemon's worker: the fault-rate estimate (unused here)")
    a = ap.parse_args()
    if a.batch_dir and not a.stop_file:
        a.stop_file = os.path.join(a.batch_dir, ".stop")

    signal.signal(signal.SIGTERM, signal.SIG_IGN if a.ignore_term else _on_term)
    hold: list[bytes] = []
    held = 0
    progress_fd = os.open(a.state + ".progress", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if a.state else None

    def grow(n: int) -> None:
        nonlocal held
        if n > 0:
            hold.append(b"\x01" * n)  # written, not calloc'ed: resident at once
            held += n

    grow(int(a.start_mib * MiB))
    t0 = time.monotonic()
    jumped = a.jump_mib <= 0
    crossed = False
    step = 0
    while True:
        now = time.monotonic()
        if (a.stop_file and os.path.exists(a.stop_file)) or _term:
            reason = "term" if _term else open(a.stop_file).read().strip() or "memory"
            # "checkpoint": takes time and memory, then the state is durable
            grow(int(a.checkpoint_mib * MiB))
            time.sleep(a.checkpoint_s)
            if a.state:
                tmp = a.state + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({"step": step, "reason": reason, "held_bytes": held}, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, a.state)
            return 75
        if now - t0 >= a.max_s:
            return 0
        if not jumped and now - t0 >= a.jump_after_s:
            # in 2 MiB pieces, so the moment the cgroup's working set crosses --watch-bytes
            # can be told to within one piece (reaction-time benchmark)
            left = int(a.jump_mib * MiB)
            while left > 0:
                grow(min(left, 2 * MiB))
                left -= 2 * MiB
                if a.watch_cgroup and not crossed and _cgroup_ws(a.watch_cgroup) >= a.watch_bytes:
                    crossed = True
                    print(json.dumps({"crossed_at": time.monotonic()}), flush=True)
            jumped = True
            print(json.dumps({"jumped_at": time.monotonic(), "held_bytes": held}), flush=True)
        # time-based, so the rate holds however long a step really took
        target = int((a.start_mib + a.rate_mib_s * (now - t0)) * MiB)
        if a.max_mib > 0:
            target = min(target, int(a.max_mib * MiB))
        grow(target - held - (int(a.jump_mib * MiB) if jumped and a.jump_mib > 0 else 0))
        step += 1
        if progress_fd is not None:
            os.pwrite(progress_fd, f"{step:<20d}".encode(), 0)
        time.sleep(a.step_s)


if __name__ == "__main__":
    sys.exit(main())
