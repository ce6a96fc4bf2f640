"""Reading and validating JSONL training lines: stdlib only.

Shared by the worker (which also tokenizes) and by the torch-free CLI (`trainerd validate`,
`trainerd submit`). A line is read with a bound (`max_line_bytes`): a 100 MB single line is
skipped in fixed-size pieces and never held in memory whole.

Formats (one JSON object per line):

- ``{"text": "..."}``                                  loss on every token
- ``{"prompt": "...", "completion": "..."}``           loss on the completion only
- ``{"messages": [{"role": "...", "content": "..."}]}`` chat template, loss on assistant turns
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator

from trainerd.core.fsutil import open_regular

__all__ = [
    "ROLES",
    "Example",
    "LineError",
    "RawLine",
    "ScanReport",
    "content_hash",
    "iter_lines",
    "parse_line",
    "scan_file",
]

ROLES = ("system", "user", "assistant")
_BOM = b"\xef\xbb\xbf"
_SKIP_CHUNK = 1 << 20  # bytes read at a time while skipping an over-long line


@dataclass(frozen=True)
class RawLine:
    number: int  # 1-based line number
    offset: int  # byte offset of the line's first byte
    end: int  # byte offset just past the line (incl. its newline)
    data: bytes | None  # None when the line was too long to read
    error: str | None = None


@dataclass(frozen=True)
class Example:
    """A valid training example; exactly one of the three shapes is set."""

    kind: str  # "text" | "completion" | "chat"
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class LineError:
    line: int
    offset: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "offset": self.offset, "reason": self.reason}


def iter_lines(f: BinaryIO, max_line_bytes: int, *, start_offset: int = 0,
               start_line: int = 0) -> Iterator[RawLine]:
    """Yield the lines of a binary file from ``start_offset`` (line ``start_line`` + 1 on)."""
    f.seek(start_offset)
    offset, number = start_offset, start_line
    # +2 so a line of exactly max_line_bytes with CRLF still fits in one read.
    limit = max_line_bytes + 2
    while True:
        chunk = f.readline(limit)
        if not chunk:
            return
        number += 1
        start = offset
        offset += len(chunk)
        if chunk.endswith(b"\n") or len(chunk) < limit:
            body = chunk.rstrip(b"\n").rstrip(b"\r") if chunk.endswith(b"\n") else chunk
            if len(body) > max_line_bytes:
                yield RawLine(number, start, offset, None,
                              f"line is longer than data.max_line_bytes ({max_line_bytes} bytes)")
            else:
                yield RawLine(number, start, offset, chunk)
            continue
        # Over-long: skip to the end of the line without keeping it.
        total = len(chunk)
        while True:
            piece = f.readline(_SKIP_CHUNK)
            offset += len(piece)
            total += len(piece)
            if not piece or piece.endswith(b"\n"):
                break
        yield RawLine(number, start, offset, None,
                      f"line is longer than data.max_line_bytes ({max_line_bytes} bytes): {total} bytes")


def _nonempty_str(obj: dict[str, Any], key: str) -> str:
    if key not in obj:
        raise _Bad(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise _Bad(f"field {key!r} must be a string, got {_typename(value)}")
    if not value.strip():
        raise _Bad(f"field {key!r} is empty")
    return value


class _Bad(Exception):
    pass


def _typename(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(v), type(v).__name__)


def _parse_obj(obj: Any) -> Example:
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object per line, got {_typename(obj)}")
    shapes = [k for k in ("text", "messages") if k in obj] + (
        ["prompt/completion"] if ("prompt" in obj or "completion" in obj) else [])
    if not shapes:
        keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
        raise _Bad(f"no training fields: expected 'text', 'prompt'+'completion' or 'messages' (keys: {keys})")
    if len(shapes) > 1:
        raise _Bad(f"ambiguous line: has {' and '.join(shapes)}; use exactly one format")
    if shapes[0] == "text":
        return Example("text", text=_nonempty_str(obj, "text"))
    if shapes[0] == "prompt/completion":
        return Example("completion", prompt=_nonempty_str(obj, "prompt"),
                       completion=_nonempty_str(obj, "completion"))
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        raise _Bad(f"field 'messages' must be an array, got {_typename(msgs)}")
    if not msgs:
        raise _Bad("field 'messages' is empty")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _Bad(f"messages[{i}] must be an object, got {_typename(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise _Bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        content = m.get("content")
        if not isinstance(content, str):
            raise _Bad(f"messages[{i}].content must be a string, got {_typename(content)}")
        if not content.strip():
            raise _Bad(f"messages[{i}].content is empty")
        out.append((role, content))
    if not any(r == "assistant" for r, _ in out):
        raise _Bad("messages has no assistant turn: nothing to learn from")
    return Example("chat", messages=tuple(out))


def content_hash(ex: Example) -> str:
    """sha256 of an example's content, whatever its bytes looked like (key order, spacing, BOM,
    CRLF): the identity the evaluation split and the exclusion of held-out contents use."""
    canon = json.dumps([ex.kind, ex.text, ex.prompt, ex.completion, ex.messages], ensure_ascii=False,
                       separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def parse_line(raw: RawLine) -> tuple[Example | None, str | None]:
    """(example, None) for a good line, (None, reason) for a bad one, (None, None) for a blank one."""
    if raw.error is not None:
        return None, raw.error
    data = raw.data or b""
    if raw.offset == 0 and data.startswith(_BOM):
        data = data[len(_BOM):]
    data = data.rstrip(b"\n").rstrip(b"\r")
    if not data.strip(b" \t\r\n\f\v"):
        return None, None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 at byte {e.start} of the line"
    if "\x00" in text:
        return None, f"NUL byte at character {text.index(chr(0))} of the line"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} at column {e.colno}"
    except RecursionError:
        return None, "invalid JSON: nested too deeply"
    try:
        return _parse_obj(obj), None
    except _Bad as e:
        return None, str(e)


@dataclass
class ScanReport:
    """What a pass over a file found: line counts and the first bad lines, and the verdict.

    ``trainerd validate``/``submit`` fill the line counts; the worker's first pass also counts
    tokens (for the schedule) and is cached as the batch's scan.json (:meth:`as_cache`).
    """

    path: str
    lines: int = 0
    good: int = 0
    bad: int = 0
    blank: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    rejected: bool = False
    reason: str | None = None
    # The worker's first pass only: the file it read, and its tokens.
    size: int = 0
    mtime_ns: int = 0
    tokens: int = 0
    label_tokens: int = 0
    seq_len: int = 0
    replay_tokens: int = 0      # of ``tokens``, those of replayed lines
    contrib: dict[str, Any] = field(default_factory=dict)  # the lines this batch gives the replay store

    _CACHED = ("size", "mtime_ns", "lines", "good", "bad", "blank", "tokens", "label_tokens", "seq_len", "errors",
               "replay_tokens", "contrib")

    @property
    def bad_fraction(self) -> float:
        n = self.good + self.bad
        return self.bad / n if n else 0.0

    @property
    def blocks_per_epoch(self) -> int:
        return -(-self.tokens // self.seq_len) if self.seq_len else 0

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "lines": self.lines, "good": self.good, "bad": self.bad,
                "blank": self.blank, "bad_fraction": round(self.bad_fraction, 6),
                "errors": self.errors, "rejected": self.rejected, "reason": self.reason}

    def as_cache(self) -> dict[str, Any]:
        """scan.json: what a resumed attempt needs instead of reading the file again."""
        return {**{k: getattr(self, k) for k in self._CACHED}, "blocks_per_epoch": self.blocks_per_epoch}

    @classmethod
    def from_cache(cls, path: str, d: dict[str, Any]) -> "ScanReport":
        return cls(path=path, **{k: d[k] for k in cls._CACHED if k in d})


def judge(report: ScanReport, max_bad_fraction: float) -> None:
    """Set ``rejected``/``reason`` from the counts (shared by the CLI and the worker)."""
    if report.good == 0:
        report.rejected = True
        if report.bad:
            report.reason = f"no valid training examples: all {report.bad} non-blank lines are bad"
        else:
            report.reason = "no training examples: the file is empty or only blank lines"
    elif report.bad_fraction > max_bad_fraction:
        report.rejected = True
        report.reason = (f"too many bad lines: {report.bad} of {report.good + report.bad} "
                         f"({report.bad_fraction:.1%}) > data.max_bad_fraction {max_bad_fraction:.1%}")
    if report.rejected and report.errors:
        # The operator's first question is "bad how?": name the first bad line in the reason
        # itself (the log line and failed/<name>.error.json), the rest are in "errors".
        first = report.errors[0]
        report.reason += f" (first: line {first['line']}: {first['reason']})"


def scan_file(path: str | os.PathLike[str], *, max_line_bytes: int, max_bad_fraction: float,
              max_errors: int = 20, errors_out: BinaryIO | None = None,
              max_file_bytes: int | None = None) -> ScanReport:
    """Validate every line of a file (streamed; memory does not grow with the file).

    ``errors_out``: a binary file that gets every bad line as a JSON line, as it is found (a
    file of millions of bad lines must not grow this process); ``report.errors`` keeps the first
    ``max_errors``. A ``*.jsonl.gz``/``*.jsonl.zst`` file is read decompressed (trainerd/core/compressed.py):
    a corrupt or truncated archive, or one past ``max_file_bytes`` decompressed, is rejected.
    """
    from trainerd.core.compressed import ArchiveError, is_compressed, open_decompressed

    report = ScanReport(path=os.fspath(path))
    try:
        f = open_regular(path)
    except OSError as e:
        report.rejected = True
        report.reason = f"cannot read: {e.strerror or e}"
        return report
    with f:
        try:
            stream = open_decompressed(f, os.path.basename(path), limit=max_file_bytes) \
                if is_compressed(os.fspath(path)) else f
            _scan_lines(report, stream, max_line_bytes, max_errors, errors_out)
        except ArchiveError as e:
            report.rejected = True
            report.reason = str(e)
            return report
    judge(report, max_bad_fraction)
    return report


def _scan_lines(report: ScanReport, f: BinaryIO, max_line_bytes: int, max_errors: int,
                errors_out: BinaryIO | None) -> None:
    for raw in iter_lines(f, max_line_bytes):
        report.lines += 1
        ex, err = parse_line(raw)
        if err is not None:
            report.bad += 1
            error = LineError(raw.number, raw.offset, err).as_dict()
            if errors_out is not None:
                errors_out.write(json.dumps(error).encode() + b"\n")
            if len(report.errors) < max_errors:
                report.errors.append(error)
        elif ex is None:
            report.blank += 1
        else:
            report.good += 1
