"""The GPU check (issue 12): speed against the machine's peak, and a real CUDA OOM backed off.

Run through ``benchmarks/gpu_check.sh`` (it installs carried wheels first). On one H200 it
finishes in about 6 minutes; ``--dry-run`` does every part on the CPU with tiny models in
about 2 minutes, so the script works the first time it meets a GPU.

1. The machine: torch, CUDA, the GPU, bf16 support.
2. Two models built from a config with random weights (no download; throughput does not need
   trained weights) and the tiny offline tokenizer: the SmolLM2-135M shape and a ~1.2B Llama
   shape (Llama-3.2-1B's: hidden 2048, 16 layers, 32/8 heads, MLP 8192, vocab 128256, tied).
3. For each: ``benchmarks/throughput.py --device cuda --precisions best`` (the bf16 matmul peak
   of the same run, then worker, plain loop and HF Trainer in bf16): tokens/s, model FLOPs/s,
   MFU, peak GPU memory.
5. (issue 19) QLoRA vs LoRA: an 8B-shaped random Llama (Llama-3.1-8B's shape), the worker with
   its base in bf16 (LoRA) and in 4-bit NF4 (QLoRA, bitsandbytes: carry its wheel, see
   gpu_wheels.sh): peak GPU memory and tokens/s of each, beside torchtune's published 16.2 GiB /
   7.4 GiB (Llama-3.1-8B LoRA / QLoRA on one RTX 4090). Skipped, saying why, without bitsandbytes.
4. A real CUDA out-of-memory: the worker on the 1.2B shape with a micro-batch far too large
   for 141 GB; it must back off (halving, same step, same tokens) until a step fits, and the
   adapter after that step must match, within bf16 tolerance, a run started directly at the
   micro-batch it ended on (same effective batch). Its peak GPU memory is printed.

Writes ``--out`` (JSON) and prints one summary at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, child_env, gib, json_lines, run_child, write_batch, write_json  # noqa: E402

SHAPES = {
    # name: LlamaConfig fields (vocab is the model's; the tokenizer only uses its first ids)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
# Llama-3.1-8B's shape (vocab 128256, untied), for the QLoRA check: only built when that part runs.
QLORA_SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
DRY_QLORA_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False)
DRY_SHAPES = {
    "smollm2-135m": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True),
}


def build_model(dest: Path, shape: dict[str, Any]) -> Path:
    """A Llama with random weights and ``shape``, saved in bf16 (as most checkpoints are; the worker
    loads it as its layout keeps it), with the tiny test tokenizer; on the GPU where there is one."""
    from trainerd.worker.testing import build_random_model

    return build_random_model(dest, shape)


def env_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    for pkg in ("transformers", "peft", "accelerate", "structlog", "bitsandbytes"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception as e:  # noqa: BLE001 - report what is missing, do not stop here
            info[pkg] = f"missing: {e}"
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported(),
                    memory_bytes=torch.cuda.get_device_properties(0).total_memory)
    return info


def throughput(a: argparse.Namespace, name: str, model: Path, work: Path) -> dict[str, Any]:
    p = a.plan[name]
    out = work / f"throughput-{name}.json"
    argv = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--model", str(model), "--device", a.device,
            "--precisions", "best", "--steps", str(p["steps"]), "--rounds", "1", "--seq-len", str(p["seq"]),
            "--micro-batch", str(p["micro"]), "--warmup-steps", "2", "--threads", str(a.threads),
            "--work", str(work / f"tp-{name}"), "--out", str(out)]
    if a.device == "cpu":
        argv += ["--matmul-n", "256"]
    t0 = time.monotonic()
    rc = subprocess.call(argv, cwd=REPO, env=child_env(a.threads))
    rep = json.loads(out.read_text()) if out.is_file() else {}
    rnd = (rep.get("rounds") or [{}])[0]
    got = {"exit_code": rc, "seconds": round(time.monotonic() - t0, 1), "matmul": rnd.get("matmul"),
           "seq_len": p["seq"], "micro_batch": p["micro"], "model_flops_per_token": rep.get("model_flops_per_token")}
    for c in ("worker-best", "plain-best", "hf-best"):
        r = rnd.get(c) or {}
        got[c] = {k: r.get(k) for k in ("tps", "tps_steady", "mfu", "model_flops_s", "cuda_peak_bytes", "precision",
                                        "peak_rss_bytes", "first_loss", "last_loss", "exit_code")}
    return got


def _worker(batch: Path, a: argparse.Namespace, env_extra: dict[str, str]) -> tuple[int, dict[str, Any], list[dict]]:
    run = run_child([sys.executable, "-m", "trainerd.worker", str(batch)], env=child_env(a.threads, **env_extra),
                    cwd=REPO, stderr_path=batch / "worker.stderr", stdin_pipe=True, timeout_s=a.oom_timeout_s)
    try:
        res = json.loads((batch / "result.json").read_text())
    except (OSError, ValueError):
        res = {}
    return run.exit_code, res, json_lines(run.stdout_lines)


def _data(path: Path, model: Path, n_tokens: int) -> None:
    """Lines of pseudo-English: enough text for ``n_tokens`` with the tiny tokenizer."""
    from benchmarks.common import iter_synthetic_lines
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    total = 0
    with open(path, "w", encoding="utf-8") as f:
        for text in iter_synthetic_lines(10**9, seed=7):
            f.write(json.dumps({"text": text}) + "\n")
            total += len(tok(text, add_special_tokens=False)["input_ids"]) + 1
            if total >= n_tokens:
                break


def oom_check(a: argparse.Namespace, model: Path, work: Path) -> dict[str, Any]:
    """Oversized micro-batch -> real CUDA OOMs -> back-off to micro m; compare with a run at m."""
    import torch
    from safetensors.torch import load_file

    p = a.plan["oom"]
    seq, big, steps = p["seq"], p["micro"], p["steps"]
    data = work / "oom-data.jsonl"
    _data(data, model, big * seq * steps)
    (work / "root").mkdir(exist_ok=True)

    def settings(micro: int, accum: int) -> dict[str, Any]:
        from benchmarks.common import worker_settings

        s = worker_settings(root=work / "root", model=model, seq_len=seq, micro_batch=micro, grad_accum=accum,
                            threads=a.threads, seed=1234, lr=2e-4, warmup_steps=1, max_grad_norm=1.0, lora_r=8,
                            lora_alpha=16, lora_dropout=0.0, targets=["q_proj", "v_proj"], dtype="auto",
                            device=a.device)
        s["train"]["epochs"] = 1
        return s

    fault = {} if a.device == "cuda" else {"TRAINERD_FAULT": f"oom_above_micro:{p['fake_fit']}"}
    big_dir = work / "oom-big"
    shutil.rmtree(big_dir, ignore_errors=True)
    write_batch(big_dir, settings(big, 1), data)
    t0 = time.monotonic()
    rc, res, logs = _worker(big_dir, a, fault)
    backoffs = [(e["micro_batch_size_was"], e["micro_batch_size"]) for e in logs if e.get("event") == "cuda_oom_backoff"]
    out: dict[str, Any] = {"micro_batch_asked": big, "seq_len": seq, "exit_code": rc, "backoffs": backoffs,
                           "seconds": round(time.monotonic() - t0, 1), "status": res.get("status"),
                           "reason": res.get("reason"), "cuda_peak_bytes": res.get("cuda_peak_allocated_bytes"),
                           "precision": res.get("precision"), "last_loss": res.get("last_loss"),
                           "real_oom": a.device == "cuda"}
    if rc != 0 or not backoffs:
        out["ok"] = False
        out["stderr_tail"] = (big_dir / "worker.stderr").read_text(errors="replace")[-3000:]
        return out
    m = res["micro_batch_size"]
    ref_dir = work / "oom-ref"
    shutil.rmtree(ref_dir, ignore_errors=True)
    write_batch(ref_dir, settings(m, big // m), data)
    rc2, ref, _ = _worker(ref_dir, a, {})
    out.update(reference_micro_batch=m, reference_exit_code=rc2, reference_last_loss=ref.get("last_loss"),
               reference_cuda_peak_bytes=ref.get("cuda_peak_allocated_bytes"))
    if rc2 != 0:
        out["ok"] = False
        return out
    wa = load_file(str(big_dir / "final_adapter" / "adapter_model.safetensors"))
    wb = load_file(str(ref_dir / "final_adapter" / "adapter_model.safetensors"))
    rel = max(((wa[k].float() - wb[k].float()).norm() / wb[k].float().norm().clamp_min(1e-12)).item() for k in wb)
    loss_rel = abs(res["last_loss"] - ref["last_loss"]) / abs(ref["last_loss"])
    # Same tokens, same split after the back-off: equal up to CUDA's non-deterministic reductions.
    out.update(adapter_max_rel_diff=rel, loss_rel_diff=loss_rel, ok=loss_rel <= 1e-2 and rel <= 2e-2)
    del torch
    return out


def qlora_check(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The same batch on an 8B-shaped model with the base in bf16 (LoRA) and in NF4 (QLoRA)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "bitsandbytes is not installed (benchmarks/gpu_wheels.sh fetches its wheel into .whl/)"}
    from benchmarks.common import worker_settings

    p = a.plan["qlora"]
    model = build_model(work / "model-llama-8b", DRY_QLORA_SHAPE if a.dry_run else QLORA_SHAPE)
    data = work / "qlora-data.jsonl"
    _data(data, model, p["micro"] * p["seq"] * p["steps"])
    out: dict[str, Any] = {"seq_len": p["seq"], "micro_batch": p["micro"], "steps": p["steps"],
                           "torchtune_gib": {"bfloat16": 16.2, "nf4": 7.4}}
    for layout in ("bfloat16", "nf4"):
        batch = work / f"qlora-{layout}"
        shutil.rmtree(batch, ignore_errors=True)
        s = worker_settings(root=work / "root", model=model, seq_len=p["seq"], micro_batch=p["micro"], grad_accum=1,
                            threads=a.threads, seed=1234, lr=2e-4, warmup_steps=0, max_grad_norm=1.0, lora_r=8,
                            lora_alpha=16, lora_dropout=0.0, targets=["q_proj", "v_proj"], dtype="bfloat16",
                            device=a.device)
        s["model"]["base_weights"] = layout
        s["train"]["gradient_checkpointing"] = True  # as torchtune's recipes run
        s["eval"] = {"max_tokens": 0}
        write_batch(batch, s, data)
        rc, res, _ = _worker(batch, a, {})
        out[layout] = {"exit_code": rc, "status": res.get("status"), "base_weights": res.get("base_weights"),
                       "tokens_per_s": res.get("tokens_per_s"), "cuda_peak_bytes": res.get("cuda_peak_allocated_bytes"),
                       "peak_rss_bytes": res.get("peak_rss_bytes"), "last_loss": res.get("last_loss")}
        if rc != 0:
            out[layout]["stderr_tail"] = (batch / "worker.stderr").read_text(errors="replace")[-2000:]
    out["ok"] = all(out[x]["exit_code"] == 0 and out[x]["base_weights"] == x for x in ("bfloat16", "nf4"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, injected OOM: check the script itself")
    p.add_argument("--work", type=Path, default=Path("/tmp/trainerd-gpu-check"))
    p.add_argument("--out", type=Path, default=REPO / "bench-out" / "gpu_check.json")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--skip", nargs="*", default=[], choices=("smollm2-135m", "llama-1b", "oom", "qlora"))
    a = p.parse_args(argv)
    a.device = "cpu" if a.dry_run else "cuda"
    a.oom_timeout_s = 240.0
    if a.dry_run:
        a.plan = {"smollm2-135m": dict(seq=64, micro=4, steps=3), "llama-1b": dict(seq=64, micro=4, steps=3),
                  "oom": dict(seq=64, micro=8, steps=1, fake_fit=2), "qlora": dict(seq=64, micro=2, steps=2)}
    else:
        # Sized for ~6 min on one H200: ~0.3-2 s a step, a few hundred thousand tokens each.
        a.plan = {"smollm2-135m": dict(seq=2048, micro=16, steps=10), "llama-1b": dict(seq=2048, micro=8, steps=8),
                  # 64 x 2048 tokens of a 1.2B model need ~200 GB of activations: OOM, then 32, 16...
                  "oom": dict(seq=2048, micro=64, steps=1, fake_fit=0),
                  # Llama-3.1-8B at seq 2048 x micro 2, checkpointing: ~1-2 s a step on one H100
                  "qlora": dict(seq=2048, micro=2, steps=4)}
    t0 = time.monotonic()
    a.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"benchmark": "gpu_check", "dry_run": a.dry_run, "env": env_info(), "plan": a.plan}
    print(json.dumps(report["env"]), flush=True)
    if not a.dry_run and not report["env"]["cuda_available"]:
        print("no CUDA device: run with --dry-run on a CPU machine", file=sys.stderr)
        return 2
    shapes = DRY_SHAPES if a.dry_run else SHAPES
    models = {}
    for name, shape in shapes.items():
        t = time.monotonic()
        models[name] = build_model(a.work / f"model-{name}", shape)
        print(f"built {name} in {time.monotonic() - t:.1f} s", flush=True)
    for name in ("smollm2-135m", "llama-1b"):
        if name in a.skip:
            continue
        print(f"== throughput {name}", flush=True)
        report[name] = throughput(a, name, models[name], a.work)
        write_json(a.out, report)
    if "oom" not in a.skip:
        print("== CUDA out-of-memory back-off" + (" (injected: dry run)" if a.dry_run else ""), flush=True)
        report["oom"] = oom_check(a, models["llama-1b"], a.work)
        write_json(a.out, report)
    if "qlora" not in a.skip:
        print("== QLoRA vs LoRA on an 8B shape (issue 19)", flush=True)
        report["qlora"] = qlora_check(a, a.work)
        write_json(a.out, report)
    report["total_s"] = round(time.monotonic() - t0, 1)
    write_json(a.out, report)

    print(f"\n== summary ({report['total_s']} s){'  DRY RUN: figures mean nothing' if a.dry_run else ''}")
    env = report["env"]
    print(f"torch {env['torch']}  transformers {env.get('transformers')}  peft {env.get('peft')}  "
          f"GPU {env.get('gpu', 'none')}")
    ok = True
    for name in ("smollm2-135m", "llama-1b"):
        r = report.get(name)
        if not r:
            continue
        mm = (r.get("matmul") or {}).get("peak_gflops", {})
        print(f"{name}: seq {r['seq_len']} x micro {r['micro_batch']}, bf16 matmul peak {mm.get('bf16', 0) / 1e3:.1f} "
              f"TFLOP/s, {(r.get('model_flops_per_token') or 0) / 1e9:.2f} GFLOP/token")
        for c in ("worker-best", "plain-best", "hf-best"):
            x = r[c]
            ok &= x.get("exit_code") == 0
            tps, mfu = x.get("tps") or float("nan"), x.get("mfu") or float("nan")
            peak = x.get("cuda_peak_bytes")
            print(f"  {c:<11} {tps:10.0f} tokens/s  MFU {100 * mfu:5.1f}%  GPU peak {gib(peak) if peak else '-'}  "
                  f"[{x.get('precision')}] exit {x.get('exit_code')}")
        w, others = r["worker-best"].get("tps"), [r[c].get("tps") for c in ("plain-best", "hf-best")]
        if w and all(others):
            print(f"  worker / fastest peer: {w / max(others):.3f}x")
    o = report.get("oom")
    if o:
        ok &= bool(o.get("ok"))
        print(f"OOM: asked micro {o['micro_batch_asked']} x seq {o['seq_len']}, back-offs {o['backoffs']} "
              f"({'real CUDA OOM' if o['real_oom'] else 'injected'}), exit {o['exit_code']}, "
              f"GPU peak {gib(o['cuda_peak_bytes']) if o.get('cuda_peak_bytes') else '-'}; vs a run at micro "
              f"{o.get('reference_micro_batch')}: loss rel diff {o.get('loss_rel_diff')}, adapter max rel diff "
              f"{o.get('adapter_max_rel_diff')} -> {'OK' if o.get('ok') else 'FAILED'}")
    q = report.get("qlora")
    if q and "skipped" in q:
        print(f"QLoRA: skipped: {q['skipped']}")
    elif q:
        ok &= bool(q.get("ok"))
        for layout in ("bfloat16", "nf4"):
            x = q[layout]
            peak = x.get("cuda_peak_bytes")
            print(f"QLoRA check {layout:<8}: {x.get('tokens_per_s') or 0:8.0f} tokens/s, GPU peak "
                  f"{gib(peak) if peak else '-'} (torchtune: {q['torchtune_gib'][layout]} GiB), exit {x['exit_code']}")
    print(f"wrote {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
