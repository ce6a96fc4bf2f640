"""The memory guard against real cgroups, real processes and real files."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import subprocess_env
from support.guarded import start_worker, stopping, supervise
from support.log import ListLog
from trainerd.core.settings import MemorySettings, TrainSettings
from trainerd.core.contract import StopReason
from trainerd.memguard import Cgroup, MemoryGuard, Sample, find_memory_cgroup, parse_psi
from trainerd.core.planning import estimate_training_bytes, read_model_shape

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
BALLOON = str(REPO / "tests" / "bin" / "balloon.py")
# A worker that ignores SIGTERM, and says when it does.
IGNORES_TERM = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ready', flush=True); time.sleep(60)")


def settings(**kw) -> MemorySettings:
    base = dict(interval_ms=50, kill_grace_s=2.0, psi_threshold=0.0, leak_horizon_s=0.0)
    base.update(kw)
    return MemorySettings(**base)


def wait_for_output(log: ListLog, text: str, timeout_s: float = 20.0) -> None:
    """Wait until the worker printed ``text`` (relayed by Child into the log as worker_output)."""
    deadline = time.monotonic() + timeout_s
    while not any(kw.get("text") == text for kw in log.find("worker_output")):
        assert time.monotonic() < deadline, f"worker never printed {text!r}"
        time.sleep(0.02)


@pytest.fixture
def worker(tmp_path):
    """A real idle worker started through Child, with the Escalation that acts for the guard."""
    log = ListLog()
    child, esc = start_worker(["sleep", "60"], tmp_path, log)
    yield child, esc, log
    child.kill_group()
    child.wait()


# --- limits and parsing -----------------------------------------------------------------


def test_v1_limit_detected_from_inside_a_real_cgroup(memcg, tmp_path):
    """A process placed in a v1 cgroup with a 300 MiB limit detects that limit and its source itself."""
    cg = memcg(300 * MiB)
    code = ("import json; from trainerd.memguard import MemoryGuard; from trainerd.core.settings import MemorySettings\n"
            "g = MemoryGuard(MemorySettings())\n"
            "print(json.dumps({'limit': g.limit_bytes, 'source': g.source, 'v': g.cgroup.version}))")
    out = subprocess.run([sys.executable, "-c", code], preexec_fn=cg.enter, env=subprocess_env(),
                         capture_output=True, text=True, timeout=30, check=True).stdout
    got = json.loads(out)
    assert got["limit"] == 300 * MiB
    assert got["source"].startswith(f"cgroup_v{cg.version}:") and cg.path.name in got["source"]


def test_v1_no_limit_huge_number_is_not_a_limit():
    """This process's own v1 cgroup says 9223372036854771712: that is "no limit", physical memory rules."""
    cg, _ = find_memory_cgroup()
    if cg is None or cg.version != 1:
        pytest.skip("this test reads a v1 cgroup reporting no limit")
    raw = (cg.path / "memory.limit_in_bytes").read_text().strip()
    if int(raw) < (1 << 62):
        pytest.skip(f"this process's cgroup has a real limit ({raw})")
    log = ListLog()
    g = MemoryGuard(MemorySettings(), log=log)
    assert g.cgroup_limit_bytes is None
    assert g.source.startswith("physical:")
    assert g.limit_bytes == g.physical_bytes
    assert log.find("memory_limit_detected")[0]["limit_bytes"] == g.physical_bytes


def test_configured_limit_wins_when_smaller(memcg):
    """memory.limit below the cgroup limit is the effective limit, with source config."""
    cg = memcg(500 * MiB)
    g = MemoryGuard(MemorySettings(limit=200 * MiB), cgroup=cg.path)
    assert (g.limit_bytes, g.source) == (200 * MiB, "config:memory.limit")
    g2 = MemoryGuard(MemorySettings(limit=900 * MiB), cgroup=cg.path)
    assert g2.limit_bytes == 500 * MiB and g2.source.startswith("cgroup_v")


def _write_v2(d: Path, *, current: int, max_: str, high: str = "max", inactive_file: int = 0, oom_kill: int = 0):
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.current").write_text(f"{current}\n")
    (d / "memory.max").write_text(f"{max_}\n")
    (d / "memory.high").write_text(f"{high}\n")
    (d / "memory.stat").write_text(
        f"anon {current - inactive_file}\nfile {inactive_file}\nkernel 0\nshmem 0\n"
        f"active_anon {current - inactive_file}\ninactive_anon 0\nactive_file 0\n"
        f"inactive_file {inactive_file}\nunevictable 0\n")
    (d / "memory.events").write_text(f"low 0\nhigh 0\nmax 7\noom 2\noom_kill {oom_kill}\noom_group_kill 0\n")
    (d / "memory.pressure").write_text("some avg10=1.50 avg60=0.20 avg300=0.05 total=12345\n"
                                       "full avg10=0.50 avg60=0.10 avg300=0.01 total=2345\n")


def test_v2_files_are_parsed(tmp_path):
    """v2 memory.current/max/high/stat/events/pressure in the kernel's format give usage, limit, OOM kills and PSI."""
    d = tmp_path / "trainerd.service"
    _write_v2(d, current=700 * MiB, max_=str(1024 * MiB), inactive_file=200 * MiB, oom_kill=3)
    cg = Cgroup.at(d)
    assert cg is not None and cg.version == 2
    g = MemoryGuard(MemorySettings(), cgroup=cg)
    assert g.limit_bytes == 1024 * MiB and g.source == f"cgroup_v2:{d / 'memory.max'}"
    assert g.kernel_oom_kills() == 3
    assert g.psi_path == d / "memory.pressure"
    s = g.sample(0.0)
    assert s.cgroup_usage_bytes == 700 * MiB and s.usage_bytes == 500 * MiB  # minus inactive_file
    assert s.psi_some_avg10 == 1.5


def test_v2_high_max_and_ancestors(tmp_path):
    """"max" is no limit; memory.high below memory.max counts; an ancestor's smaller limit applies."""
    top = tmp_path / "root"
    _write_v2(top, current=0, max_="max")
    parent = top / "system.slice"
    _write_v2(parent, current=0, max_=str(800 * MiB))
    child = parent / "trainerd.service"
    _write_v2(child, current=10 * MiB, max_="max")
    assert Cgroup(2, child, top=top).limit() == (800 * MiB, f"cgroup_v2:{parent / 'memory.max'}")
    (child / "memory.high").write_text(f"{600 * MiB}\n")
    assert Cgroup(2, child, top=top).limit() == (600 * MiB, f"cgroup_v2:{child / 'memory.high'}")
    assert Cgroup(2, top, top=top).limit() == (None, "")


def test_psi_parsing_of_format_and_real_file():
    """PSI lines parse into some/full averages, and this machine's /proc/pressure/memory parses."""
    got = parse_psi("some avg10=12.34 avg60=5.00 avg300=1.00 total=999\nfull avg10=3.21 avg60=0.00 avg300=0.00 total=7\n")
    assert got["some"]["avg10"] == 12.34 and got["full"]["avg10"] == 3.21 and got["some"]["total"] == 999
    p = Path("/proc/pressure/memory")
    if not p.exists():
        pytest.skip("no /proc/pressure/memory (kernel without PSI)")
    real = parse_psi(p.read_text())
    assert 0.0 <= real["some"]["avg10"] <= 100.0 and "avg300" in real["full"]


# --- decisions on real processes --------------------------------------------------------


@pytest.fixture
def sleeper():
    """A real idle process to attach the guard to."""
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


def test_sustained_psi_counts_as_soft(tmp_path, worker):
    """some avg10 above the threshold for psi_sustain_s decides "stop" (.stop "memory" once carried
    out); a dip resets the clock."""
    child, esc, log = worker
    psi = tmp_path / "pressure"
    psi.write_text("some avg10=80.00 avg60=50.00 avg300=10.00 total=1\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    g = MemoryGuard(settings(psi_threshold=40.0, psi_sustain_s=2.0), log=log, psi_path=psi)
    g.attach(child.pid, tmp_path, 100.0)

    def poll(now: float):
        d = g.poll(now)
        esc.apply_guard(d)
        return d

    assert poll(100.0).action == "none"
    assert poll(100.6).action == "none"
    psi.write_text("some avg10=10.00 avg60=50.00 avg300=10.00 total=2\n")
    assert poll(101.2).action == "none"  # dipped: the sustain clock restarts
    psi.write_text("some avg10=80.00 avg60=50.00 avg300=10.00 total=3\n")
    assert poll(101.8).action == "none"
    assert poll(103.0).action == "none"
    assert not (tmp_path / ".stop").exists()
    d = poll(103.9)
    assert (d.action, d.reason, d.psi_some_avg10) == ("stop", "psi", 80.0)
    assert (tmp_path / ".stop").read_text() == "memory"
    assert poll(105.0).action == "none"  # once
    assert log.find("memory_stop_decided")[0]["psi_some_avg10"] == 80.0
    assert child.poll() is None and esc.sent_by(signal.SIGTERM) is None  # a stop is a request, not a signal


def test_age_recycles_once(tmp_path, worker):
    """A worker older than max_worker_age_s is recycled (.stop "recycle" once carried out), once."""
    child, esc, log = worker
    g = MemoryGuard(settings(max_worker_age_s=5.0), log=log)
    g.attach(child.pid, tmp_path, 1000.0)
    assert g.poll(1004.9).action == "none"
    d = g.poll(1005.0)
    assert (d.action, d.reason) == ("recycle", "age")
    esc.apply_guard(d)
    assert (tmp_path / ".stop").read_text() == "recycle"
    assert esc.cause is StopReason.RECYCLE
    assert g.poll(1006.0).action == "none"
    assert [kw["reason"] for kw in log.find("memory_recycle_decided")] == ["age"]


def _fake(g: MemoryGuard, usage: int, limit: int, t: float) -> Sample:
    return Sample(t=t, usage_bytes=usage, limit_bytes=limit, source="test", tree_bytes=usage, tree_rss_bytes=usage,
                  tree_pids=1, cgroup_usage_bytes=None, inactive_file_bytes=None, mem_available_bytes=limit,
                  psi_some_avg10=None, alive=True)


def test_sustained_growth_is_stopped_before_soft(tmp_path, sleeper):
    """Growing 30 MiB/s for 10 s past 65% of 1 GiB, a 5 s stop would pass hard: stop now (predicted), before soft."""
    g = MemoryGuard(settings(checkpoint_estimate_s=5.0))
    g.attach(sleeper.pid, tmp_path, 0.0)
    limit = 1024 * MiB
    for i in range(200):
        d = g.decide(_fake(g, int(0.55 * limit) + i * 3 * MiB, limit, i * 0.1), i * 0.1)
        if d.action != "none":
            break
    assert (d.action, d.reason) == ("stop", "predicted")
    assert d.usage_bytes < d.soft_bytes and 25 * MiB < d.rate_bytes_per_s < 35 * MiB
    assert 0 < d.time_to_hard_s < 5.2


def test_runaway_is_stopped_when_hard_is_three_polls_away(tmp_path, sleeper):
    """1 GiB/s under 768 MiB: stopped (predicted_fast) before soft, with no history needed."""
    g = MemoryGuard(settings(interval_ms=100))
    g.attach(sleeper.pid, tmp_path, 0.0)
    limit = 768 * MiB
    for i in range(20):
        d = g.decide(_fake(g, i * 100 * MiB, limit, i * 0.1), i * 0.1)
        if d.action != "none":
            break
    assert (d.action, d.reason) == ("stop", "predicted_fast")
    assert 0.65 * limit <= d.usage_bytes < d.soft_bytes


def test_training_sawtooth_below_soft_is_left_alone(tmp_path, sleeper):
    """Steps rising 30% -> 80% over 6 s and falling, for 2 minutes, look like training, not a runaway: no stop."""
    g = MemoryGuard(settings(checkpoint_estimate_s=5.0))
    g.attach(sleeper.pid, tmp_path, 0.0)
    limit = 4096 * MiB
    for i in range(1200):
        t = i * 0.1
        ph = (t % 7.0) / 7.0
        frac = 0.3 + 0.5 * ph / 0.85 if ph < 0.85 else 0.8 - 0.5 * (ph - 0.85) / 0.15
        d = g.decide(_fake(g, int(frac * limit), limit, t), t)
        assert d.action == "none", (t, d)


def test_burst_then_plateau_and_one_off_jump_do_not_predict_a_stop(tmp_path, sleeper):
    """A burst to 60% (loading), a plateau, a one-off jump to 72% (past where predictions start), a plateau: no stop."""
    g = MemoryGuard(settings(checkpoint_estimate_s=5.0))
    g.attach(sleeper.pid, tmp_path, 0.0)
    limit = 1024 * MiB
    for i in range(200):
        frac = 0.60 * min(1.0, i / 8) + (0.12 if i >= 60 else 0.0)  # 0 -> 60% in 0.8 s; +12% at 6 s
        d = g.decide(_fake(g, int(frac * limit), limit, i * 0.1), i * 0.1)
        assert d.action == "none", (i, d)


def test_flat_usage_near_soft_does_not_stop(tmp_path, sleeper):
    """Sitting flat at 80% (below soft) is not a reason to stop, however long it lasts."""
    g = MemoryGuard(settings())
    g.attach(sleeper.pid, tmp_path, 0.0)
    limit = 1024 * MiB
    for i in range(300):
        d = g.decide(_fake(g, int(0.80 * limit) + (i % 3) * 1000, limit, i * 0.1), i * 0.1)
        assert d.action == "none"


def test_term_then_kill_after_grace(tmp_path):
    """At hard: "term" (.stop "memory", then SIGTERM); a worker ignoring it is still alive
    kill_grace_s later: "kill", logged as the guard's, and SIGKILL ends it."""
    log = ListLog()
    child, esc = start_worker([sys.executable, "-c", IGNORES_TERM], tmp_path, log)
    try:
        wait_for_output(log, "ready")
        g = MemoryGuard(settings(kill_grace_s=2.0), log=log)
        g.attach(child.pid, tmp_path, 0.0)
        limit = 1000 * MiB
        d = g.decide(_fake(g, 960 * MiB, limit, 1.0), 1.0)
        assert (d.action, d.reason) == ("term", "hard")
        esc.apply_guard(d)
        assert (tmp_path / ".stop").read_text() == "memory"
        assert esc.sent_by(signal.SIGTERM) is stopping.Sender.GUARD
        assert child.wait(0.3) is None  # ignored
        assert g.decide(_fake(g, 960 * MiB, limit, 2.0), 2.0).action == "none"
        d = g.decide(_fake(g, 960 * MiB, limit, 3.0), 3.0)
        assert (d.action, d.reason) == ("kill", "grace")
        esc.apply_guard(d)
        assert child.wait(10).signal == signal.SIGKILL
        assert esc.sent_by(signal.SIGKILL) is stopping.Sender.GUARD
        assert log.find("memory_kill_decided")[0]["by"] == "memory_guard"
    finally:
        child.kill_group()
        child.wait()


def test_leak_recycles_and_flat_does_not(tmp_path):
    """Steady growth after warm-up that would reach soft within the horizon recycles; a plateau does not."""
    s = settings(limit=2048 * MiB, leak_horizon_s=3600.0, leak_warmup_s=0.3, leak_window_s=1.5)
    for rate, expect in ((60.0, "recycle"), (0.0, None)):
        batch = tmp_path / f"rate{int(rate)}"
        batch.mkdir()
        log = ListLog()
        g = MemoryGuard(s, log=log, cgroup=None)
        cmd = [sys.executable, BALLOON, "--rate-mib-s", str(rate), "--start-mib", "50", "--max-mib", "400",
               "--max-s", "3.5", "--stop-file", str(batch / ".stop"), "--checkpoint-s", "0.05"]
        run = supervise(g, *start_worker(cmd, batch, log), batch)
        if expect:
            assert [(a.decision.action, a.decision.reason) for a in run.acted] == [("recycle", "leak")]
            assert run.status.code == 75 and (batch / ".stop").read_text() == "recycle"
            assert log.find("memory_leak_detected")[0]["leak_bytes_per_s"] > 30 * MiB
        else:
            assert run.acted == [] and run.status.code == 0


def test_one_off_step_up_is_not_a_leak(tmp_path, sleeper):
    """A single +5% step in a long flat stretch at 75% (arenas, first checkpoint) does not recycle; steady growth does."""
    s = settings(leak_horizon_s=3600.0, leak_warmup_s=0.0, leak_window_s=60.0)
    limit = 1024 * MiB
    for leak, expect in ((False, "none"), (True, "recycle")):
        g = MemoryGuard(s)
        g.attach(sleeper.pid, tmp_path / str(leak), 0.0)
        (tmp_path / str(leak)).mkdir()
        acted = []
        for i in range(1200):  # 120 s at 100 ms
            t = i * 0.1
            frac = 0.70 + (0.05 * t / 120 if leak else (0.05 if t >= 60 else 0.0))
            d = g.decide(_fake(g, int(frac * limit), limit, t), t)
            acted += [(d.action, d.reason)] if d.action != "none" else []
        assert acted == ([] if expect == "none" else [("recycle", "leak")])


def test_tree_counts_children(tmp_path):
    """The worker's whole tree counts: a shell with two 100 MiB balloon children is ~200 MiB."""
    g = MemoryGuard(settings())
    one = f"{sys.executable} {BALLOON} --rate-mib-s 0 --start-mib 100 --max-s 3"
    proc = subprocess.Popen(["sh", "-c", f"{one} & {one} & wait"], start_new_session=True)
    try:
        g.attach(proc.pid, tmp_path, time.monotonic())
        deadline = time.monotonic() + 10
        s = g.sample(time.monotonic())
        while s.tree_bytes < 200 * MiB and time.monotonic() < deadline:
            time.sleep(0.2)
            s = g.sample(time.monotonic())
        assert s.tree_pids == 3
        assert 200 * MiB <= s.tree_bytes < 260 * MiB
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_poll_is_cheap(tmp_path, sleeper):
    """One poll costs well under a millisecond of CPU (100 ms sampling must stay far below 1% of a core)."""
    g = MemoryGuard(settings())
    g.attach(sleeper.pid, tmp_path, time.monotonic())
    t0 = time.process_time()
    for _ in range(500):
        g.poll(time.monotonic())
    per_poll = (time.process_time() - t0) / 500
    assert per_poll < 0.5e-3, f"{per_poll * 1e6:.0f} us per poll"


# --- real cgroups, real balloons ---------------------------------------------------------


@pytest.mark.cgroup
def test_kernel_oom_is_counted_without_guard(memcg, tmp_path):
    """Control: unguarded, a balloon past a 200 MiB limit is SIGKILLed by the kernel and oom_kill counts it."""
    cg = memcg(200 * MiB)
    g = MemoryGuard(settings(), cgroup=cg.path)
    rc = subprocess.run([sys.executable, BALLOON, "--rate-mib-s", "400", "--max-s", "10"], preexec_fn=cg.enter,
                        timeout=30).returncode
    assert rc == -signal.SIGKILL
    assert g.kernel_oom_kills() == 1


@pytest.mark.cgroup
def test_fast_balloon_stops_gracefully_before_the_limit(memcg, tmp_path):
    """200 MiB/s under 600 MiB: .stop "memory" before the limit, the balloon checkpoints and exits 75, no OOM kill."""
    cg = memcg(600 * MiB)
    log = ListLog()
    g = MemoryGuard(settings(interval_ms=100), log=log, cgroup=cg.path)
    state = tmp_path / "state.json"
    cmd = [sys.executable, BALLOON, "--rate-mib-s", "200", "--stop-file", str(tmp_path / ".stop"),
           "--checkpoint-s", "0.3", "--checkpoint-mib", "10", "--state", str(state)]
    child, esc = start_worker(cmd, tmp_path, log, cg=cg)
    run = supervise(g, child, esc, tmp_path)
    assert run.status.code == 75
    assert run.actions == ["stop"] and run.acted[0].decision.reason in ("soft", "predicted")
    assert (tmp_path / ".stop").read_text() == "memory" and esc.sent_by(signal.SIGTERM) is None
    assert cg.oom_kills() == 0
    assert run.max_usage_bytes < 0.95 * 600 * MiB
    reached = int((tmp_path / "state.json.progress").read_text())
    assert json.loads(state.read_text())["step"] == reached  # no step lost
    assert log.find("memory_stop_timing_learned")  # learned how long a stop takes


@pytest.mark.cgroup
def test_balloon_ignoring_stop_and_term_is_killed_by_the_guard(memcg, tmp_path):
    """Ignoring .stop and SIGTERM, a 100 MiB/s balloon gets stop, term, then kill from the guard; kernel OOM kills 0.
    (Between hard, 570 MiB, and the kill margin, 585 MiB, lie 150 ms of its growth: a poll can come 100 ms late
    and still send the term; at 200 MiB/s a loaded machine's late poll rightly went straight to kill.)"""
    cg = memcg(600 * MiB)
    log = ListLog()
    g = MemoryGuard(settings(interval_ms=50, kill_grace_s=5.0), log=log, cgroup=cg.path)
    cmd = [sys.executable, BALLOON, "--rate-mib-s", "100", "--ignore-term"]
    child, esc = start_worker(cmd, tmp_path, log, cg=cg)
    run = supervise(g, child, esc, tmp_path)
    assert run.status.signal == signal.SIGKILL
    assert run.actions == ["stop", "term", "kill"]
    assert run.acted[-1].decision.reason in ("margin", "imminent")
    assert (tmp_path / ".stop").read_text() == "memory"
    assert esc.sent_by(signal.SIGTERM) is esc.sent_by(signal.SIGKILL) is stopping.Sender.GUARD
    assert cg.oom_kills() == 0  # the guard, not the kernel, ended it
    assert "memory_kill_decided" in log.events()


@pytest.mark.cgroup
def test_reading_a_file_larger_than_the_limit_does_not_stop(memcg, tmp_path):
    """cat of a 600 MiB file inside a 300 MiB cgroup fills it with page cache, yet no stop: inactive_file is subtracted."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        block = os.urandom(MiB)
        for _ in range(600):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # not cached (nor charged) to us
    cg = memcg(300 * MiB)
    g = MemoryGuard(settings(interval_ms=20), cgroup=cg.path)
    raw_max = 0
    proc = subprocess.Popen(["sh", "-c", f"for i in 1 2; do cat {big} > /dev/null; done"], preexec_fn=cg.enter)
    g.attach(proc.pid, tmp_path, time.monotonic())
    try:
        while proc.poll() is None:
            now = time.monotonic()
            s = g.sample(now)
            raw_max = max(raw_max, s.cgroup_usage_bytes or 0)
            d = g.decide(s, now)
            assert d.action == "none", d
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        g.detach()
    assert proc.returncode == 0
    assert raw_max > 0.95 * 300 * MiB  # the raw number alone would have stopped (and killed) it
    assert cg.oom_kills() == 0


# --- planning ---------------------------------------------------------------------------


def _smollm2_like(d: Path) -> Path:
    """config.json + a safetensors header (no tensor data) shaped like SmolLM2-135M."""
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True}))
    # SmolLM2's parameters by role: tied embedding, the decoder's projections, the norms
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [49152, 576], "data_offsets": [0, 0]},
                         "model.layers.weight": {"dtype": "F32", "shape": [184320, 576], "data_offsets": [0, 0]},
                         "model.norm.weight": {"dtype": "F32", "shape": [35136], "data_offsets": [0, 0]},
                         "__metadata__": {"format": "pt"}}).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return d


@pytest.mark.parametrize("precision, peaks_mib", [
    ("float32", ((8, 671), (4, 524), (1, 422))),
    ("bfloat16", ((8, 662), (4, 537), (1, 432))),
])
def test_estimate_covers_measured_tiny_model_peaks(tiny_model_dir, precision, peaks_mib):
    """Estimates cover (within 25% above) the worker peaks measured here (fused loss), seq 2048 x micro 8 / 4 / 1."""
    shape = read_model_shape(tiny_model_dir)
    for micro, measured_mib in peaks_mib:
        est = estimate_training_bytes(shape, micro, 2048, precision=precision) / MiB
        assert measured_mib <= est <= 1.25 * measured_mib, (micro, est)


@pytest.mark.parametrize("precision, fused, micro, measured_gib", [
    ("float32", True, 4, 2.742), ("float32", True, 8, 4.195), ("bfloat16", True, 4, 2.237),
    ("float32", False, 4, 3.077), ("float32", False, 8, 5.284), ("bfloat16", False, 4, 2.668),
])
def test_estimate_matches_measured_smollm2(tmp_path, precision, fused, micro, measured_gib):
    """SmolLM2-135M at seq 256: the torch-free estimate is at most 12% above the peak measured by
    benchmarks/loss_memory.py (fused loss or transformers' own, fp32 or bf16), never below it."""
    shape = read_model_shape(_smollm2_like(tmp_path / "m"))
    assert shape["params"] == 134515008 and shape["head_dim"] == 64
    est = estimate_training_bytes(shape, micro, 256, precision=precision, fused_loss=fused) / (1 << 30)
    assert measured_gib <= est <= 1.12 * measured_gib
    assert estimate_training_bytes(shape, 1, 256, gradient_checkpointing=True) < estimate_training_bytes(shape, 1, 256)


def test_plan_tiny_limit_gives_micro_batch_1_with_checkpointing(tmp_path, tiny_model_dir):
    """Under a tiny limit the plan is micro-batch 1 + gradient checkpointing, effective batch kept, and says so."""
    log = ListLog()
    g = MemoryGuard(MemorySettings(limit=500 * MiB), log=log, cgroup=None)
    train = TrainSettings(seq_len=2048, micro_batch_size=8, grad_accum_steps=2)
    p = g.plan(tiny_model_dir, train)
    assert (p.micro_batch_size, p.grad_accum_steps, p.gradient_checkpointing) == (1, 16, True)
    assert p.limit_bytes <= 500 * MiB
    fields = (log.find("memory_plan_reduced") or log.find("memory_plan_does_not_fit"))[0]
    assert fields["effective_batch"] == 16 and fields["configured_micro_batch_size"] == 8


def test_plan_big_limit_keeps_configuration(tmp_path, tiny_model_dir):
    """With room to spare the configured micro-batch and accumulation are kept."""
    log = ListLog()
    g = MemoryGuard(MemorySettings(limit=16 << 30), log=log)
    p = g.plan(tiny_model_dir, TrainSettings(seq_len=64, micro_batch_size=4, grad_accum_steps=4))
    assert (p.micro_batch_size, p.grad_accum_steps, p.gradient_checkpointing, p.fits) == (4, 4, False, True)
    assert p.estimate_bytes < p.budget_bytes and log.find("memory_plan_kept")


def test_plan_halves_and_keeps_effective_batch(tmp_path):
    """SmolLM2 at micro 8 under 3.5 GiB halves to what fits, doubling accumulation: micro x accum unchanged."""
    g = MemoryGuard(MemorySettings(limit=7 << 29))
    p = g.plan(_smollm2_like(tmp_path / "m"), TrainSettings(seq_len=256, micro_batch_size=8,
                                                                       grad_accum_steps=3))
    # micro 4 since the fused loss (it was 1 or 2 while the estimate carried the full logits)
    assert p.micro_batch_size in (2, 4) and p.micro_batch_size * p.grad_accum_steps == 24
    assert p.estimate_bytes <= p.budget_bytes and not p.gradient_checkpointing


@pytest.mark.cgroup
def test_limit_change_at_runtime_is_seen_and_logged(memcg, tmp_path, sleeper):
    """Raising the cgroup limit while a worker runs (systemctl set-property) is picked up and logged."""
    cg = memcg(300 * MiB)
    log = ListLog()
    g = MemoryGuard(settings(), log=log, cgroup=cg.path)
    g.attach(sleeper.pid, tmp_path, 0.0)
    assert g.poll(0.0).limit_bytes <= 300 * MiB
    name = "memory.max" if cg.version == 2 else "memory.limit_in_bytes"
    if cg.version == 1 and (cg.path / "memory.memsw.limit_in_bytes").exists():
        (cg.path / "memory.memsw.limit_in_bytes").write_text(str(400 * MiB))  # raising: memsw first
    (cg.path / name).write_text(str(400 * MiB))
    assert g.poll(10.0).limit_bytes == 400 * MiB
    assert log.find("memory_limit_changed")[0]["previous_limit_bytes"] == 300 * MiB


def test_without_cgroup_limit_tree_usage_against_configured_limit(tmp_path):
    """No cgroup limit (this process's cgroup has none): the worker tree's memory is compared with memory.limit."""
    g = MemoryGuard(settings(limit=400 * MiB, interval_ms=50))
    if g.cgroup_limit_bytes is not None:
        pytest.skip(f"this process runs under a cgroup limit ({g.cgroup_limit_bytes} bytes)")
    state = tmp_path / "state.json"
    cmd = [sys.executable, BALLOON, "--rate-mib-s", "200", "--stop-file", str(tmp_path / ".stop"),
           "--checkpoint-s", "0.1", "--state", str(state), "--max-s", "10"]
    run = supervise(g, *start_worker(cmd, tmp_path, ListLog()), tmp_path)
    assert run.status.code == 75 and run.actions == ["stop"]
    stop = run.acted[0].decision
    assert stop.source == "config:memory.limit" and stop.usage_bytes == stop.tree_bytes
    assert (tmp_path / ".stop").read_text() == "memory"
    assert run.max_usage_bytes < 0.95 * 400 * MiB
    assert json.loads(state.read_text())["held_bytes"] < 400 * MiB


def test_leak_under_a_training_sawtooth_recycles_and_a_clean_sawtooth_does_not(tmp_path, sleeper):
    """Steps 30% -> 60% every 7 s: with +0.05%/s beneath them a recycle (leak), without it nothing."""
    s = settings(leak_horizon_s=3600.0, leak_warmup_s=0.0, leak_window_s=60.0)
    limit = 4096 * MiB
    for leak in (0.0, 0.0005):
        (tmp_path / str(leak)).mkdir()
        g = MemoryGuard(s)
        g.attach(sleeper.pid, tmp_path / str(leak), 0.0)
        acted = []
        for i in range(1500):
            t = i * 0.1
            ph = (t % 7.0) / 7.0
            frac = leak * t + (0.3 + 0.3 * ph / 0.85 if ph < 0.85 else 0.6 - 0.3 * (ph - 0.85) / 0.15)
            d = g.decide(_fake(g, int(frac * limit), limit, t), t)
            acted += [(d.action, d.reason)] if d.action != "none" else []
        assert acted == ([("recycle", "leak")] if leak else [])
