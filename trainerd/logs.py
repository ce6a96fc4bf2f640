"""Structured logging: one JSON object per line on stdout (journald) and in a log file.

stdlib + structlog only, and importing this module configures nothing: the worker calls
:func:`configure` for its own JSON stdout, the supervisor for stdout + ``root/logs/trainerd.jsonl``.
Every line has ``timestamp`` (UTC ISO 8601), ``level`` and ``event``; ``batch``/``attempt``
are bound where they apply. Event names are snake_case verb phrases (``worker_started``).

The file handler is a ``WatchedFileHandler``: after logrotate moves the file away, the next
line reopens the path, so rotation needs no signal and no ``copytruncate`` (which loses lines).
"""

from __future__ import annotations

import datetime as _dt
import logging
import logging.handlers
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import structlog

__all__ = ["configure", "get_logger", "LOGGER_NAME"]

LOGGER_NAME = "trainerd"
_FIRST_KEYS = ("timestamp", "level", "event", "batch", "attempt")


def _timestamp(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    # Keep a timestamp that is already there: relayed worker lines carry the time they were
    # written, not the time the supervisor got round to reading them.
    if "timestamp" not in event_dict:
        event_dict["timestamp"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
    return event_dict


def _order(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    out = {k: event_dict.pop(k) for k in _FIRST_KEYS if k in event_dict}
    out.update(event_dict)
    return out


class _PipeSafeStreamHandler(logging.StreamHandler):
    """A StreamHandler that goes quiet once its reader is gone.

    The worker's stdout is a pipe to the supervisor; if the supervisor dies, every write fails
    with EPIPE. stdlib logging would print a traceback to stderr for each line; instead send
    the stream (and, for stdout, fd 1 itself, so the exit-time flush is quiet too) to
    /dev/null once. The worker learns of the loss through its stdin lifeline, not through this.
    """

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                if self.stream is sys.stdout:
                    os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            finally:
                os.close(devnull)
            self.stream = open(os.devnull, "w")
            return
        super().handleError(record)


def _json_renderer() -> Any:
    return structlog.processors.JSONRenderer(default=str, ensure_ascii=False)


def configure(*, level: str = "info", fmt: str = "auto", file: str | os.PathLike[str] | None = None,
              stream: TextIO | None = None) -> None:
    """Send trainerd's log lines to ``stream`` (default stdout) and, if given, ``file``.

    ``fmt``: ``json``, ``console`` (human-readable), or ``auto`` = console when the stream is
    a terminal. The file always gets JSON. Safe to call again (handlers are replaced).
    """
    stream = stream if stream is not None else sys.stdout
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    pre_chain = [structlog.stdlib.add_log_level, _timestamp]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            _timestamp,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.setLevel(getattr(logging, level.upper()))
    logger.propagate = False

    console = structlog.dev.ConsoleRenderer(colors=False) if fmt == "console" else _json_renderer()
    out = _PipeSafeStreamHandler(stream)
    out.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _order, console],
        foreign_pre_chain=pre_chain))
    logger.addHandler(out)
    if file is not None:
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        # delay: the file is opened (created) at the first line, so a command that ends up
        # logging nothing (a refused `trainerd cancel`) leaves the root as it found it.
        fh = logging.handlers.WatchedFileHandler(file, encoding="utf-8", delay=True)
        fh.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _order, _json_renderer()],
            foreign_pre_chain=pre_chain))
        logger.addHandler(fh)


def get_logger(**bind: Any) -> Any:
    """A structlog logger writing through trainerd's handlers, with ``bind`` fields on every line."""
    return structlog.get_logger(LOGGER_NAME).bind(**bind)
