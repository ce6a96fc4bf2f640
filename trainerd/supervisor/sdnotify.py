"""systemd's notify protocol (``sd_notify(3)``) in the standard library only.

The supervisor is the unit's main process (``Type=notify``, ``NotifyAccess=main``). It tells
systemd when it is ready (after reconciling the ledger and the first inbox scan), what it is
doing (``STATUS=``), that it is stopping, and that its main loop is alive (``WATCHDOG=1``).
The watchdog ping must come from the main loop, never from a training step: a step runs in the
worker process and may take minutes, while a hung supervisor is exactly what the watchdog is
for.

Outside systemd (``NOTIFY_SOCKET`` unset) every method is a cheap no-op, so callers never need
an ``if``. A send that fails is logged once and otherwise ignored: losing a STATUS line must
never take the daemon down (systemd itself treats a missing READY as a start timeout, and a
missing WATCHDOG as a hang, which is the right outcome for a real fault).

    notifier = Notifier.from_env(unset_environment=True)   # children do not inherit the socket
    ...reconcile, first scan...
    notifier.ready(status="idle, 0 queued")
    interval = notifier.watchdog_interval_s()               # None = watchdog off
    ... in the loop, every interval / 2 at most: notifier.watchdog()
    notifier.stopping()
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

__all__ = ["Notifier", "WATCHDOG_ENV"]

# Named for where it lived first: operators' log filters (and tests) name this logger.
log = logging.getLogger("trainerd.sdnotify")

# The variables systemd sets for the main process (and that children must not inherit: with
# NotifyAccess=main their messages would be dropped anyway, and a child seeing WATCHDOG_USEC
# could believe it is the one that must ping).
WATCHDOG_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends ``KEY=value`` datagrams to systemd's notification socket (or does nothing)."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None,
                 watchdog_pid: int | None = None):
        # ``address`` is NOTIFY_SOCKET as systemd writes it: a path, or "@name" for an abstract
        # socket (Linux: a leading NUL byte in the address).
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, *,
                 unset_environment: bool = False) -> "Notifier":
        """A notifier for NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID (a no-op when unset).

        ``unset_environment=True`` removes those variables from ``os.environ`` afterwards (as
        ``sd_notify(unset_environment=1)`` does), so that workers started later never see them.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec = _parse_int(env.get("WATCHDOG_USEC"))
        pid = _parse_int(env.get("WATCHDOG_PID"))
        if unset_environment and environ is None:
            for k in WATCHDOG_ENV:
                os.environ.pop(k, None)
        return cls(address, watchdog_usec=usec, watchdog_pid=pid)

    @property
    def enabled(self) -> bool:
        """True when there is a socket to talk to (running under systemd Type=notify)."""
        return self.address is not None

    # --- the messages -----------------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up is finished (systemd moves the unit from activating to active)."""
        fields: dict[str, Any] = {"READY": 1}
        if status is not None:
            fields["STATUS"] = status
        return self.notify(**fields)

    def status(self, text: str) -> bool:
        """STATUS=text: one line shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown has begun (the unit shows deactivating, not failed)."""
        fields: dict[str, Any] = {"STOPPING": 1}
        if status is not None:
            fields["STATUS"] = status
        return self.notify(**fields)

    def reloading(self) -> bool:
        """RELOADING=1 (SIGHUP handling); send ready() again when the reload is done."""
        return self.notify(RELOADING=1)

    def watchdog(self) -> bool:
        """WATCHDOG=1: the main loop is alive. Call at least every watchdog_interval_s() / 2."""
        return self.notify(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for more time for the current start/stop phase."""
        return self.notify(EXTEND_TIMEOUT_USEC=max(0, int(seconds * 1_000_000)))

    def watchdog_interval_s(self) -> float | None:
        """The unit's WatchdogSec in seconds, or None when the watchdog is off or not ours.

        systemd sets WATCHDOG_PID to the main PID; if it names another process (the variable was
        inherited), the watchdog is not this process's business.
        """
        if not self._watchdog_usec or self._watchdog_usec <= 0:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 1_000_000

    def notify(self, **fields: Any) -> bool:
        """Send ``KEY=value`` lines (keys upper-cased). Returns True when a datagram was sent."""
        if self.address is None or not fields:
            return False
        lines = []
        for key, value in fields.items():
            text = str(int(value) if isinstance(value, bool) else value)
            # One field per line: a newline inside STATUS would start a bogus field.
            lines.append(f"{key.upper()}={text.replace(chr(10), ' ')}")
        payload = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        with self._lock:
            try:
                sock = self._connect()
                sock.sendall(payload)
                return True
            except OSError as e:
                # ECONNREFUSED/ENOENT (systemd restarted, socket gone), EAGAIN (queue full):
                # drop the socket so the next call reconnects, say so once, carry on.
                self._close_locked()
                if not self._warned:
                    self._warned = True
                    log.warning("sd_notify_failed address=%s error=%s (further failures are silent)",
                                self.address, e)
                return False

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    # --- internals ----------------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        addr = self.address or ""
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        elif not addr.startswith("/"):
            # systemd >= 253 may hand out "vsock:CID:PORT"; a VM guest thing, not ours.
            raise OSError(f"unsupported NOTIFY_SOCKET address {self.address!r}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(addr)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        return sock

    def _close_locked(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def __repr__(self) -> str:
        return f"Notifier(address={self.address!r}, watchdog_s={self.watchdog_interval_s()})"


def _parse_int(value: str | None) -> int | None:
    if value is None or not value.strip():
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None
