"""Structured logging: one JSON object per line on stdout (journald) and in a log file.

stdlib + structlog only, and importing this module configures nothing: the worker calls
:func:`configure` for its own JSON stdout, the supervisor for stdout + ``root/logs/trainerd.jsonl``.
Every line has ``timestamp`` (UTC ISO 8601), ``level`` and ``event``; ``batch``/``attempt``
are bound where they apply. Event names are snake_case verb phrases (``worker_started``).

The file rotates itself by size (``log.rotate_bytes``, ``log.keep_files``): at the limit the file
becomes ``trainerd.jsonl.1``, the one before it ``.2.gz`` (gzip-compressed by a thread, so the
loop does not wait for it; zlib releases the GIL), up to ``.<keep_files>.gz``; the oldest goes.
``trainerd logs`` reads across all of them. It is also a ``WatchedFileHandler``: after an external
logrotate moves the file away, the next line reopens the path, so rotation needs no signal and no
``copytruncate`` (which loses lines); with ``log.rotate_bytes: 0`` that is the only rotation.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import logging
import logging.handlers
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

import structlog

__all__ = ["configure", "get_logger", "rotated_name", "LOGGER_NAME"]

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


def rotated_name(base: str | os.PathLike[str], k: int) -> str:
    """The k-th rotated file of ``base``: ``.1`` plain (a follower may still finish it), then ``.k.gz``."""
    return f"{os.fspath(base)}.{k}" if k == 1 else f"{os.fspath(base)}.{k}.gz"


def _compress(src: str) -> None:
    """``src`` -> ``src.gz`` (via a temporary, then a rename), then ``src`` goes."""
    tmp = src + ".gz.tmp"
    with open(src, "rb") as fin, gzip.open(tmp, "wb", compresslevel=6) as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    os.replace(tmp, src + ".gz")
    os.unlink(src)


class _RotatingFileHandler(logging.handlers.WatchedFileHandler):
    """The log file: reopened after an external move (WatchedFileHandler), and rotated by size with a
    bounded count. Called under the handler's lock, like every emit."""

    def __init__(self, filename: str | os.PathLike[str], *, max_bytes: int, keep: int):
        super().__init__(filename, encoding="utf-8", delay=True)
        self.max_bytes, self.keep = max_bytes, keep
        self._compressing: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.reopenIfNeeded()
            # The size on disk (every line is flushed): counts what other writers appended too.
            if self.max_bytes and self.stream is not None and os.fstat(self.stream.fileno()).st_size >= self.max_bytes:
                self.rotate()
        except Exception:  # noqa: BLE001 - logging must never break the caller
            self.handleError(record)
        logging.FileHandler.emit(self, record)

    def rotate(self) -> None:
        base = self.baseFilename
        if self._compressing is not None:
            self._compressing.join()  # the last rotation's .2 must be .2.gz before it moves on
        if os.path.exists(f"{base}.2"):
            _compress(f"{base}.2")  # left plain by a process that died while compressing it
        for k in range(self.keep, 1, -1):  # the oldest goes; .k-1.gz -> .k.gz
            src = rotated_name(base, k - 1) if k > 2 else None
            if k == self.keep:
                _unlink(rotated_name(base, k))
            if src is not None and os.path.exists(src):
                os.replace(src, rotated_name(base, k))
        if self.stream is not None:
            self.stream.close()
            self.stream = None  # type: ignore[assignment]
        _drop_beyond(base, self.keep)  # left by a larger log.keep_files before a reload
        if self.keep >= 2 and os.path.exists(f"{base}.1"):
            os.replace(f"{base}.1", f"{base}.2")
        os.replace(base, f"{base}.1")
        self.stream = self._open()
        self._statstream()  # WatchedFileHandler's idea of "our file" is the new one
        if self.keep >= 2 and os.path.exists(f"{base}.2"):
            self._compressing = threading.Thread(target=_compress, args=(f"{base}.2",), name="log-compress",
                                                 daemon=True)
            self._compressing.start()

    def close(self) -> None:
        if self._compressing is not None:
            self._compressing.join()
        super().close()


def _drop_beyond(base: str, keep: int) -> None:
    folder, name = os.path.split(base)
    for e in os.scandir(folder or "."):
        num, _, ext = e.name[len(name) + 1:].partition(".") if e.name.startswith(name + ".") else ("", "", "")
        if num.isdigit() and int(num) > keep and ext in ("", "gz"):
            _unlink(e.path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _json_renderer() -> Any:
    return structlog.processors.JSONRenderer(default=str, ensure_ascii=False)


def configure(*, level: str = "info", fmt: str = "auto", file: str | os.PathLike[str] | None = None,
              stream: TextIO | None = None, rotate_bytes: int = 0, keep_files: int = 8) -> None:
    """Send trainerd's log lines to ``stream`` (default stdout) and, if given, ``file``.

    ``fmt``: ``json``, ``console`` (human-readable), or ``auto`` = console when the stream is
    a terminal. The file always gets JSON; it rotates at ``rotate_bytes`` (0: never; the daemon
    passes ``log.rotate_bytes``, a command only appends). Safe to call again (handlers are replaced).
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
        # The file is opened (created) at the first line, so a command that ends up logging
        # nothing (a refused `trainerd cancel`) leaves the root as it found it.
        fh = _RotatingFileHandler(file, max_bytes=rotate_bytes, keep=keep_files)
        fh.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _order, _json_renderer()],
            foreign_pre_chain=pre_chain))
        logger.addHandler(fh)


def get_logger(**bind: Any) -> Any:
    """A structlog logger writing through trainerd's handlers, with ``bind`` fields on every line."""
    return structlog.get_logger(LOGGER_NAME).bind(**bind)
