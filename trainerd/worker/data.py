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

import json
import os
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from trainerd.fsutil import open_regular
from trainerd.lines import Example, LineError, RawLine, ScanReport, iter_lines, judge, parse_line

IGNORE_INDEX = -100


class DataError(Exception):
    """The data is unusable (exit 65)."""

    def __init__(self, reason: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.errors = errors or []


@dataclass
class Cursor:
    epoch: int = 0
    offset: int = 0  # byte offset of the first example not fully packed
    line: int = 0  # lines before ``offset``
    token_skip: int = 0  # tokens of that example already packed
    blocks: int = 0  # blocks emitted in this epoch

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Encoded:
    line: int
    offset: int
    end: int
    ids: list[int]
    labels: list[bool]


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

    def encode(self, items: list[tuple[RawLine, Example]]) -> tuple[list[Encoded], list[LineError]]:
        rendered, good, errors = [], [], []
        for raw, ex in items:
            try:
                rendered.append(self.render(ex))
                good.append(raw)
            except _RenderError as e:
                errors.append(LineError(raw.number, raw.offset, str(e)))
        if not good:
            return [], errors
        enc = self.tok([r[0] for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for raw, (text, spans, add_eos), ids, offs in zip(good, rendered, enc["input_ids"], enc["offset_mapping"]):
            labels = [any(s <= a < e for s, e in spans) for a, _b in offs]
            ids = list(ids)
            if add_eos:
                ids.append(self.eos_id)
                labels.append(True)
            if not any(labels):
                errors.append(LineError(raw.number, raw.offset, "no trainable tokens after tokenization"))
                continue
            out.append(Encoded(raw.number, raw.offset, raw.end, ids, labels))
        return out, errors


class _RenderError(Exception):
    pass


def iter_encoded(path: Path, encoder: Encoder, *, max_line_bytes: int, chunk_lines: int,
                 start_offset: int = 0, start_line: int = 0,
                 on_error: Callable[[LineError], None] | None = None,
                 on_line: Callable[[RawLine], None] | None = None) -> Iterator[Encoded]:
    """Stream encoded examples, tokenizing ``chunk_lines`` valid lines per tokenizer call."""
    with open_regular(path) as f:
        pending: list[tuple[RawLine, Example]] = []
        for raw in iter_lines(f, max_line_bytes, start_offset=start_offset, start_line=start_line):
            if on_line is not None:
                on_line(raw)
            ex, err = parse_line(raw)
            if err is not None:
                if on_error is not None:
                    on_error(LineError(raw.number, raw.offset, err))
                continue
            if ex is None:
                continue
            pending.append((raw, ex))
            if len(pending) >= chunk_lines:
                yield from _flush(encoder, pending, on_error)
                pending = []
        if pending:
            yield from _flush(encoder, pending, on_error)


def _flush(encoder: Encoder, pending, on_error) -> Iterator[Encoded]:
    encoded, errors = encoder.encode(pending)
    if on_error is not None:
        for e in errors:
            on_error(e)
    yield from encoded


def scan(path: Path, encoder: Encoder, *, seq_len: int, max_line_bytes: int, chunk_lines: int,
         max_bad_fraction: float, errors_path: Path, max_errors: int,
         should_stop: Callable[[], bool] | None = None) -> ScanReport:
    """Validate and tokenize the whole file once (streamed), writing every bad line to
    ``errors_path`` as JSON lines. Raises DataError when the file must be rejected."""
    st = os.stat(path)
    result = ScanReport(path=str(path), size=st.st_size, mtime_ns=st.st_mtime_ns, seq_len=seq_len)
    tmp = errors_path.with_name(f".{errors_path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as errf:
        def on_error(e: LineError) -> None:
            result.bad += 1
            errf.write(json.dumps(e.as_dict()) + "\n")
            if len(result.errors) < max_errors:
                result.errors.append(e.as_dict())

        lines_seen = [0]

        def on_line(raw: RawLine) -> None:
            lines_seen[0] += 1
            if should_stop is not None and lines_seen[0] % 4096 == 0 and should_stop():
                raise _Interrupted()

        for enc in iter_encoded(path, encoder, max_line_bytes=max_line_bytes, chunk_lines=chunk_lines,
                                on_error=on_error, on_line=on_line):
            result.good += 1
            result.tokens += len(enc.ids)
            result.label_tokens += sum(enc.labels)
        result.lines = lines_seen[0]
    os.replace(tmp, errors_path)
    result.blank = result.lines - result.good - result.bad
    judge(result, max_bad_fraction)
    if result.rejected:
        raise DataError(result.reason, result.errors)
    return result


class _Interrupted(Exception):
    """A stop was requested during the first pass."""


Interrupted = _Interrupted


class BlockStream:
    """Fixed-size token blocks from a cursor on; epochs follow each other seamlessly.

    Each yielded item is ``(input_ids, labels, attention_mask, cursor_after)`` with plain lists
    of length ``seq_len``. The last block of an epoch is padded (labels ignored, attention 0),
    so no token is lost and every block has the same shape.
    """

    def __init__(self, path: Path, encoder: Encoder, *, seq_len: int, max_line_bytes: int,
                 chunk_lines: int, pad_id: int, blocks_per_epoch: int, epochs: int,
                 cursor: Cursor | None = None):
        self.path, self.encoder = path, encoder
        self.seq_len, self.max_line_bytes, self.chunk_lines = seq_len, max_line_bytes, chunk_lines
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
        queue: deque[list] = deque()  # [Encoded, position]
        buffered = 0
        first = True
        last_end, last_line = cur.offset, cur.line
        for enc in iter_encoded(self.path, self.encoder, max_line_bytes=self.max_line_bytes,
                                chunk_lines=self.chunk_lines, start_offset=cur.offset, start_line=cur.line):
            pos = 0
            if first:
                first = False
                if enc.offset == cur.offset:
                    pos = cur.token_skip
                    if pos > len(enc.ids):
                        raise DataError(f"data file changed: line {enc.line} is shorter than the checkpoint says")
            queue.append([enc, pos])
            buffered += len(enc.ids) - pos
            last_end, last_line = enc.end, enc.line
            while buffered >= n:
                yield self._take(queue, n, cur, last_end, last_line)
                buffered -= n
        if buffered > 0:
            yield self._take(queue, buffered, cur, last_end, last_line)

    def _take(self, queue: deque, count: int, cur: Cursor, last_end: int, last_line: int):
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
            cur.offset, cur.line, cur.token_skip = enc.offset, enc.line - 1, pos
        else:
            cur.offset, cur.line, cur.token_skip = last_end, last_line, 0
        return ids, labels, mask, Cursor(**cur.as_dict())
