#!/usr/bin/env python3
"""A publish hook for tests: appends what it was given (argv, every TRAINERD_* variable, its pid) to the
JSON-lines file argv[1], then does argv[2]: ``ok`` (exit 0), ``fail`` (exit 3), ``sleep:S`` (sleep S
seconds, then exit 0), ``helper:S`` (first start a helper process in its group that ignores SIGTERM
and sleeps S seconds — its pid is recorded as ``helper`` —, then sleep S). It prints a line on stdout and one on stderr (the daemon logs both)."""

import json
import os
import subprocess
import sys
import time


def main() -> int:
    record, mode = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ok"
    env = {k: v for k, v in os.environ.items() if k.startswith("TRAINERD_")}
    name, _, arg = mode.partition(":")
    helper = None
    if name == "helper":
        helper = subprocess.Popen([sys.executable, "-c", "import signal, sys, time; "
                                   "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(float(sys.argv[1]))", arg]).pid
    with open(record, "a") as f:
        f.write(json.dumps({"argv": sys.argv[1:], "env": env, "pid": os.getpid(), "helper": helper,
                            "at": time.time()}) + "\n")
    print(f"probe saw {env.get('TRAINERD_EVENT')} version={env.get('TRAINERD_VERSION')}", flush=True)
    print("probe stderr line", file=sys.stderr, flush=True)
    if name in ("sleep", "helper"):
        time.sleep(float(arg))
    if name == "fail":
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
