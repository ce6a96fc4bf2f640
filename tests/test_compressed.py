"""Compressed input: *.jsonl.gz and *.jsonl.zst are read decompressed in bounded memory; a corrupt or
truncated archive or a decompression bomb fails with a clear reason (exit 65) without filling the disk;
validate/submit take them; the real daemon trains them and keeps the original bytes in done/ / failed/."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import time

import pytest
import zstandard

from conftest import subprocess_env
from trainerd.cli import main
from trainerd.core.compressed import ArchiveError, expand, open_decompressed
from trainerd.core.contract import RootLayout
from trainerd.core.lines import iter_lines
from workerutil import make_batch, run_worker, sample_lines

DATA = ("\n".join(sample_lines(40)) + "\n").encode()
PACK = {".jsonl.gz": gzip.compress, ".jsonl.zst": lambda b: zstandard.ZstdCompressor().compress(b)}
KINDS = sorted(PACK)


def _read(buf: bytes, name: str, limit: int | None = None) -> int:
    return sum(1 for _ in iter_lines(open_decompressed(io.BytesIO(buf), name, limit=limit), 1 << 20))


@pytest.mark.parametrize("kind", KINDS)
def test_good_multi_part_and_every_kind_of_bad_archive(kind):
    """Whole and multi-member/-frame archives read every line; truncated, corrupt, empty and bomb
    archives raise ArchiveError naming the file and what is wrong."""
    pack, name = PACK[kind], "x" + kind
    assert _read(pack(DATA), name) == 40
    assert _read(pack(DATA[:100]) + pack(DATA[100:]), name) == 40
    whole = pack(DATA)
    for buf, what in ((whole[: len(whole) // 2], "truncated"), (whole[:-4], "truncated"), (b"", "empty file"),
                      (whole[:12] + b"\xff" * 16 + whole[28:], "corrupt"), (b"plain text\n" * 9, "corrupt")):
        with pytest.raises(ArchiveError, match=f"^{name}: {what}"):
            _read(buf, name)
    with pytest.raises(ArchiveError, match=r"decompresses to more than data.max_file_bytes \(1.0 KiB\)"):
        _read(pack(b"\0" * (8 << 20)), name, limit=1024)


@pytest.mark.parametrize("kind", KINDS)
def test_a_bomb_stays_in_bounded_memory(tmp_path, kind):
    """Reading 1 GiB out of a small archive (in a fresh process) peaks well under 100 MiB of RSS."""
    bomb = tmp_path / f"b{kind}"
    if kind == ".jsonl.zst":
        bomb.write_bytes(zstandard.ZstdCompressor(level=19).compress(b"\0" * (256 << 20)) * 4)
    else:
        c = __import__("zlib").compressobj(9, 8, 31)
        bomb.write_bytes(b"".join(c.compress(b"\0" * (16 << 20)) for _ in range(64)) + c.flush())
    # VmHWM, not ru_maxrss: the latter survives exec and would report the test process's own peak.
    code = ("import re, sys; from trainerd.core.compressed import open_decompressed;"
            "r = open_decompressed(open(sys.argv[1], 'rb'), sys.argv[1]); n = 0\n"
            "while (c := r.read(1 << 20)): n += len(c)\n"
            "print(n, re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], env=subprocess_env(), capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert int(out[0]) == 1 << 30 and int(out[1]) < 100 * 1024, out


def test_expand_stops_before_the_disk_is_low_and_leaves_nothing(tmp_path, monkeypatch):
    """expand() writes data.jsonl whole, or, past max_bytes or below min_free_bytes, nothing at all."""
    src = tmp_path / "data.jsonl.gz"
    src.write_bytes(gzip.compress(b"\0" * (32 << 20)))
    dest = tmp_path / "data.jsonl"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".data.jsonl.expanding-{dead.pid}").write_bytes(b"left by a killed attempt")
    got = expand(src, dest, name="a.jsonl.gz", max_bytes=1 << 30, min_free_bytes=0)
    assert not (tmp_path / f".data.jsonl.expanding-{dead.pid}").exists()
    assert dest.stat().st_size == got["bytes"] == 32 << 20
    dest.unlink()
    with pytest.raises(ArchiveError, match="more than data.max_file_bytes"):
        expand(src, dest, name="a.jsonl.gz", max_bytes=1 << 20, min_free_bytes=0)
    free = {"left": 20 << 20}

    def fake_free(_path):  # the file system "fills" as the expansion writes
        free["left"] -= 8 << 20
        return free["left"]

    monkeypatch.setattr("trainerd.core.compressed.free_bytes", fake_free)
    with pytest.raises(ArchiveError, match="would leave less than disk.min_free_bytes"):
        expand(src, dest, name="a.jsonl.gz", max_bytes=1 << 30, min_free_bytes=10 << 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl.gz"]


@pytest.mark.parametrize("kind", KINDS)
def test_validate_and_submit_take_compressed_files(tmp_path, capsys, kind):
    """validate reads them decompressed (65 for a truncated one, naming why); submit places the
    compressed bytes unchanged."""
    good, bad = tmp_path / f"good{kind}", tmp_path / f"bad{kind}"
    good.write_bytes(PACK[kind](DATA))
    bad.write_bytes(PACK[kind](DATA)[:-8])
    assert main(["validate", str(good)]) == 0
    assert "40 good" in capsys.readouterr().out
    assert main(["validate", str(bad)]) == 65
    assert "truncated" in capsys.readouterr().out
    layout = RootLayout(tmp_path / "root")
    layout.make()
    assert main(["submit", "--root", str(layout.root), str(good)]) == 0
    assert (layout.inbox / good.name).read_bytes() == good.read_bytes()
    assert main(["submit", "--root", str(layout.root), str(bad)]) == 65
    assert not (layout.inbox / bad.name).exists()


def test_the_worker_fails_a_truncated_archive_before_loading_anything(tmp_path, tiny_model_dir):
    """The worker's first step decompresses; a truncated archive ends the attempt with exit 65 and a
    reason naming the file, in about a second (no torch import), leaving no partial data.jsonl."""
    batch = make_batch(tmp_path, tiny_model_dir, sample_lines(10))
    (batch / "data.jsonl").unlink()
    (batch / "data.jsonl.gz").write_bytes(gzip.compress(DATA)[:-8])
    t0 = time.monotonic()
    rc, result, _ = run_worker(batch)
    assert rc == 65 and result["status"] == "bad_data", result
    assert result["reason"].startswith("data.jsonl.gz: truncated")
    assert not (batch / "data.jsonl").exists() and time.monotonic() - t0 < 30
    assert [p.name for p in batch.iterdir() if p.name.startswith(".data.jsonl")] == []


@pytest.mark.slow
def test_the_daemon_trains_gz_and_zst_and_files_bad_ones(daemon_factory):
    """A .jsonl.gz and a .jsonl.zst train and publish; their original bytes are in done/ and no
    decompressed copy is left; a truncated one and a bomb fail with their reasons, bytes in failed/."""
    d = daemon_factory(data={"max_file_bytes": "1MiB"}).start()
    blobs = {"a.jsonl.gz": PACK[".jsonl.gz"](DATA), "b.jsonl.zst": PACK[".jsonl.zst"](("\n".join(sample_lines(40, start=100)) + "\n").encode()),
             "c.jsonl.gz": PACK[".jsonl.gz"](DATA)[:-8], "bomb.jsonl.zst": PACK[".jsonl.zst"](b"\n" * (64 << 20))}
    for name, blob in blobs.items():
        d.drop(name, blob)
    for name in blobs:
        d.wait_for(lambda n=name: d.state_of(n) in ("done", "failed", "rejected"), 300)
    assert (d.state_of("a.jsonl.gz"), d.state_of("b.jsonl.zst")) == ("done", "done")
    for name in ("a.jsonl.gz", "b.jsonl.zst"):
        assert (d.root / "done" / name).read_bytes() == blobs[name]
        b = d.batch(name)
        assert not (d.root / "batches" / f"{b['id']:06d}" / "data.jsonl").exists()
    lin = json.loads((d.root / "adapters" / "1" / "lineage.json").read_text())
    assert lin["sha256"] == hashlib.sha256(blobs["a.jsonl.gz"]).hexdigest()
    for name, why in (("c.jsonl.gz", "truncated"), ("bomb.jsonl.zst", "decompresses to more than data.max_file_bytes")):
        assert d.state_of(name) == "failed"
        err = json.loads((d.root / "failed" / f"{name}.error.json").read_text())
        assert err["reason"].startswith("data unusable: data.jsonl") and why in err["reason"], err["reason"]
        assert (d.root / "failed" / name).read_bytes() == blobs[name]
    bomb_dir = d.root / "batches" / f"{d.batch('bomb.jsonl.zst')['id']:06d}"
    assert sorted(p.name for p in bomb_dir.iterdir() if "data" in p.name) == []
    assert d.terminate() == 0
