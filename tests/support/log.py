"""The one log capture for in-process tests: a structlog-shaped logger that keeps what it is told."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["ListLog"]

# The methods trainerd calls on a structlog logger; anything else is a mistake to surface,
# not a call to swallow.
LEVELS = ("debug", "info", "warning", "error", "exception", "critical")


class ListLog:
    """Records ``(level, event, fields)`` in ``lines``; ``bind(**kw)`` returns a logger that
    adds ``kw`` to its fields and records into the same ``lines``, as structlog's does."""

    def __init__(self, lines: list[tuple[str, str, dict[str, Any]]] | None = None,
                 bound: dict[str, Any] | None = None):
        self.lines: list[tuple[str, str, dict[str, Any]]] = [] if lines is None else lines
        self.bound: dict[str, Any] = dict(bound or {})

    def bind(self, **fields: Any) -> ListLog:
        return ListLog(self.lines, {**self.bound, **fields})

    def __getattr__(self, level: str) -> Callable[..., None]:
        if level not in LEVELS:
            raise AttributeError(level)
        return lambda event, **fields: self.lines.append((level, event, {**self.bound, **fields}))

    def events(self) -> list[str]:
        """Event names, in order."""
        return [e for _, e, _ in self.lines]

    def find(self, event: str) -> list[dict[str, Any]]:
        """The fields of every ``event`` line, in order."""
        return [kw for _, e, kw in self.lines if e == event]
