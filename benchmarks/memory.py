"""Memory benchmark: does peak RSS depend on the size of the data file?

The trainerd worker streams its file (bounded line reads, ``data.chunk_lines`` lines per
tokenizer call, packed blocks on the fly), so its peak RSS on N lines and on 20 x N lines
should be the same (target: ratio <= 1.03). Beside it runs the "seed-style" approach of an
in-memory pipeline (``json.loads`` every line into a list, ``datasets.Dataset.from_list``,
batched ``.map`` tokenization, a packing ``.map``, then training; the *fixed* version from the
OOM write-up, with ``load_from_cache_file=False``, 1000-row batches and the intermediate lists
deleted), whose RSS grows with N.

Both load the same model and train the same few steps (``--steps``, default 2) at the same
seq_len / micro-batch / threads, so the difference is the data handling. The worker is run as
the supervisor runs it and asked to stop through ``BATCH_DIR/.stop`` once it logged
``--steps`` steps (it checkpoints and exits 75; a step may start before it sees the file).

Peak RSS is ``ru_maxrss`` from ``wait4`` (the headline). The parent also samples each child's
RSS every 20 ms and splits it in two phases: "data" (start up to the first training step:
imports, model load, the whole first pass over the file) and "train".

Usage (from the repository root):
    .venv/bin/python benchmarks/memory.py --tiny --lines 2000       # smoke, ~1 min
    .venv/bin/python benchmarks/memory.py                           # real model, N = 5000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    DEFAULT_MODEL,
    REPO,
    child_env,
    gib,
    iter_synthetic_lines,
    json_lines,
    machine_info,
    run_child,
    tiny_model,
    worker_settings,
    write_batch,
    write_json,
)

IGNORE_INDEX = -100


def write_data(path: Path, n: int, seed: int) -> dict[str, Any]:
    if not path.is_file():
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "w", encoding="utf-8") as f:
            for text in iter_synthetic_lines(n, seed=seed):
                f.write(json.dumps({"text": text}) + "\n")
        os.replace(tmp, path)
    return {"lines": n, "bytes": path.stat().st_size}


# --- the seed-style child -----------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _say(event: str, **kw: Any) -> None:
    import resource

    kw.update(event=event, rss_bytes=_rss(), peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps(kw), flush=True)


def child_seed(a: argparse.Namespace) -> None:
    """In-memory pipeline as in the OOM write-up (context 004), after its fixes."""
    import torch

    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    _say("model_loaded")
    t0 = time.monotonic()
    with open(a.data, encoding="utf-8") as f:
        examples = [json.loads(line) for line in f if line.strip()]
    train_data = [{"text": ex["text"]} for ex in examples]
    ds = Dataset.from_list(train_data)
    del examples, train_data  # the write-up's "Fix 2"
    gc.collect()
    eos = tok.eos_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    # The write-up's "Fix 1": 1000-row batches, no cache reuse, one process.
    tokenized = ds.map(tokenize, batched=True, batch_size=1000, remove_columns=["text"], num_proc=1,
                       load_from_cache_file=False, writer_batch_size=1000)
    n = a.seq_len

    def group(batch: dict[str, list]) -> dict[str, list]:
        flat = [t for ids in batch["input_ids"] for t in ids]
        usable = len(flat) // n * n
        blocks = [flat[i: i + n] for i in range(0, usable, n)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    packed = tokenized.map(group, batched=True, batch_size=1000, remove_columns=["input_ids"],
                           load_from_cache_file=False, writer_batch_size=1000)
    del tokenized
    gc.collect()
    packed.set_format("torch")
    _say("data_ready", blocks=len(packed), prep_s=round(time.monotonic() - t0, 2))

    torch.manual_seed(a.seed)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                            target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    for step in range(a.steps):
        rows = packed[step * a.micro_batch: (step + 1) * a.micro_batch]
        out = model(input_ids=rows["input_ids"], labels=rows["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _say("step", step=step + 1, loss=round(out.loss.item(), 4))
    # ``ds`` and ``packed`` stay referenced to the end, as a Trainer holding its datasets would.
    _say("done", rows=len(ds), blocks=len(packed))


# --- the parent ---------------------------------------------------------------------------


class PhaseSampler:
    """Samples a child's RSS from /proc every ``interval_s`` and keeps the max per phase."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.phase = "data"
        self.max = {"data": 0, "train": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, pid: int) -> None:
        page = os.sysconf("SC_PAGE_SIZE")

        def loop() -> None:
            path = f"/proc/{pid}/statm"
            while not self._stop.is_set():
                try:
                    with open(path) as f:
                        rss = int(f.read().split()[1]) * page
                except (OSError, ValueError, IndexError):
                    return
                ph = self.phase
                if rss > self.max[ph]:
                    self.max[ph] = rss
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


def run_worker(a: argparse.Namespace, model: Path, data: Path, label: str) -> dict[str, Any]:
    batch = a.work / f"worker-{label}"
    shutil.rmtree(batch, ignore_errors=True)
    settings = worker_settings(root=a.work / "root", model=model, seq_len=a.seq_len, micro_batch=a.micro_batch,
                               grad_accum=1, threads=a.threads, seed=1234, lr=2e-4, warmup_steps=10,
                               max_grad_norm=1.0, lora_r=8, lora_alpha=16.0, lora_dropout=0.05,
                               targets=["q_proj", "v_proj"])
    (a.work / "root").mkdir(exist_ok=True)
    write_batch(batch, settings, data)
    sampler = PhaseSampler()

    def on_line(line: str) -> None:
        if not line.startswith("{"):
            return
        ev = json.loads(line)
        if ev.get("event") == "training_started":
            sampler.phase = "train"
        if ev.get("event") == "step" and ev.get("step", 0) >= a.steps:
            (batch / ".stop").write_text("recycle")  # checkpoint and exit 75, as a recycle would

    run = run_child([sys.executable, "-m", "trainerd.worker", str(batch)], env=child_env(a.threads), cwd=REPO,
                    stderr_path=batch / "worker.stderr", stdin_pipe=True, on_line=on_line, on_start=sampler.start)
    sampler.stop()
    (batch / "worker.stdout").write_text("\n".join(run.stdout_lines) + "\n")
    res = json.loads((batch / "result.json").read_text())
    events = {e.get("event"): e for e in json_lines(run.stdout_lines)}
    out = {
        "exit_code": run.exit_code, "status": res.get("status"), "reason": res.get("reason"),
        "steps": res.get("step"), "lines_good": res.get("lines_good"),
        "peak_rss_bytes": run.peak_rss_bytes, "self_reported_peak_rss_bytes": res.get("peak_rss_bytes"),
        "sampled_max_rss_bytes": dict(sampler.max), "wall_s": round(run.wall_s, 2), "cpu_s": round(run.cpu_s, 2),
        "scan_s": (events.get("data_scanned") or {}).get("scan_s"),
        "blocks_per_epoch": (events.get("data_scanned") or {}).get("blocks_per_epoch"),
    }
    if run.exit_code not in (0, 75):
        out["stderr_tail"] = (batch / "worker.stderr").read_text(errors="replace")[-2000:]
    return out


def run_seed(a: argparse.Namespace, model: Path, data: Path, label: str) -> dict[str, Any]:
    d = a.work / f"seed-{label}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    sampler = PhaseSampler()

    def on_line(line: str) -> None:
        if '"data_ready"' in line:
            sampler.phase = "train"

    argv = [sys.executable, str(Path(__file__).resolve()), "--role", "seed", "--data", str(data),
            "--model", str(model), "--steps", str(a.steps), "--seq-len", str(a.seq_len),
            "--micro-batch", str(a.micro_batch), "--threads", str(a.threads)]
    # Any datasets cache goes to this run's folder (and is counted below): none is expected.
    env = child_env(a.threads, HF_DATASETS_CACHE=str(d / "hf-cache"), HF_HOME=str(d / "hf-home"))
    run = run_child(argv, env=env, cwd=REPO, stderr_path=d / "stderr", on_line=on_line, on_start=sampler.start)
    sampler.stop()
    events = {e.get("event"): e for e in json_lines(run.stdout_lines)}
    ready = events.get("data_ready") or {}
    out = {
        "exit_code": run.exit_code, "steps": (events.get("step") or {}).get("step"),
        "peak_rss_bytes": run.peak_rss_bytes, "sampled_max_rss_bytes": dict(sampler.max),
        "rss_after_data_bytes": ready.get("rss_bytes"), "blocks": ready.get("blocks"), "prep_s": ready.get("prep_s"),
        "wall_s": round(run.wall_s, 2), "cpu_s": round(run.cpu_s, 2),
    }
    if run.exit_code != 0:
        out["stderr_tail"] = (d / "stderr").read_text(errors="replace")[-2000:]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--tiny", action="store_true", help="use the tiny random test model (quick smoke run)")
    p.add_argument("--lines", type=int, default=5000, help="N: the small file has N lines, the big one factor x N")
    p.add_argument("--factor", type=int, default=20)
    p.add_argument("--steps", type=int, default=2, help="training steps before the stop (kept small on purpose)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic text")
    p.add_argument("--skip-seed", action="store_true", help="measure the worker only")
    p.add_argument("--work", type=Path, default=REPO / "bench-out" / "memory-work")
    p.add_argument("--out", type=Path, default=REPO / "bench-out" / "memory.json")
    p.add_argument("--role", choices=("seed",), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.role == "seed":
        child_seed(a)
        return 0

    t_start = time.monotonic()
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    model = tiny_model(a.work / "tiny-model") if a.tiny else a.model.resolve()
    if not (model / "config.json").is_file():
        print(f"no model at {model}: run scripts/fetch-model (or use --tiny)", file=sys.stderr)
        return 2
    small, big = a.work / f"data-{a.lines}.jsonl", a.work / f"data-{a.lines * a.factor}.jsonl"
    files = {"N": (small, write_data(small, a.lines, a.seed)),
             f"{a.factor}N": (big, write_data(big, a.lines * a.factor, a.seed))}
    print(f"model {model}  steps {a.steps}  seq {a.seq_len}  micro {a.micro_batch}  threads {a.threads}")
    for label, (path, info) in files.items():
        print(f"  {label:>4}: {info['lines']} lines, {info['bytes'] / 1e6:.1f} MB")
    report: dict[str, Any] = {"benchmark": "memory", "machine": machine_info(), "model": str(model),
                              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                                           if k not in ("role", "data")},
                              "files": {k: v[1] for k, v in files.items()}, "runs": {}}
    # Alternate small/big and worker/seed so drift in the machine's state hits both sizes.
    plan = [("worker", "N"), ("worker", f"{a.factor}N")]
    if not a.skip_seed:
        plan += [("seed", "N"), ("seed", f"{a.factor}N")]
    for who, label in plan:
        path = files[label][0]
        r = (run_worker if who == "worker" else run_seed)(a, model, path, label)
        report["runs"][f"{who} {label}"] = r
        sm = r["sampled_max_rss_bytes"]
        print(f"  {who:<6} {label:>4}: peak RSS {gib(r['peak_rss_bytes'])}  (data phase {gib(sm['data'])}, "
              f"train phase {gib(sm['train'])})  wall {r['wall_s']:.1f} s  exit {r['exit_code']}", flush=True)
        if "stderr_tail" in r:
            print(r["stderr_tail"], file=sys.stderr)
        write_json(a.out, report)

    ratios: dict[str, Any] = {}
    for who in ("worker", "seed"):
        s, b = report["runs"].get(f"{who} N"), report["runs"].get(f"{who} {a.factor}N")
        if s and b and s["peak_rss_bytes"]:
            ratios[who] = {
                "peak_rss": round(b["peak_rss_bytes"] / s["peak_rss_bytes"], 4),
                "peak_rss_delta_bytes": b["peak_rss_bytes"] - s["peak_rss_bytes"],
                "data_phase": round(b["sampled_max_rss_bytes"]["data"] / max(1, s["sampled_max_rss_bytes"]["data"]), 4),
            }
    report["ratios_big_over_small"] = ratios
    report["total_s"] = round(time.monotonic() - t_start, 1)
    write_json(a.out, report)
    print(f"peak RSS ratio {a.factor}N / N:")
    for who, r in ratios.items():
        print(f"  {who:<6} {r['peak_rss']:.4f}x  (+{r['peak_rss_delta_bytes'] / (1 << 20):.1f} MiB)  "
              f"data phase {r['data_phase']:.4f}x")
    if "worker" in ratios:
        w = ratios["worker"]["peak_rss"]
        print(f"target: worker <= 1.03x: {w:.4f}x {'OK' if w <= 1.03 else 'MISSED'}")
    print(f"wrote {a.out}  ({report['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
