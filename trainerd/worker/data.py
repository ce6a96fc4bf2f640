"""Streamed data path: JSONL lines -> examples -> chunked tokenization -> fixed-size blocks.

Nothing here holds the file whole and nothing writes a dataset cache: lines are read with a
bound, ``data.chunk_lines`` examples are tokenized per call (one batched call to the fast
tokenizer), and tokens are packed into ``seq_len`` blocks so every training step needs the
same memory.

Every example is rendered to (text, label character spans) and tokenized with offsets, so the
three formats share one path: a token is trained on when it starts inside a label span.

The cursor is exact and O(1) to resume: the byte offset and line number of the first example
not yet fully packed, and how many of its tokens were already packed. Tokenizing an example is
independent of its neighbours, so seeking there and re-tokenizing that one example reproduces
the very next block.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from trainerd.fsutil import open_regular
from trainerd.replay import content_fraction, line_bytes
from trainerd.lines import Example, LineError, RawLine, ScanReport, content_hash, iter_lines, judge, parse_line

IGNORE_INDEX = -100


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


@dataclass
class Encoded:
    line: int
    offset: int
    end: int
    ids: list[int]
    labels: list[bool]
    before: Pos | None = None  # the source's position just before this example / just after it
    after: Pos | None = None
    tag: Any = None            # whatever the caller passed along (the evaluation: a content hash)


class Encoder:
    """Render examples to text + label spans and tokenize them in one batched call."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos token")
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def render(self, ex: Example) -> tuple[str, list[tuple[int, int]], bool]:
        """(text, label spans, append_eos)."""
        if ex.kind == "text":
            return ex.text, [(0, len(ex.text))], True
        if ex.kind == "completion":
            text = ex.prompt + ex.completion
            return text, [(len(ex.prompt), len(text))], True
        if not self.has_chat_template:
            raise _RenderError("the tokenizer has no chat template, so 'messages' lines cannot be used")
        msgs = [{"role": r, "content": c} for r, c in ex.messages]
        try:
            full = self.tok.apply_chat_template(msgs, tokenize=False)
            spans = []
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                before = self.tok.apply_chat_template(msgs[:i], tokenize=False,
                                                      add_generation_prompt=True) if i else ""
                upto = self.tok.apply_chat_template(msgs[: i + 1], tokenize=False)
                if not (full.startswith(upto) and upto.startswith(before)):
                    raise _RenderError("the chat template is not prefix-stable; cannot locate assistant turns")
                spans.append((len(before), len(upto)))
        except _RenderError:
            raise
        except Exception as e:  # jinja raises TemplateError / others for odd role orders
            raise _RenderError(f"chat template failed: {type(e).__name__}: {e}") from e
        return full, spans, False

    def encode(self, items: list[tuple]) -> tuple[list[Encoded], list[LineError]]:
        """Tokenize ``(raw, example[, before, after[, tag]])`` items in one call."""
        rendered, good, errors = [], [], []
        for item in items:
            raw, ex = item[0], item[1]
            try:
                rendered.append(self.render(ex))
                good.append(item)
            except _RenderError as e:
                errors.append(LineError(raw.number, raw.offset, str(e)))
        if not good:
            return [], errors
        enc = self.tok([r[0] for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for item, (text, spans, add_eos), ids, offs in zip(good, rendered, enc["input_ids"], enc["offset_mapping"]):
            raw = item[0]
            labels = [any(s <= a < e for s, e in spans) for a, _b in offs]
            ids = list(ids)
            if add_eos:
                ids.append(self.eos_id)
                labels.append(True)
            if not any(labels):
                errors.append(LineError(raw.number, raw.offset, "no trainable tokens after tokenization"))
                continue
            out.append(Encoded(raw.number, raw.offset, raw.end, ids, labels, *item[2:]))
        return out, errors


class _RenderError(Exception):
    pass


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

    def encoded(self, encoder: "Encoder", *, chunk_lines: int, start: Pos = Pos(),
                on_error: Callable[[LineError], None] | None = None,
                on_line: Callable[..., None] | None = None,
                tag: Callable[..., Any] | None = None) -> Iterator[Encoded]:
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


def iter_encoded(path: Path, encoder: Encoder, *, max_line_bytes: int, chunk_lines: int,
                 start_offset: int = 0, start_line: int = 0,
                 on_error: Callable[[LineError], None] | None = None,
                 on_line: Callable[..., None] | None = None) -> Iterator[Encoded]:
    """Stream every good line of one file, encoded, ``chunk_lines`` per tokenizer call."""
    yield from TrainSource(path, max_line_bytes=max_line_bytes).encoded(
        encoder, chunk_lines=chunk_lines, start=Pos(offset=start_offset, line=start_line),
        on_error=on_error, on_line=on_line)


def _flush(encoder: Encoder, pending, on_error) -> Iterator[Encoded]:
    encoded, errors = encoder.encode(pending)
    if on_error is not None:
        for e in errors:
            on_error(e)
    yield from encoded


def scan(source: TrainSource, encoder: Encoder, *, seq_len: int, chunk_lines: int,
         max_bad_fraction: float, errors_path: Path, max_errors: int,
         should_stop: Callable[[], bool] | None = None, contrib: Path | None = None,
         contrib_threshold: float = 1.0) -> ScanReport:
    """Tokenize the whole training stream once (streamed), counting its tokens for the schedule,
    and judge data.jsonl's lines again (tokenizing can find lines the first split could not: a
    chat template that fails, no trainable token). Every bad line goes to ``errors_path`` as a
    JSON line. ``contrib``: also write the batch's own training lines that encode (those under
    the replay store's ``contrib_threshold``) there, for the store once the batch is published.
    Raises DataError when the file must be rejected."""
    st = os.stat(source.path)
    result = ScanReport(path=str(source.path), size=st.st_size, mtime_ns=st.st_mtime_ns, seq_len=seq_len)
    tmp = errors_path.with_name(f".{errors_path.name}.tmp")
    sink = Contrib(contrib, contrib_threshold) if contrib is not None else None
    try:
        return _scan(source, encoder, result, tmp, errors_path, sink, chunk_lines=chunk_lines,
                     max_bad_fraction=max_bad_fraction, max_errors=max_errors, should_stop=should_stop)
    except BaseException:
        if sink is not None:
            sink.discard()
        raise


def _scan(source: TrainSource, encoder: Encoder, result: ScanReport, tmp: Path, errors_path: Path,
          sink: "Contrib | None", *, chunk_lines: int, max_bad_fraction: float, max_errors: int,
          should_stop: Callable[[], bool] | None) -> ScanReport:
    with open(tmp, "w", encoding="utf-8") as errf:
        def on_error(e: LineError) -> None:
            result.bad += 1
            errf.write(json.dumps(e.as_dict()) + "\n")
            if len(result.errors) < max_errors:
                result.errors.append(e.as_dict())

        def on_line(raw: RawLine, ex: Example | None, err: str | None) -> None:
            result.lines += 1
            if ex is None and err is None:
                result.blank += 1
            if should_stop is not None and result.lines % 4096 == 0 and should_stop():
                raise _Interrupted()

        def tag(raw: RawLine, ex: Example, before: Pos, after: Pos) -> Any:
            return (raw, ex) if after.own != before.own else None  # own lines only, not replayed ones

        for enc in source.encoded(encoder, chunk_lines=chunk_lines, on_error=on_error, on_line=on_line, tag=tag):
            result.tokens += len(enc.ids)
            result.label_tokens += sum(enc.labels)
            if enc.tag is None:
                result.replay_tokens += len(enc.ids)
            elif sink is not None:
                sink.add(*enc.tag)
    os.replace(tmp, errors_path)
    # Held-out and excluded lines are good lines (not trained here, but nothing wrong with them).
    result.good = result.lines - result.bad - result.blank
    judge(result, max_bad_fraction)
    if result.rejected:
        raise DataError(result.reason, result.errors)
    if sink is not None:
        result.contrib = sink.close()
    return result


class Contrib:
    """The batch's own training lines as the replay store keeps them (written as they pass)."""

    def __init__(self, path: Path, threshold: float):
        self.path, self.threshold = path, threshold
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.f = open(self.tmp, "wb")
        self.h = hashlib.sha256()
        self.lines = self.bytes = 0

    def add(self, raw: RawLine, ex: Example) -> None:
        if content_fraction(content_hash(ex)) >= self.threshold:
            return
        data = line_bytes(raw)
        self.f.write(data)
        self.h.update(data)
        self.lines += 1
        self.bytes += len(data)

    def close(self) -> dict[str, Any]:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return {"lines": self.lines, "bytes": self.bytes, "sha256": self.h.hexdigest()}

    def discard(self) -> None:
        if not self.f.closed:
            self.f.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


class _Interrupted(Exception):
    """A stop was requested during the first pass."""


Interrupted = _Interrupted


class BlockStream:
    """Fixed-size token blocks from a cursor on; epochs follow each other seamlessly.

    Each yielded item is ``(input_ids, labels, attention_mask, cursor_after)`` with plain lists
    of length ``seq_len``. The last block of an epoch is padded (labels ignored, attention 0),
    so no token is lost and every block has the same shape. ``source`` is the training stream
    (a path means every good line of that one file).
    """

    def __init__(self, source: TrainSource | Path, encoder: Encoder, *, seq_len: int, max_line_bytes: int,
                 chunk_lines: int, pad_id: int, blocks_per_epoch: int, epochs: int,
                 cursor: Cursor | None = None):
        if not isinstance(source, TrainSource):
            source = TrainSource(Path(source), max_line_bytes=max_line_bytes)
        self.source, self.encoder = source, encoder
        self.seq_len, self.chunk_lines = seq_len, chunk_lines
        self.pad_id, self.blocks_per_epoch, self.epochs = pad_id, blocks_per_epoch, epochs
        self.cursor = cursor or Cursor()

    def __iter__(self) -> Iterator[tuple[list[int], list[int], list[int], Cursor]]:
        cur = Cursor(**self.cursor.as_dict())
        while cur.epoch < self.epochs:
            yield from self._epoch(cur)
            if cur.blocks != self.blocks_per_epoch:
                raise DataError(
                    f"data file changed while training: epoch {cur.epoch + 1} yielded {cur.blocks} blocks, "
                    f"the first pass counted {self.blocks_per_epoch}")
            cur = Cursor(epoch=cur.epoch + 1)

    def _epoch(self, cur: Cursor) -> Iterator[tuple[list[int], list[int], list[int], Cursor]]:
        n = self.seq_len
        queue: deque[list] = deque()  # [Encoded, tokens of it already packed]
        buffered = 0
        first = True
        last_after = cur.pos
        for enc in self.source.encoded(self.encoder, chunk_lines=self.chunk_lines, start=cur.pos):
            pos = 0
            if first:
                first = False
                if cur.token_skip:
                    # The example the checkpoint was in the middle of comes first again.
                    pos = cur.token_skip
                    if enc.before != cur.pos or pos > len(enc.ids):
                        raise DataError(f"data file changed: line {enc.line} is not what the checkpoint says")
            queue.append([enc, pos])
            buffered += len(enc.ids) - pos
            last_after = enc.after
            while buffered >= n:
                yield self._take(queue, n, cur, last_after)
                buffered -= n
        if buffered > 0:
            yield self._take(queue, buffered, cur, last_after)

    def _take(self, queue: deque, count: int, cur: Cursor, last_after: Pos):
        ids: list[int] = []
        labels: list[int] = []
        while len(ids) < count:
            enc, pos = queue[0]
            take = min(count - len(ids), len(enc.ids) - pos)
            seg = enc.ids[pos: pos + take]
            ids.extend(seg)
            labels.extend(t if keep else IGNORE_INDEX for t, keep in zip(seg, enc.labels[pos: pos + take]))
            queue[0][1] = pos + take
            if queue[0][1] == len(enc.ids):
                queue.popleft()
        real = len(ids)
        pad = self.seq_len - real
        if pad:
            ids.extend([self.pad_id] * pad)
            labels.extend([IGNORE_INDEX] * pad)
        mask = [1] * real + [0] * pad
        cur.blocks += 1
        if queue:
            enc, pos = queue[0]
            cur.at(enc.before, pos)
        else:
            cur.at(last_after, 0)
        return ids, labels, mask, Cursor(**cur.as_dict())
