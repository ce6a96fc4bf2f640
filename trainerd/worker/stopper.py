"""The worker's reasons to stop, collected without acting on them.

Signal handlers only set a flag (logging or raising in a handler is unsafe); the training
loop asks :meth:`Stopper.check` between micro-batches and :meth:`Stopper.agree` between
optimizer steps (an all-reduce when torch.distributed is initialised, so every rank stops at
the same step, with the strongest reason any rank had: dist.py).

    batch/.stop          the memory guard (content: memory | recycle), or an operator
    root/.stop           the operator's pause
    SIGTERM / SIGINT     shutdown (a second one kills at once: a cold stop; under torchrun a
                         second one within DEBOUNCE_S of the first is the same stop, sent
                         again by the launcher's own shutdown, and is ignored)
    EOF on stdin         the supervisor died (parent_gone)
"""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from pathlib import Path
from typing import Any

from trainerd.core.contract import StopReason
from trainerd.worker import dist, heartbeat

__all__ = ["DEBOUNCE_S", "Deferred", "Stopper", "StopRequested"]

# Under torchrun a rank can get the same stop twice (the launcher forwards the supervisor's
# SIGTERM, and signals its workers again when a peer exits first): within this many seconds a
# second signal is not the operator's "now".
DEBOUNCE_S = 2.0


class StopRequested(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --- stopping ----------------------------------------------------------------------------


class Stopper:
    """Collects the reasons to stop. Signal handlers only set a flag (logging or raising in a
    handler is unsafe); the loop asks ``check()`` between micro-batches."""

    def __init__(self, batch_stop: Path, global_stop: Path, *, debounce_s: float = 0.0):
        self.batch_stop, self.global_stop = batch_stop, global_stop
        self.debounce_s = debounce_s
        self.device: Any = None  # the rank's device, for agree()'s collective (NCCL needs the GPU)
        self._signal_reason: StopReason | None = None
        self._lifeline_lost = threading.Event()
        self._signals = 0
        self._first_signal_at = 0.0

    def install(self) -> None:
        from trainerd.worker import EARLY_SIGNALS

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        if EARLY_SIGNALS:  # read after installing: none can fall between the two handlers
            self._signals = len(EARLY_SIGNALS)
            self._signal_reason = StopReason.SHUTDOWN
        if _stdin_is_pipe():
            threading.Thread(target=self._watch_lifeline, name="lifeline", daemon=True).start()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        now = time.monotonic()
        if self._signals and now - self._first_signal_at < self.debounce_s:
            return  # the same stop again (torchrun): not a cold stop
        self._signals += 1
        if self._signals == 1:
            self._first_signal_at = now
        if self._signals > 1:
            # Second signal: stop at once (cold stop). The last complete checkpoint stands.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self._signal_reason = StopReason.SHUTDOWN

    def _watch_lifeline(self) -> None:
        # The supervisor holds the write end of our stdin and never writes: EOF means it died.
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        self._lifeline_lost.set()

    def check(self) -> StopReason | None:
        # Asked from every loop of the work (micro-batches, reading, evaluating): a sign of life.
        heartbeat.beat()
        if self._signal_reason:
            return self._signal_reason
        if self._lifeline_lost.is_set():
            return StopReason.PARENT_GONE
        try:
            return StopReason.from_stop_file(self.batch_stop.read_text(encoding="utf-8", errors="replace"))
        except FileNotFoundError:
            pass
        except OSError:
            return StopReason.MEMORY
        if self.global_stop.exists():
            return StopReason.PAUSED
        return None

    def agree(self, *flags: bool) -> tuple[StopReason | None, list[bool]]:
        """The stop decision every rank must share, and ``flags`` any rank raised (one all-reduce
        between optimizer steps; no collective on one process)."""
        return dist.agree(self.check(), *flags, device=self.device)

    def deferred(self) -> "Deferred":
        """This stopper as work that must not stop halfway sees it: signs of life, no stops."""
        return Deferred()


class Deferred:
    """A stopper for work every rank must finish together (an evaluation during training, which
    each rank runs on its own): it never says stop; the stop is agreed at the next step's end."""

    def check(self) -> None:
        heartbeat.beat()
        return None


def _stdin_is_pipe() -> bool:
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
