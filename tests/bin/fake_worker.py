#!/usr/bin/env python3
"""A stand-in for ``python -m trainerd.worker`` that speaks the contract in docs/architecture.md.

Fast supervisor tests use it instead of the real (torch) worker. What attempt k does comes
from the first line of BATCH_DIR/data.jsonl, ``{"plan": ["crash", "done"], ...}``: attempt k
runs ``plan[min(k - 1, len(plan) - 1)]``. Actions:

  done          publish an adapter folder to --publish, write result.json, exit 0
  done:nan      the same with a NaN training loss (the gate rejects the candidate)
  done:eval     the same with an eval.json: its new set and one set per earlier batch (the gate passes)
  stop:REASON   write result.json (stopped, REASON), exit 75
  bad_data      result.json with line errors, exit 65
  bad_config    exit 78
  exit:N        exit N without a result (a crash)
  segv          die by SIGSEGV
  sigkill       die by SIGKILL that nobody in trainerd sent (what the kernel OOM killer does)
  wait          run until told to stop (batch .stop, root .stop, SIGTERM, EOF on stdin), then
                checkpoint-free exit 75 with the reason; ``wait:S`` finishes as ``done`` after S s
  ignore_term   ignore SIGTERM (then create BATCH_DIR/term_ignored) and sleep until killed
  grandchild    start a sleeping grandchild (pid in grandchild.pid), then ``wait``
  beat:S        beat the heartbeat (BATCH_DIR/heartbeat) every 0.5 s for S seconds, then ``done``

Every attempt that ends with ``done`` or ``stop`` leaves a checkpoint folder
(BATCH_DIR/checkpoints/step-0000000N/state.json, N = the attempt) as the real worker would, and
``done`` a TensorBoard run (ROOT/tensorboard/<batch folder name>/).
Every start appends its argv to BATCH_DIR/fake_calls.jsonl. Stdout gets JSON log lines and
one plain text line; stderr gets one line.
"""

import json
import os
import select
import signal
import stat
import subprocess
import sys
import time


def main() -> int:
    batch_dir = sys.argv[1]
    args = sys.argv[2:]
    opts = {args[i]: args[i + 1] for i in range(0, len(args) - 1, 2)}
    calls = os.path.join(batch_dir, "fake_calls.jsonl")
    with open(calls, "a") as f:
        f.write(json.dumps({"argv": sys.argv[1:], "pid": os.getpid()}) + "\n")
    with open(calls) as f:
        attempt = sum(1 for _ in f)
    with open(os.path.join(batch_dir, "data.jsonl")) as f:
        plan = json.loads(f.readline()).get("plan", ["done"])
    action = plan[min(attempt - 1, len(plan) - 1)]
    with open(os.path.join(batch_dir, "settings.json")) as f:
        settings = json.load(f)
    root = settings["root"]

    def log(event, **kw):
        # After the supervisor dies, stdout is a pipe without a reader: EPIPE must not kill a
        # worker that is about to checkpoint (the contract says: treat it like parent_gone).
        try:
            print(json.dumps({"timestamp": "2026-01-01T00:00:00Z", "level": "info", "event": event, **kw}),
                  flush=True)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)

    def result(status, reason, code, **kw):
        body = {"status": status, "reason": reason, "exit_code": code, "step": 3, "total_steps": 10,
                "micro_batch_size": settings["train"]["micro_batch_size"],
                "grad_accum_steps": settings["train"]["grad_accum_steps"], **kw}
        tmp = os.path.join(batch_dir, ".result.tmp")
        with open(tmp, "w") as f:
            json.dump(body, f)
        os.replace(tmp, os.path.join(batch_dir, "result.json"))
        log("worker_exit", status=status, reason=reason, exit_code=code)
        return code

    def checkpoint():
        ck = os.path.join(batch_dir, "checkpoints", f"step-{attempt:08d}")
        os.makedirs(ck, exist_ok=True)
        with open(os.path.join(ck, "state.json"), "w") as f:
            json.dump({"step": attempt}, f)
        # progress.json names its newest checkpoint, as the real worker's does (the metrics read it).
        prog = os.path.join(batch_dir, "progress.json")
        try:
            with open(prog) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        data["checkpoint"] = {"step": attempt, "at": time.time(), "seconds": 0.001}
        with open(prog + ".tmp", "w") as f:
            json.dump(data, f)
        os.replace(prog + ".tmp", prog)

    def write_eval():
        # The shape trainerd/worker/evaluate.py writes; one earlier set per earlier batch.
        bid = int(os.path.basename(batch_dir))
        figures = lambda loss: {"mean_loss": loss, "tokens": 10, "per_example": []}  # noqa: E731
        sets = [{"name": f"{bid:06d}:holdout.jsonl", "kind": "new", "sha256": "0" * 64, "used": 2,
                 "candidate": figures(1.0), "champion": figures(1.1)}]
        sets += [{"name": f"batch {k:06d}", "kind": "earlier", "sha256": "0" * 64, "used": 3,
                  "candidate": figures(2.0 + k / 1000), "champion": figures(2.0 + k / 1000)} for k in range(1, bid)]
        with open(os.path.join(batch_dir, "eval.json"), "w") as f:
            json.dump({"sets": sets}, f)

    def done(**extra):
        checkpoint()
        run = os.path.join(root, "tensorboard", os.path.basename(batch_dir))  # its curves, as the real one
        os.makedirs(run, exist_ok=True)
        with open(os.path.join(run, f"events.out.tfevents.{attempt}.fake"), "wb") as f:
            f.write(b"\0" * 100)
        pub = opts["--publish"]
        tmp = pub + ".tmp"
        os.makedirs(tmp)
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump({"init_adapter": opts.get("--init-adapter"), "batch_dir": batch_dir}, f)
        os.rename(tmp, pub)
        return result("done", "done", 0, adapter=pub, **extra)

    log("fake_worker_started", action=action, attempt=attempt, batch="not-mine")
    try:
        print("plain text from the worker", flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    print("a line on stderr", file=sys.stderr, flush=True)
    with open(os.path.join(batch_dir, "progress.json"), "w") as f:
        json.dump({"step": 3, "total_steps": 10, "tokens_per_s": 123.4, "eta_s": 42, "rss_bytes": 50 << 20}, f)

    name, _, arg = action.partition(":")
    if name == "done":
        if arg == "eval":
            write_eval()
        return done(last_loss=float("nan")) if arg == "nan" else done()
    if name == "stop":
        checkpoint()
        return result("stopped", arg, 75)
    if name == "bad_data":
        return result("bad_data", "too many bad lines", 65, lines_good=1, lines_bad=2,
                      errors=[{"line": 2, "offset": 10, "reason": "invalid JSON"},
                              {"line": 3, "offset": 20, "reason": "missing text"}])
    if name == "bad_config":
        return result("bad_config", "model.path: no such model", 78)
    if name == "exit":
        return int(arg)
    if name == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if name == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if name == "beat":
        hb = os.path.join(batch_dir, "heartbeat")
        with open(hb, "w") as f:
            f.write("train")
        end = time.monotonic() + float(arg)
        while time.monotonic() < end:
            os.utime(hb)
            time.sleep(0.5)
        return done()
    if name == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open(os.path.join(batch_dir, "term_ignored"), "w").close()  # tests wait for this, not a guess
        while True:
            time.sleep(1)
    if name == "grandchild":
        gc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(os.path.join(batch_dir, "grandchild.pid.tmp"), "w") as f:
            f.write(str(gc.pid))
        # Renamed in whole: a test that sees the file can read the pid (never an empty file).
        os.replace(os.path.join(batch_dir, "grandchild.pid.tmp"), os.path.join(batch_dir, "grandchild.pid"))
    # "wait", "wait:S" and "grandchild": honour every stop request of the contract.
    stop = {"reason": None}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(reason="shutdown"))
    finish_at = time.monotonic() + float(arg) if name == "wait" and arg else None
    stdin_is_pipe = stat.S_ISFIFO(os.fstat(0).st_mode)
    while stop["reason"] is None:
        if finish_at is not None and time.monotonic() >= finish_at:
            return done()
        own = os.path.join(batch_dir, ".stop")
        if os.path.exists(own):
            with open(own) as f:
                stop["reason"] = f.read().strip() or "memory"
        elif os.path.exists(os.path.join(root, ".stop")):
            stop["reason"] = "paused"
        elif stdin_is_pipe and select.select([0], [], [], 0.05)[0] and not os.read(0, 1):
            stop["reason"] = "parent_gone"
        else:
            time.sleep(0.02)
    checkpoint()  # the contract: a stop writes a checkpoint first
    return result("stopped", stop["reason"], 75)


if __name__ == "__main__":
    sys.exit(main())
