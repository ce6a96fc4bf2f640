"""The training stream's lines, in training order, and the exact place in it.

``TrainSource`` yields data.jsonl's good lines minus the contents a batch must not train on
(held out, evaluation contents), with replay.jsonl's lines interleaved evenly; every line comes
with the source's position before and after it. ``Cursor`` is that position plus how far the
packing got: resuming seeks to it (O(1)), whatever the position.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from trainerd.core.fsutil import open_regular
from trainerd.core.lines import Example, LineError, RawLine, content_hash, iter_lines, parse_line

__all__ = ["Cursor", "DataError", "Pos", "TrainSource"]


class DataError(Exception):
    """The data is unusable (exit 65)."""

    def __init__(self, reason: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.errors = errors or []


@dataclass(frozen=True)
class Pos:
    """Where the training source stands: the next own line of data.jsonl to read, the next
    replayed line, and how many of each were already taken (the interleaving depends on both)."""

    offset: int = 0     # data.jsonl: byte offset of the next line to read
    line: int = 0       # lines before ``offset``
    own: int = 0        # the batch's own training lines taken so far
    r_offset: int = 0   # replay.jsonl: byte offset of the next line to read
    r_line: int = 0
    r_count: int = 0    # replayed lines taken so far


@dataclass
class Cursor:
    """The exact place in the training stream: the source's position just before the first
    example not fully packed, how many of its tokens were already packed, and the blocks of this
    epoch so far. Resuming seeks there (O(1) whatever the position)."""

    epoch: int = 0
    offset: int = 0
    line: int = 0
    own: int = 0
    r_offset: int = 0
    r_line: int = 0
    r_count: int = 0
    token_skip: int = 0  # tokens of that example already packed
    blocks: int = 0  # blocks emitted in this epoch

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def pos(self) -> Pos:
        return Pos(self.offset, self.line, self.own, self.r_offset, self.r_line, self.r_count)

    def at(self, pos: Pos, token_skip: int) -> None:
        self.offset, self.line, self.own = pos.offset, pos.line, pos.own
        self.r_offset, self.r_line, self.r_count = pos.r_offset, pos.r_line, pos.r_count
        self.token_skip = token_skip


class TrainSource:
    """The batch's training lines in training order, each with the source's position before and
    after it: data.jsonl's good lines minus the ``skip`` contents (held out, or evaluation
    contents), with replay.jsonl's lines interleaved evenly (replayed line j comes after own line
    ``(j + 1) * own_total // (replay_total + 1)``). A pure function of the position, so a resume
    from any position yields exactly what an uninterrupted pass would have."""

    def __init__(self, path: Path, *, max_line_bytes: int, skip: frozenset[str] = frozenset(),
                 replay: Path | None = None, own_total: int = 0, replay_total: int = 0):
        self.path, self.replay, self.max_line_bytes = path, replay, max_line_bytes
        self.skip, self.own_total, self.replay_total = skip, own_total, replay_total

    def _replay_due(self, pos: Pos) -> bool:
        j = pos.r_count
        return j < self.replay_total and pos.own >= (j + 1) * self.own_total // (self.replay_total + 1)

    def items(self, start: Pos = Pos(), *, on_error: Callable[[LineError], None] | None = None,
              on_line: Callable[[RawLine, Example | None, str | None], None] | None = None
              ) -> Iterator[tuple[RawLine, Example, Pos, Pos]]:
        pos = start
        with contextlib.ExitStack() as stack:
            data = iter_lines(stack.enter_context(open_regular(self.path)), self.max_line_bytes,
                              start_offset=pos.offset, start_line=pos.line)
            rep = iter_lines(stack.enter_context(open_regular(self.replay)), self.max_line_bytes,
                             start_offset=pos.r_offset, start_line=pos.r_line) \
                if self.replay is not None and self.replay_total else iter(())
            data_done = False
            while True:
                if self._replay_due(pos) or (data_done and pos.r_count < self.replay_total):
                    raw = next(rep, None)
                    if raw is None:
                        raise DataError(f"{self.replay}: ended after {pos.r_count} of its {self.replay_total} lines")
                    after = replace(pos, r_offset=raw.end, r_line=raw.number, r_count=pos.r_count + 1)
                    ex, _ = parse_line(raw)
                    if ex is not None:
                        yield raw, ex, pos, after
                    pos = after
                    continue
                if data_done:
                    return
                raw = next(data, None)
                if raw is None:
                    data_done = True
                    continue
                after = replace(pos, offset=raw.end, line=raw.number)
                ex, err = parse_line(raw)
                if on_line is not None:
                    on_line(raw, ex, err)
                if err is not None and on_error is not None:
                    on_error(LineError(raw.number, raw.offset, err))
                if ex is not None and not (self.skip and content_hash(ex) in self.skip):
                    after = replace(after, own=pos.own + 1)
                    yield raw, ex, pos, after
                pos = after

    def encoded(self, encoder: Any, *, chunk_lines: int, start: Pos = Pos(),
                on_error: Callable[[LineError], None] | None = None,
                on_line: Callable[..., None] | None = None,
                tag: Callable[..., Any] | None = None) -> Iterator[Any]:
        """The items tokenized ``chunk_lines`` at a time (one batched tokenizer call each);
        ``tag(raw, example, before, after)`` is carried along as each Encoded's ``tag``."""
        pending: list[tuple] = []
        for item in self.items(start, on_error=on_error, on_line=on_line):
            pending.append((*item, tag(*item)) if tag is not None else item)
            if len(pending) >= chunk_lines:
                yield from _flush(encoder, pending, on_error)
                pending = []
        if pending:
            yield from _flush(encoder, pending, on_error)


def _flush(encoder: Any, pending: list[tuple], on_error: Callable[[LineError], None] | None) -> Iterator[Any]:
    encoded, errors = encoder.encode(pending)
    if on_error is not None:
        for e in errors:
            on_error(e)
    yield from encoded


