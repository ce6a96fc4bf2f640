"""The daemon talks to systemd over a real NOTIFY_SOCKET: READY after reconcile and the first
scan, STATUS on changes, WATCHDOG from the main loop (also while a worker runs), STOPPING on
shutdown; the worker never inherits the notify variables."""

from __future__ import annotations

import json
import signal
import socket
import sys
import time

from test_supervisor import FAKE, FAKE_WORKER_CONFIG


def test_notify_ready_status_watchdog_stopping(daemon_factory, tmp_path):
    """A real datagram socket receives READY, STATUS, periodic WATCHDOG and STOPPING; the
    worker's environment has no NOTIFY_SOCKET/WATCHDOG_USEC."""
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    d = daemon_factory(model_dir=tmp_path / "m", **FAKE_WORKER_CONFIG,
                       supervisor={"settle_s": 0, "rescan_s": 30, "stop_grace_s": 5}, log={"file": False},
                       env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "600000", "WATCHDOG_PID": None,
                            "TRAINERD_WORKER_CMD": f"{sys.executable} {FAKE}"})
    root = d.root
    d.start(wait=False)  # READY itself says when it is up
    msgs: list[tuple[float, str]] = []

    def collect(until, timeout=20.0):
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, msgs
            try:
                msgs.append((time.monotonic(), sock.recv(4096).decode()))
            except socket.timeout:
                pass

    try:
        collect(lambda: any("READY=1" in m for _, m in msgs))
        assert (root / "state.db").exists()  # READY only after the ledger is open and reconciled
        (root / "inbox" / "a.jsonl").write_text(json.dumps({"plan": ["wait"]}) + "\n")
        collect(lambda: any("STATUS=training batch 1" in m for _, m in msgs))
        t_train = time.monotonic()
        collect(lambda: sum(1 for t, m in msgs if "WATCHDOG=1" in m and t > t_train) >= 3)
        worker_pid = json.loads((root / "daemon.json").read_text())["running"]["pid"]
        with open(f"/proc/{worker_pid}/environ", "rb") as f:
            worker_env = f.read().split(b"\0")
        assert not any(v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_USEC=")) for v in worker_env)
        d.send(signal.SIGTERM)
        collect(lambda: any("STOPPING=1" in m for _, m in msgs))
        assert d.wait_exit(30) == 0
    finally:
        sock.close()
    pings = [t for t, m in msgs if "WATCHDOG=1" in m]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert gaps and max(gaps) < 0.6, gaps  # every half WatchdogSec at most, with the worker running
