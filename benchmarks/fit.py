"""Each rung of the memory ladder side by side, in one run (issue 19).

For a random Llama (default: issue 19's 0.92 B shape, saved in bf16; built once, cached in /tmp),
the real worker trains a few steps on each rung of an fp32 or bf16 batch (the CPU's own
precision unless --precision) and this prints, per rung: peak RSS (ru_maxrss of the worker,
read by the parent with wait4), the planner's estimate / measured, and tokens/s relative to the
fastest rung (the first of the ladder: what the batch runs when memory is no object).

    nice -n 10 .venv/bin/python benchmarks/fit.py                       # ~10 min on 2 cores
    nice -n 10 .venv/bin/python benchmarks/fit.py --shape small         # 0.14 B, ~3 min
    nice -n 10 .venv/bin/python benchmarks/fit.py --steps 8 --seq-len 256  # the full size

Writes --out (JSON). Says which CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, child_env, run_child, synthetic_lines, write_batch, write_json  # noqa: E402
from trainerd.core.settings import TrainSettings  # noqa: E402
from trainerd.core.ladder import ladder  # noqa: E402
from trainerd.core.planning import expected_precision, read_model_shape  # noqa: E402

SHAPES = {
    "0.92b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=49152),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=49152),
}


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def run_rung(a: argparse.Namespace, model: Path, rung: Any, data: Path, work: Path) -> dict[str, Any]:
    batch = work / f"{rung.weights}-{rung.micro_batch_size}x{rung.grad_accum_steps}-{int(rung.gradient_checkpointing)}"
    shutil.rmtree(batch, ignore_errors=True)
    s = {"root": str(work / "root"), "model": {"path": str(model), "dtype": a.precision, "device": "cpu",
                                              "base_weights": rung.weights},
         "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
         "train": {"seq_len": a.seq_len, "micro_batch_size": rung.micro_batch_size,
                   "grad_accum_steps": rung.grad_accum_steps, "gradient_checkpointing": rung.gradient_checkpointing,
                   "warmup_steps": 0, "checkpoint_every_steps": 0, "checkpoint_every_s": 0, "threads": a.threads},
         "eval": {"max_tokens": 0}, "log": {"file": False, "format": "json"}}
    write_batch(batch, s, data)
    t0 = time.monotonic()
    run = run_child([sys.executable, "-m", "trainerd.worker", str(batch)], env=child_env(a.threads), cwd=REPO,
                    stderr_path=batch / "stderr", stdin_pipe=True, timeout_s=3600)
    res = json.loads((batch / "result.json").read_text()) if (batch / "result.json").is_file() else {}
    peak = run.peak_rss_bytes
    return {"rung": rung.as_dict(), "describe": rung.describe(), "exit_code": run.exit_code,
            "status": res.get("status"), "peak_rss_bytes": peak, "estimate_bytes": rung.estimate_bytes,
            "estimate_over_measured": round(rung.estimate_bytes / peak, 3) if peak else None,
            "tokens_per_s": res.get("tokens_per_s"), "first_loss": res.get("first_loss"),
            "base_weights": res.get("base_weights"), "seconds": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="0.92b")
    p.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/trainerd-fit-bench"))
    p.add_argument("--out", type=Path, default=REPO / "bench-out" / "fit.json")
    a = p.parse_args(argv)
    from trainerd.worker.testing import build_random_model

    a.precision = expected_precision(a.precision, "cpu")
    model = build_random_model(Path("/tmp/trainerd-test-models") / f"llama-{a.shape}-bf16", SHAPES[a.shape])
    shape = read_model_shape(model)
    train = TrainSettings(seq_len=a.seq_len, micro_batch_size=a.micro_batch, grad_accum_steps=a.grad_accum)
    rungs = ladder(shape, train, precision=a.precision)
    a.work.mkdir(parents=True, exist_ok=True)
    data = a.work / "data.jsonl"
    # enough text for ~steps optimizer steps (a block is seq_len tokens; ~1.3 tokens a word)
    n_lines = max(8, a.steps * a.micro_batch * a.grad_accum * a.seq_len // 60 + 4)
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_lines(n_lines, seed=5)))
    report: dict[str, Any] = {"benchmark": "fit", "cpu": cpu_name(), "precision": a.precision, "shape": a.shape,
                              "params": shape["params"], "seq_len": a.seq_len, "rungs": []}
    for r in rungs:
        print(f"== {r.describe()}", flush=True)
        report["rungs"].append(run_rung(a, model, r, data, a.work))
        write_json(a.out, report)
    base = report["rungs"][0].get("tokens_per_s") or 0
    print(f"\n{report['cpu']}, {a.precision} batch, {shape['params'] / 1e9:.2f} B params, seq {a.seq_len}")
    print(f"{'rung':<58} {'peak RSS':>10} {'est/meas':>9} {'tok/s':>7} {'vs fastest':>10}")
    for x in report["rungs"]:
        tps = x.get("tokens_per_s") or 0
        x["relative_speed"] = round(tps / base, 3) if base and tps else None
        print(f"{x['describe']:<58} {(x['peak_rss_bytes'] or 0) / (1 << 30):9.2f}G {x['estimate_over_measured'] or 0:9.2f} "
              f"{tps:7.1f} {x['relative_speed'] or 0:10.2f}  exit {x['exit_code']}")
    write_json(a.out, report)
    print(f"wrote {a.out}")
    return 0 if all(x["exit_code"] == 0 for x in report["rungs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
