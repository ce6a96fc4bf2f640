"""A stand-in for the supervisor under a real systemd: Type=notify through trainerd.supervisor.sdnotify.

Sleeps READY_DELAY_S (default 2) before READY=1 (so a test can see that `systemctl start`
waits for it), then pings WATCHDOG=1 every half interval until SIGTERM, which it answers with
STOPPING=1 and exit 0. With STOP_PINGING_AFTER_S set it stops pinging (the watchdog must fire).
Writes what it saw (its environment's watchdog interval, its uid) to $STATE_DIRECTORY/fake.json.
"""

import json
import os
import signal
import sys
import time

from trainerd.supervisor.sdnotify import Notifier

stop = False


def on_term(signum, frame):
    global stop
    stop = True  # record only; the loop acts


signal.signal(signal.SIGTERM, on_term)
n = Notifier.from_env(unset_environment=True)
interval = n.watchdog_interval_s()
state = os.environ.get("STATE_DIRECTORY", ".")
with open(os.path.join(state, "fake.json"), "w") as f:
    json.dump({"watchdog_s": interval, "uid": os.getuid(), "cwd": os.getcwd(),
               "notify_socket_left": "NOTIFY_SOCKET" in os.environ}, f)
time.sleep(float(os.environ.get("READY_DELAY_S", "2")))
n.ready(status="fake daemon ready")
t0 = time.monotonic()
stop_after = float(os.environ.get("STOP_PINGING_AFTER_S", "0") or 0)
while not stop:
    if interval and not (stop_after and time.monotonic() - t0 > stop_after):
        n.watchdog()
    time.sleep(min(interval / 2 if interval else 1.0, 1.0))
n.stopping(status="fake daemon stopping")
sys.exit(0)
