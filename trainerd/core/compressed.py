"""Compressed input (``*.jsonl.gz``, ``*.jsonl.zst``): read as a stream of the decompressed bytes, in
bounded memory, with every way an archive can be wrong turned into one clear :class:`ArchiveError`.

Used where the content is read: ``trainerd validate``/``submit`` (through
:func:`trainerd.core.lines.scan_file`) and the worker, whose first step :func:`expand` writes the batch's
``data.jsonl`` from the claimed ``data.jsonl.gz|zst`` before its first pass. Never in the
supervisor's loop: it only renames the archive into the batch folder and hashes its bytes.

Bounded memory: input is fed to the decompressor in small pieces and output taken in bounded
pieces (zlib's ``max_length``; zstd's ``decompressobj`` has no such bound, so it gets input 256
bytes at a time: a zstd block expands to at most 128 KiB and costs at least 3 bytes, so one piece
yields at most ~11 MiB even from a crafted bomb, and ~2 KiB from real text. Measured: a 32 KiB zstd
bomb of 1 GiB peaks at ~48 MiB RSS (0.4 s), a 1 MiB gzip one at ~20 MiB (1.2 s)). Multi-member gzip and
multi-frame zstd files are read whole. A stream that ends inside a member/frame is *truncated*; a
bad header, checksum or block is *corrupt*; more output than ``limit`` bytes (``data.max_file_bytes``)
is a *bomb*, stopped as soon as it passes the limit; :func:`expand` also stops before the file system
falls below ``disk.min_free_bytes``. zstd needs the ``zstandard`` package (imported only for a
``.zst`` file).
"""

from __future__ import annotations

import io
import os
import time
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable

from trainerd.core.contract import COMPRESSED_SUFFIXES, data_suffix
from trainerd.core.fsutil import fmt_bytes, free_bytes, fsync_dir, open_regular

__all__ = ["ArchiveError", "expand", "is_compressed", "open_decompressed"]

IN_CHUNK = 1 << 16        # compressed bytes read from the file at a time
OUT_CHUNK = 1 << 20       # decompressed bytes taken from zlib at a time
ZSTD_PIECE = 1 << 8       # compressed bytes fed to zstd at a time (see the module docstring)
DISK_CHECK_BYTES = 8 << 20  # expand() looks at the free space after every this many bytes written


class ArchiveError(ValueError):
    """The archive cannot be used: ``str()`` names the file and what is wrong (exit 65)."""


def is_compressed(name: str) -> bool:
    return data_suffix(name) in COMPRESSED_SUFFIXES


def _fmt(n: int) -> str:
    return fmt_bytes(n) if n > 0 else "0 B"


class _Decompressing(io.RawIOBase):
    """The decompressed bytes of ``f`` (gzip or zstd), read in bounded pieces."""

    def __init__(self, f: BinaryIO, kind: str, name: str, limit: int | None):
        self.f, self.kind, self.name, self.limit = f, kind, name, limit
        self.out_total = 0
        self.in_total = 0
        self._in = b""             # compressed input not yet given to the decompressor
        self._buf = memoryview(b"")  # decompressed output not yet read
        self._d: Any = None        # the current member's / frame's decompressor
        self._member_open = False  # the current member/frame has had input and has not ended
        self._eof = False
        if kind == ".jsonl.zst":
            try:
                import zstandard
            except ImportError as e:  # pragma: no cover - the package is a dependency
                raise ArchiveError(f"{name}: cannot read zstd without the zstandard package ({e})") from e
            self._zstd = zstandard

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not len(self._buf) and not self._eof:
            self._fill()
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def _new(self) -> Any:
        if self.kind == ".jsonl.gz":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip wrapper: header, CRC32 and size checked
        return self._zstd.ZstdDecompressor().decompressobj()

    def _fill(self) -> None:
        if not self._in and (self._d is None or not getattr(self._d, "unconsumed_tail", b"")):
            self._in = self.f.read(IN_CHUNK)
            self.in_total += len(self._in)
            if not self._in:
                self._eof = True
                if self._member_open:
                    raise ArchiveError(f"{self.name}: truncated: the {self._what()} stream ends inside a "
                                       f"{'member' if self.kind == '.jsonl.gz' else 'frame'} after "
                                       f"{_fmt(self.in_total)} compressed, {_fmt(self.out_total)} decompressed")
                if self.in_total == 0:
                    raise ArchiveError(f"{self.name}: empty file: not a {self._what()} stream")
                return
        if self._d is None:
            self._d = self._new()
        try:
            if self.kind == ".jsonl.gz":
                data = self._d.unconsumed_tail or self._in
                if not self._d.unconsumed_tail:
                    self._in = b""
                out = self._d.decompress(data, OUT_CHUNK)
            else:
                piece, self._in = self._in[:ZSTD_PIECE], self._in[ZSTD_PIECE:]
                out = self._d.decompress(piece)
            self._member_open = True
        except Exception as e:  # zlib.error, zstandard.ZstdError: the bytes are not what they claim
            raise ArchiveError(f"{self.name}: corrupt {self._what()} data after {_fmt(self.out_total)} decompressed: "
                               f"{e}") from e
        if self._d.eof:
            # The member/frame ended (its checksum held): what follows is the next one, if any.
            self._in = self._d.unused_data + self._in
            self._d, self._member_open = None, False
        self.out_total += len(out)
        if self.limit is not None and self.out_total > self.limit:
            raise ArchiveError(f"{self.name}: decompresses to more than data.max_file_bytes ({_fmt(self.limit)}) "
                               f"from {_fmt(self.in_total)} read: a decompression bomb, or raise the limit")
        self._buf = memoryview(out)

    def _what(self) -> str:
        return "gzip" if self.kind == ".jsonl.gz" else "zstd"


class _Reader(io.BufferedReader):
    """A buffered reader whose ``seek(0)`` before anything was read is allowed (iter_lines seeks)."""

    def seek(self, pos: int, whence: int = 0) -> int:
        if pos == 0 and whence == 0 and self.raw.out_total == 0 and not len(self.raw._buf):
            return 0
        raise io.UnsupportedOperation("a decompressed stream only reads forward")


def open_decompressed(f: BinaryIO, name: str, *, limit: int | None = None) -> BinaryIO:
    """A binary reader of the decompressed bytes of the open file ``f`` (named ``name``, which says
    gzip or zstd). Reading raises :class:`ArchiveError`."""
    kind = data_suffix(name)
    if kind not in COMPRESSED_SUFFIXES:
        raise ValueError(f"{name}: not a compressed name ({', '.join(COMPRESSED_SUFFIXES)})")
    return _Reader(_Decompressing(f, kind, name, limit), buffer_size=OUT_CHUNK)


def expand(src: Path, dest: Path, *, name: str, max_bytes: int, min_free_bytes: int,
           beat: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write the decompressed bytes of ``src`` to ``dest`` (tmp + fsync + rename: ``dest`` appears
    whole or not at all). ArchiveError when the archive is corrupt or truncated, decompresses to more
    than ``max_bytes``, or would leave less than ``min_free_bytes`` free (nothing is left behind)."""
    t0 = time.monotonic()
    # Per process: ranks of one torchrun attempt may expand the same batch at once; each writes its
    # own copy and the renames leave one whole file. A copy left by a killed attempt is removed.
    for old in dest.parent.glob(f".{dest.name}.expanding-*"):
        if not os.path.exists(f"/proc/{old.name.rsplit('-', 1)[-1]}"):
            _unlink(old)
    tmp = dest.with_name(f".{dest.name}.expanding-{os.getpid()}")
    written = 0
    next_check = DISK_CHECK_BYTES
    try:
        with open_regular(src) as f, open(tmp, "wb") as out:
            reader = open_decompressed(f, name, limit=max_bytes)
            while True:
                chunk = reader.read(OUT_CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                written += len(chunk)
                if written >= next_check:
                    next_check += DISK_CHECK_BYTES
                    if beat is not None:
                        beat()
                    free = free_bytes(dest.parent)
                    if free is not None and free < min_free_bytes:
                        raise ArchiveError(
                            f"{name}: decompressing it would leave less than disk.min_free_bytes "
                            f"({_fmt(min_free_bytes)}) free: stopped after {_fmt(written)} with {_fmt(free)} left; "
                            "free space (or raise data.max_file_bytes only with the room for it), then submit it "
                            "again from failed/")
            out.flush()
            os.fsync(out.fileno())
            compressed = reader.raw.in_total
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except OSError as e:
        _unlink(tmp)
        if e.errno == 28:  # ENOSPC: the same verdict as a bomb the free-space check caught
            raise ArchiveError(f"{name}: the disk filled while decompressing it ({_fmt(written)} written)") from e
        raise
    except BaseException:
        _unlink(tmp)
        raise
    return {"compressed_bytes": compressed, "bytes": written, "seconds": round(time.monotonic() - t0, 3)}


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass
