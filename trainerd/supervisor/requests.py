"""Requests to the running daemon: ``root/requests/``, a group-writable folder like the inbox.

A client (``trainerd promote``/``rollback``/``rebase``/``cancel``/``gc``) writes ``<id>.json`` atomically (a dot-file, then a
rename); the daemon carries it out in its loop and answers in ``<id>.answer.json``
(``{"state": "done" | "refused" | "waiting", "message": ..., ...}``), removing the request once
it is done or refused. A waiting request stays until it can be done (see chain.py). Answers are
read and removed by their client; the daemon clears ones nobody read after a day.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from trainerd.core.contract import RootLayout
from trainerd.core.fsutil import atomic_write_json, read_json_or_none, unlink_quietly

__all__ = ["Requests", "submit", "wait_answer"]

ANSWER_TTL_S = 86400.0


def _answer_path(req: Path) -> Path:
    return req.with_name(req.name.removesuffix(".json") + ".answer.json")


def submit(layout: RootLayout, op: str, arg: int) -> Path:
    """Write a request for the daemon; returns its path (the answer lies beside it)."""
    layout.requests.mkdir(mode=0o770, exist_ok=True)
    rid = f"{time.time_ns()}-{os.getpid()}"
    path = layout.requests / f"{rid}.json"
    tmp = layout.requests / f".{rid}.json.tmp"
    with open(tmp, "w") as f:
        json.dump({"op": op, "arg": arg, "at": time.time(), "uid": os.getuid()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o660)  # the daemon's user removes it, whoever wrote it (same group)
    os.rename(tmp, path)
    return path


def wait_answer(req: Path, timeout_s: float, *, poll_s: float = 0.1) -> dict[str, Any] | None:
    """The final answer (done/refused), or the last interim one (waiting) when ``timeout_s`` passes;
    None if the daemon never answered."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        ans = read_json_or_none(_answer_path(req))
        if ans is not None:
            last = ans
            if ans.get("state") in ("done", "refused"):
                unlink_quietly(_answer_path(req))
                return ans
        if time.monotonic() >= deadline:
            return last
        time.sleep(poll_s)


class Requests:
    """The daemon's side: find requests, carry them out through the chain, answer."""

    def __init__(self, layout: RootLayout, log: Any):
        self.layout, self.log = layout, log
        self._told: dict[str, str] = {}  # request -> the waiting message already answered
        self._cleared_at = 0.0
        self.more = False  # the last serve() left requests for the next turn

    def pending(self) -> list[Path]:
        try:
            names = sorted(e.name for e in os.scandir(self.layout.requests)
                           if e.name.endswith(".json") and not e.name.endswith(".answer.json")
                           and not e.name.startswith("."))
        except FileNotFoundError:
            return []
        return [self.layout.requests / n for n in names]

    def serve(self, chain: Any, running: Any, now: float, base: Any = None, deadline: float | None = None) -> None:
        """Carry out pending requests, oldest first; past ``deadline`` (monotonic) the rest wait
        for the next turn (at least one is served per call)."""
        from trainerd.supervisor.chain import Refused, Waiting

        for i, req in enumerate(self.pending()):
            if i and deadline is not None and time.monotonic() >= deadline:
                self.more = True
                return
            body = read_json_or_none(req)
            if body is None:
                continue  # unreadable right now; the next pass looks again
            op, arg = body.get("op"), body.get("arg")
            try:
                if not isinstance(arg, int) or isinstance(arg, bool):
                    raise Refused(f"{op}: needs a number, got {arg!r}")
                out = chain.apply(str(op), arg, now, running=running, base=base)
            except Waiting as w:
                if self._told.get(req.name) != str(w):
                    self._told[req.name] = str(w)
                    self._answer(req, "waiting", str(w))
                    self.log.info("request_waiting", request=req.name, op=op, arg=arg, reason=str(w))
                continue
            except Refused as r:
                self._answer(req, "refused", str(r))
                self.log.warning("request_refused", request=req.name, op=op, arg=arg, reason=str(r))
            else:
                self._answer(req, "done", out["message"], **{k: v for k, v in out.items() if k != "message"})
                self.log.info("request_done", request=req.name, op=op, arg=arg, message=out["message"])
            self._told.pop(req.name, None)
            unlink_quietly(req)
        self.more = False
        self._clear_old_answers(now)

    def _answer(self, req: Path, state: str, message: str, **extra: Any) -> None:
        atomic_write_json(_answer_path(req), {"state": state, "message": message, **extra}, durable=False)
        os.chmod(_answer_path(req), 0o660)

    def _clear_old_answers(self, now: float) -> None:
        if now - self._cleared_at < 60:
            return
        self._cleared_at = now
        try:
            for e in os.scandir(self.layout.requests):
                if e.name.endswith(".answer.json") and now - e.stat().st_mtime > ANSWER_TTL_S:
                    unlink_quietly(e.path)
        except OSError:
            pass
