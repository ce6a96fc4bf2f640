"""Helpers to lay out a batch folder and run the real worker as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

from trainerd.core.config import dump_json, from_dict

from conftest import subprocess_env
from support.config import config_dict


def sample_lines(n: int, *, start: int = 0) -> list[str]:
    """Deterministic mixed-format lines (text, prompt/completion, chat)."""
    out = []
    for i in range(start, start + n):
        k = i % 3
        if k == 0:
            out.append(json.dumps({"text": f"The quick brown fox {i} jumps over the lazy dog. " * 2}))
        elif k == 1:
            out.append(json.dumps({"prompt": f"Question {i}: what is two plus two?", "completion": " Answer: four."}))
        else:
            out.append(json.dumps({"messages": [
                {"role": "system", "content": "be nice"},
                {"role": "user", "content": f"hello {i}"},
                {"role": "assistant", "content": "I am fine, thank you."}]}))
    return out


def make_batch(tmp: Path, model_dir: Path, lines: Iterable[str] | bytes, *, name: str = "batch",
               **overrides: Any) -> Path:
    """Create root/ and a batch folder with data.jsonl and settings.json; return the batch dir."""
    root = tmp / "root"
    root.mkdir(parents=True, exist_ok=True)
    batch = tmp / name
    batch.mkdir(parents=True, exist_ok=True)
    data = lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode()
    (batch / "data.jsonl").write_bytes(data)
    write_settings(batch, root, model_dir, **overrides)
    return batch


# The worker reads none of these: its settings.json keeps the product's values for them.
DAEMON_ONLY = {"supervisor": None, "retry": None, "disk": None}


def write_settings(batch: Path, root: Path, model_dir: Path, **overrides: Any) -> None:
    """The batch's settings.json, as the supervisor writes it: the test config with ``overrides``;
    fp32 unless a test asks for bf16 (``dtype="bfloat16"``): tolerances and bit-identity are per
    precision."""
    dtype = overrides.pop("dtype", "float32")
    dump_json(from_dict(config_dict(root, model_dir, DAEMON_ONLY, {"model": {"dtype": dtype}}, **overrides)),
              batch / "settings.json")


def worker_cmd(batch: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainerd.worker", str(batch), *extra]


def run_worker(batch: Path, *extra: str, env: dict[str, str] | None = None, timeout: float = 300,
               stdin: Any = subprocess.DEVNULL) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    """Run the worker to its end; return (exit code, result.json, JSON log lines)."""
    p = subprocess.run(worker_cmd(batch, *extra), env=env or subprocess_env(), stdin=stdin,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    logs = [json.loads(l) for l in p.stdout.decode().splitlines() if l.startswith("{")]
    try:
        result = json.loads((batch / "result.json").read_text())
    except FileNotFoundError:
        result = {}
    if p.returncode not in (0, 65, 75, 78) and p.returncode > 0:
        sys.stderr.write(p.stderr.decode()[-4000:])
    return p.returncode, result, logs


def start_worker(batch: Path, *extra: str, env: dict[str, str] | None = None,
                 stdin: Any = subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen(worker_cmd(batch, *extra), env=env or subprocess_env(), stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_event(proc: subprocess.Popen, event: str, *, min_step: int = 0) -> dict[str, Any]:
    """Read the worker's stdout until a log line with ``event`` (and step >= min_step) appears."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if not line.startswith(b"{"):
            continue
        rec = json.loads(line)
        if rec.get("event") == event and rec.get("step", 0) >= min_step:
            return rec
    raise AssertionError(f"worker ended before logging {event!r} (rc={proc.wait()}): "
                         f"{proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")


def finish(proc: subprocess.Popen, timeout: float = 120) -> int:
    if proc.stdin is not None and proc.stdin.closed:
        proc.stdin = None  # communicate() would flush a closed pipe
    proc.communicate(timeout=timeout)
    return proc.returncode


def adapter_bytes(path: Path) -> bytes:
    return (path / "adapter_model.safetensors").read_bytes()


def clean_runs(batch: Path) -> None:
    for name in ("result.json", "progress.json", ".stop"):
        try:
            os.unlink(batch / name)
        except FileNotFoundError:
            pass
