#!/usr/bin/env python3
"""Memory guard benchmark: reaction time, CPU cost, and 20 balloon trials under a real cgroup.

    .venv/bin/python benchmarks/memguard_bench.py [OUT.json] [--trials 20] [--cpu-s 30] [--reaction 10]

1. Reaction time. A balloon pre-allocates to just under a threshold, then jumps over it in
   one ~20 ms allocation and prints the CLOCK_MONOTONIC time once the memory is resident.
   Soft: from that moment to ``.stop`` written. Hard: to the term/kill carried out. The guard
   polls every 100 ms (the default), so the expected mean is ~half an interval. The stop
   prediction is switched off here (horizon 0) so that what is timed is the threshold itself,
   not an earlier prediction; in the hard runs the balloon ignores ``.stop`` (SIGTERM ends it).
   As in the daemon, the balloon runs as a ``Child`` and an ``Escalation`` carries out each
   decision (writes ``.stop``, sends the signals).
2. CPU cost. The guard polls a steady balloon every 100 ms for ``--cpu-s`` seconds; this
   process does nothing else, so its own user+system CPU time over the wall time is the cost.
3. Trials. ``--trials`` balloons growing at 100..1000 MiB/s under a 768 MiB cgroup, each
   honouring ``.stop``/SIGTERM by "checkpointing" (0.1..1 s, +20 MiB) its step counter and
   exiting 75. Counted: kernel OOM kills (the cgroup's oom_kill delta; target 0) and lost
   steps (the step the balloon reached minus the step it checkpointed; target 0). One guard
   serves every trial, as in the daemon, so it learns how long a stop takes.

Prints the figures and writes JSON (default ``bench-out/memguard.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import cgroups  # noqa: E402
from tests.support.guarded import start_worker, supervise  # noqa: E402
from trainerd.core.settings import MemorySettings  # noqa: E402
from trainerd.memguard import MemoryGuard  # noqa: E402

MiB = 1 << 20
BALLOON = str(REPO / "tests" / "bin" / "balloon.py")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class _Log:
    """Quiet, but keeps the worker's stdout lines (Child relays them as worker_output)."""

    def __init__(self) -> None:
        self.output: list[str] = []

    def info(self, event: str, **kw: Any) -> None:
        if event == "worker_output":
            self.output.append(kw.get("text", ""))

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def run_balloon(guard: MemoryGuard, cg: cgroups.TestCgroup, args: list[str], batch: Path, *,
                timeout_s: float = 30.0) -> dict:
    """Start a balloon in the cgroup, poll the guard every interval, carry out what it decides."""
    batch.mkdir(parents=True, exist_ok=True)
    for stale in (".stop", "state.json", "state.json.progress"):
        try:
            os.unlink(batch / stale)
        except FileNotFoundError:
            pass
    oom_before = cg.oom_kills()
    try:
        (cg.path / "memory.max_usage_in_bytes").write_text("0")  # v1: reset the high-water mark
    except OSError:
        pass
    log = _Log()
    child, esc = start_worker([sys.executable, BALLOON, "--state", str(batch / "state.json"), *args], batch, log,
                              cg=cg)
    run = supervise(guard, child, esc, batch, timeout_s=timeout_s)
    events = [{"t": a.acted_at, "action": a.decision.action, "reason": a.decision.reason,
               "usage_bytes": a.decision.usage_bytes, "poll_gap_s": round(a.poll_gap_s, 3),
               "rate_bytes_per_s": round(a.decision.rate_bytes_per_s), "time_to_hard_s": a.decision.time_to_hard_s}
              for a in run.acted]
    lines = [json.loads(line) for line in log.output if line.startswith("{")]
    jumped = [x for x in lines if "jumped_at" in x]
    crossed = [x["crossed_at"] for x in lines if "crossed_at" in x]
    try:
        reached = int((batch / "state.json.progress").read_text())
    except (OSError, ValueError):
        reached = 0
    try:
        saved = json.loads((batch / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        saved = 0
    try:
        peak = int((cg.path / "memory.max_usage_in_bytes").read_text())
    except (OSError, ValueError):
        peak = None
    rc = run.status.code if run.status.code is not None else -(run.status.signal or 0)
    return {"rc": rc, "events": events, "jumped_at": jumped[0]["jumped_at"] if jumped else None,
            "crossed_at": crossed[0] if crossed else None,
            "oom_kills": cg.oom_kills() - oom_before, "reached_step": reached, "checkpointed_step": saved,
            "lost_steps": reached - saved, "peak_bytes": peak}


def reaction(n: int, work: Path, log) -> dict:
    limit = 1536 * MiB
    res: dict[str, list] = {"soft_s": [], "hard_s": [], "hard_actions": []}
    settings = MemorySettings(interval_ms=100, checkpoint_estimate_s=0.0, psi_threshold=0.0, leak_horizon_s=0.0)
    with cgroups.memory_cgroup(limit) as cg:
        for kind, jump, threshold in (("soft", 150, settings.soft), ("hard", 270, settings.hard)):
            for i in range(n):
                # Up to 1200 MiB at 600 MiB/s (+ the interpreter: under soft, 1305 MiB, and too
                # slow for a 0.2 s prediction horizon to reach hard), hold, then jump across the
                # threshold in 2 MiB pieces; the balloon notes when the cgroup's working set passed
                # it. +150 stays under hard; +270 crosses hard (1459 MiB).
                # A fresh guard each time: nothing learned from the previous stop moves anything.
                guard = MemoryGuard(settings, log=log, cgroup=cg.path)
                guard.checkpoint_s = -2 * guard.interval_s  # prediction horizon 0: thresholds only
                b = work / f"{kind}{i}"
                # hard: the balloon ignores .stop (a worker deep in a long step), so the soft stop
                # written on the way up does not end it before hard is crossed
                stop = ["--stop-file", str(b / ".stop")] if kind == "soft" else []
                r = run_balloon(guard, cg, ["--rate-mib-s", "600", "--max-mib", "1200", "--jump-mib", str(jump),
                                            "--jump-after-s", "2.6", *stop,
                                            "--checkpoint-s", "0.05", "--max-s", "10",
                                            "--watch-cgroup", str(cg.path),
                                            "--watch-bytes", str(int(limit * threshold))], b)
                want = ("stop",) if kind == "soft" else ("term", "kill")
                acts = [e for e in r["events"] if e["action"] in want]
                if acts and r["crossed_at"]:
                    res[f"{kind}_s"].append(acts[0]["t"] - r["crossed_at"])
                    if kind == "hard":
                        res["hard_actions"].append(acts[0]["action"])
                else:
                    print(f"   {kind} trial {i}: no measurement (events {r['events']}, crossed {r['crossed_at']})")
    return res


def cpu_cost(seconds: float, work: Path, log) -> dict:
    with cgroups.memory_cgroup(1024 * MiB) as cg:
        guard = MemoryGuard(MemorySettings(interval_ms=100), log=log, cgroup=cg.path)
        proc = subprocess.Popen([sys.executable, BALLOON, "--rate-mib-s", "0", "--start-mib", "300",
                                 "--max-s", str(seconds + 30)], preexec_fn=cg.enter, start_new_session=True)
        try:
            time.sleep(1.0)
            guard.attach(proc.pid, work, time.monotonic())
            polls = 0
            poll_wall = []
            c0, t0 = _cpu_s(), time.monotonic()
            nxt = t0
            while time.monotonic() - t0 < seconds:
                nxt += guard.interval_s
                a = time.perf_counter()
                guard.poll(time.monotonic())
                poll_wall.append(time.perf_counter() - a)
                polls += 1
                time.sleep(max(0.0, nxt - time.monotonic()))
            cpu, wall = _cpu_s() - c0, time.monotonic() - t0
            guard.detach()
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"seconds": round(wall, 2), "polls": polls, "cpu_s": round(cpu, 4),
            "cpu_fraction_of_core": cpu / wall, "cpu_us_per_poll": cpu / polls * 1e6,
            "wall_us_per_poll_median": statistics.median(poll_wall) * 1e6,
            "wall_us_per_poll_p99": _pct(poll_wall, 99) * 1e6}


def trials(n: int, work: Path, log) -> dict:
    limit = 768 * MiB
    rates = [100, 200, 400, 800, 1000]
    ckpts = [0.1, 0.3, 0.6, 1.0]
    rows = []
    with cgroups.memory_cgroup(limit) as cg:
        guard = MemoryGuard(MemorySettings(interval_ms=100, psi_threshold=0.0, leak_horizon_s=0.0),
                            log=log, cgroup=cg.path)
        for i in range(n):
            rate, ck = rates[i % len(rates)], ckpts[(i // len(rates)) % len(ckpts)]
            b = work / f"trial{i:02d}"
            r = run_balloon(guard, cg, ["--rate-mib-s", str(rate), "--stop-file", str(b / ".stop"),
                                        "--checkpoint-s", str(ck), "--checkpoint-mib", "20", "--max-s", "30"], b)
            rows.append({"trial": i, "rate_mib_s": rate, "checkpoint_s": ck, "rc": r["rc"],
                         "actions": [f"{e['action']}:{e['reason']}" for e in r["events"]],
                         "poll_gap_ms": [round(e["poll_gap_s"] * 1e3) for e in r["events"]],
                         "stop_usage_mib": round(r["events"][0]["usage_bytes"] / MiB, 1) if r["events"] else None,
                         "peak_mib": round(r["peak_bytes"] / MiB, 1) if r["peak_bytes"] else None,
                         "oom_kills": r["oom_kills"], "reached_step": r["reached_step"],
                         "checkpointed_step": r["checkpointed_step"], "lost_steps": r["lost_steps"],
                         "guard_checkpoint_estimate_s": round(guard.checkpoint_s, 3)})
            print(f"  trial {i:2d}: {rate:5d} MiB/s ckpt {ck:.1f}s rc={r['rc']} {rows[-1]['actions']} "
                  f"(poll gap {rows[-1]['poll_gap_ms']} ms) "
                  f"stop@{rows[-1]['stop_usage_mib']} MiB peak {rows[-1]['peak_mib']} MiB "
                  f"oom={r['oom_kills']} lost={r['lost_steps']}", flush=True)
    return {"limit_mib": limit // MiB, "trials": rows,
            "kernel_oom_kills": sum(r["oom_kills"] for r in rows),
            "lost_steps": sum(r["lost_steps"] for r in rows),
            "graceful_exits": sum(r["rc"] == 75 for r in rows),
            "max_peak_fraction_of_limit": max((r["peak_mib"] or 0) for r in rows) / (limit / MiB)}


class _Quiet:
    def __getattr__(self, name):
        return lambda *a, **k: None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default=str(REPO / "bench-out" / "memguard.json"))
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--cpu-s", type=float, default=30.0)
    ap.add_argument("--reaction", type=int, default=10)
    a = ap.parse_args()
    reason = cgroups.unavailable_reason()
    result: dict = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                                "python": platform.python_version()}, "interval_ms": 100}
    if reason:
        print(f"SKIPPED: cannot create a memory cgroup: {reason}")
        result["skipped"] = reason
    else:
        work = Path(os.environ.get("TMPDIR", "/tmp")) / f"memguard-bench-{os.getpid()}"
        work.mkdir(parents=True)
        log = _Quiet()
        print(f"reaction time ({a.reaction} x soft, {a.reaction} x hard, 100 ms sampling)...", flush=True)
        r = reaction(a.reaction, work, log)
        result["reaction"] = {
            "soft_to_stop_written_ms": {"mean": statistics.mean(r["soft_s"]) * 1e3, "p50": _pct(r["soft_s"], 50) * 1e3,
                                        "max": max(r["soft_s"]) * 1e3, "n": len(r["soft_s"])} if r["soft_s"] else None,
            "hard_to_signal_decision_ms": {"mean": statistics.mean(r["hard_s"]) * 1e3, "p50": _pct(r["hard_s"], 50) * 1e3,
                                           "max": max(r["hard_s"]) * 1e3, "n": len(r["hard_s"]),
                                           "actions": r["hard_actions"]} if r["hard_s"] else None,
            "raw_soft_s": r["soft_s"], "raw_hard_s": r["hard_s"]}
        print(f"cpu cost ({a.cpu_s:.0f} s at 100 ms)...", flush=True)
        result["cpu"] = cpu_cost(a.cpu_s, work, log)
        print(f"{a.trials} balloon trials under 768 MiB...", flush=True)
        result["trials"] = trials(a.trials, work, log)
        import shutil
        shutil.rmtree(work, ignore_errors=True)
        rs, c, t = result["reaction"], result["cpu"], result["trials"]
        print()
        if rs["soft_to_stop_written_ms"]:
            s = rs["soft_to_stop_written_ms"]
            print(f"soft crossed -> .stop written: mean {s['mean']:.0f} ms, p50 {s['p50']:.0f} ms, max {s['max']:.0f} ms (n={s['n']})")
        if rs["hard_to_signal_decision_ms"]:
            h = rs["hard_to_signal_decision_ms"]
            print(f"hard crossed -> signal decision: mean {h['mean']:.0f} ms, p50 {h['p50']:.0f} ms, max {h['max']:.0f} ms "
                  f"(n={h['n']}, {sorted(set(h['actions']))})")
        print(f"cpu at 100 ms sampling: {c['cpu_fraction_of_core'] * 100:.3f}% of a core "
              f"({c['cpu_us_per_poll']:.0f} us CPU per poll, wall p50 {c['wall_us_per_poll_median']:.0f} us, "
              f"p99 {c['wall_us_per_poll_p99']:.0f} us, {c['polls']} polls)")
        print(f"trials: {len(t['trials'])}, graceful exits {t['graceful_exits']}, kernel OOM kills {t['kernel_oom_kills']}, "
              f"lost steps {t['lost_steps']}, max peak {t['max_peak_fraction_of_limit'] * 100:.1f}% of the limit")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
