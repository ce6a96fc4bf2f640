"""Shared pieces of the benchmarks: deterministic data, child processes measured from outside.

Peak RSS is taken the same way for every contender: the parent reaps the child with
``os.wait4`` and reads ``ru_maxrss`` of that child (the kernel's high-water mark of resident
memory, file-backed pages of the memory-mapped weights included). Nothing inside the child
has to cooperate, so the trainerd worker is measured exactly as the supervisor runs it.

Every child gets the same thread settings (``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` in the
environment, plus ``torch.set_num_threads`` or ``train.threads`` inside), offline HF flags,
and no tokenizer thread pool, so the only difference between contenders is their own code.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as benchmarks/x.py from anywhere, or on the GPU machine's copy
    sys.path.insert(0, str(REPO))
from trainerd.core.planning import CPU_BF16_FLAGS, cpu_flags  # noqa: E402 (stdlib only; the worker's rule)
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct"

# A fixed word list: the synthetic text is reproducible without any download.
_WORDS = (
    "the of and to in is was for on that with as by at from it his an were are which this be "
    "or had not but first one their its new after who they have her she two been other when "
    "there all during into school time may years more most only over city some world would "
    "where later up such used many can state about national out known university united then "
    "made team american under game war year also while season both three film series group "
    "between well early since several number including part second became area life day high "
    "model training memory adapter worker checkpoint token block stream file line batch step "
    "loss gradient optimizer schedule resume signal process kernel page cache disk daemon"
).split()


def synthetic_lines(n: int, *, seed: int = 0, min_words: int = 20, max_words: int = 120) -> list[str]:
    """``n`` deterministic pseudo-English sentences (same seed, same text, on any machine)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(min_words, max_words)
        words = [rng.choice(_WORDS) for _ in range(k)]
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + ".")
    return out


def iter_synthetic_lines(n: int, *, seed: int = 0, **kw: Any):
    """Like ``synthetic_lines`` but one line at a time (for files of any size)."""
    rng = random.Random(seed)
    lo, hi = kw.get("min_words", 20), kw.get("max_words", 120)
    for _ in range(n):
        k = rng.randint(lo, hi)
        words = [rng.choice(_WORDS) for _ in range(k)]
        words[0] = words[0].capitalize()
        yield " ".join(words) + "."


def child_env(threads: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
        "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
    })
    env.update(extra)
    return env


@dataclass
class ChildRun:
    """How one child process went, measured from the parent."""

    argv: list[str]
    exit_code: int
    wall_s: float
    peak_rss_bytes: int  # ru_maxrss of the child, from wait4
    cpu_s: float  # user + system CPU seconds of the child
    min_flt: int = 0  # minor page faults of the child (fresh pages the kernel zeroed: malloc/mmap churn)
    stdout_lines: list[str] = field(default_factory=list)
    loadavg_before: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"argv": self.argv, "exit_code": self.exit_code, "wall_s": round(self.wall_s, 3),
                "peak_rss_bytes": self.peak_rss_bytes, "cpu_s": round(self.cpu_s, 2),
                "loadavg_before": self.loadavg_before}


def run_child(argv: list[str], *, env: dict[str, str], cwd: Path, stderr_path: Path,
              on_line: Callable[[str], None] | None = None, stdin_pipe: bool = False,
              on_start: Callable[[int], None] | None = None, timeout_s: float = 3600.0) -> ChildRun:
    """Run ``argv``, relay nothing, collect stdout lines, and reap it with wait4 for its rusage.

    ``stdin_pipe`` keeps the write end of a pipe on the child's stdin open for its whole life,
    as the supervisor does (the worker treats EOF there as "parent gone").
    """
    try:
        with open("/proc/loadavg") as f:
            load = f.read().strip()
    except OSError:
        load = ""
    lines: list[str] = []
    with open(stderr_path, "ab") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, env=env, cwd=str(cwd), stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL)
        if on_start is not None:
            on_start(proc.pid)

        def reader() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                lines.append(line)
                if on_line is not None:
                    try:
                        on_line(line)
                    except Exception as e:  # a broken callback must not hang the benchmark
                        print(f"  (line callback failed: {e})", file=sys.stderr)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            # wait4, not proc.wait(): it hands back the child's own rusage (peak RSS, CPU time).
            _pid, status, ru = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        t.join(timeout=10)
        if proc.stdin is not None:
            proc.stdin.close()
        if proc.stdout is not None:
            proc.stdout.close()
    return ChildRun(argv=argv, exit_code=proc.returncode, wall_s=wall, peak_rss_bytes=ru.ru_maxrss * 1024,
                    cpu_s=ru.ru_utime + ru.ru_stime, min_flt=ru.ru_minflt, stdout_lines=lines, loadavg_before=load)


def json_lines(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def worker_settings(*, root: Path, model: Path, seq_len: int, micro_batch: int, grad_accum: int,
                    threads: int, seed: int, lr: float, warmup_steps: int, max_grad_norm: float,
                    lora_r: int, lora_alpha: float, lora_dropout: float, targets: list[str],
                    chunk_lines: int = 1000, dtype: str = "float32", device: str = "cpu") -> dict[str, Any]:
    """The settings.json body for a benchmark batch (validated by ``trainerd.core.config.from_dict``)."""
    return {
        "root": str(root),
        "model": {"path": str(model), "dtype": dtype, "device": device},
        "lora": {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout, "target_modules": list(targets)},
        "train": {
            "seq_len": seq_len, "micro_batch_size": micro_batch, "grad_accum_steps": grad_accum,
            "learning_rate": lr, "warmup_steps": warmup_steps, "max_grad_norm": max_grad_norm,
            "epochs": 1, "seed": seed, "threads": threads,
            # Only the final checkpoint: a benchmark run is short, and a checkpoint is outside
            # the timed step span anyway (it shows in wall time only).
            "checkpoint_every_steps": 0, "checkpoint_every_s": 0.0,
        },
        "data": {"chunk_lines": chunk_lines, "max_bad_fraction": 0.0},
        "log": {"file": False, "format": "json"},
    }


def write_batch(batch_dir: Path, settings: dict[str, Any], data_src: Path) -> None:
    """A batch folder as the supervisor leaves it: data.jsonl + settings.json (validated)."""
    from trainerd.core.config import dump_json, from_dict

    batch_dir.mkdir(parents=True, exist_ok=True)
    dst = batch_dir / "data.jsonl"
    try:
        os.link(data_src, dst)  # same bytes, no copy; the worker only reads it
    except OSError:
        import shutil

        shutil.copyfile(data_src, dst)
    dump_json(from_dict(settings, source="benchmark"), batch_dir / "settings.json")


def tiny_model(dest: Path) -> Path:
    from trainerd.worker.testing import build_tiny_model

    if not (dest / "config.json").is_file():
        build_tiny_model(dest)
    return dest


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> dict[str, float]:
    """min / median / max and the (max - min) / median spread, for per-round figures."""
    if not xs:
        return {}
    m = statistics.median(xs)
    return {"min": min(xs), "median": m, "max": max(xs),
            "spread_pct": round(100.0 * (max(xs) - min(xs)) / m, 2) if m else float("nan")}


def gib(n: float) -> str:
    return f"{n / (1 << 30):.3f} GiB"


def cpu_bf16_features() -> dict[str, bool]:
    """What decides the precision targets: AMX tiles (Intel Sapphire Rapids+) and AVX512-BF16."""
    f = cpu_flags()
    return {"amx_bf16": "amx_bf16" in f, "avx512_bf16": "avx512_bf16" in f, "native_bf16": bool(f & set(CPU_BF16_FLAGS))}


def model_flops_per_token(shape: dict[str, int], seq_len: int) -> float:
    """Model FLOPs per trained token of a LoRA step (the MFU convention: no recompute counted).

    Forward: 2 x every matmul weight (attention and MLP projections, the lm-head) + causal
    attention scores and values (2 x 2 x seq x heads x head_dim per layer, the full square as
    PaLM counts it). Backward: the same again for the projections' activation gradients (frozen
    weights get no weight gradient) and twice the attention's (its inputs are all activations);
    the LoRA matrices' own FLOPs are < 1% and left out. SmolLM2-135M at seq 256: 591 MFLOP/token.
    """
    h, L, inter, vocab = shape["hidden"], shape["layers"], shape["intermediate"], shape["vocab"]
    heads, kvh, hd = shape["heads"], shape["kv_heads"], shape["head_dim"]
    per_layer = h * hd * (heads + 2 * kvh) + heads * hd * h + 3 * h * inter
    matmul_params = L * per_layer + vocab * h
    attention = 2 * 2 * seq_len * heads * hd * L
    return 4 * matmul_params + 3 * attention


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu_bf16"] = cpu_bf16_features()
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True, timeout=10).stdout.strip()
    except Exception:
        pass
    try:
        import importlib.metadata as md

        for pkg in ("torch", "transformers", "peft", "datasets", "accelerate", "tokenizers"):
            try:
                info[pkg] = md.version(pkg)
            except md.PackageNotFoundError:
                pass
    except Exception:
        pass
    return info


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)
