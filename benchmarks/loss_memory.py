"""Peak memory of a training step before and after the loss change (no full-vocab logits).

Each contender is its own process running the same LoRA training steps (forward, backward,
clip, AdamW) on the same blocks; only the loss differs:

- ``full``:  transformers' own ``model(input_ids, labels=..., num_items_in_batch=...)`` (all
  micro x seq x vocab logits, upcast to fp32 for the loss): the worker before the change;
- ``fused``: :func:`trainerd.worker.loss.token_loss` (decoder, then lm-head + cross-entropy over
  chunks of rows, each chunk's gradient taken at once): the worker now.

Both at micro-batch 4 and 8, in fp32 and in the bf16 precision the worker uses (autocast, base
Linear weights in bf16, LoRA and AdamW fp32), alternating within each round. Peak RSS is
``ru_maxrss`` from ``wait4`` in the parent; also printed: the median step time (the fused loss
must not be slower) and the first loss (the two losses must agree).

Usage (from the repository root):
    .venv/bin/python benchmarks/loss_memory.py --tiny --steps 2 --rounds 1     # smoke, ~1 min
    .venv/bin/python benchmarks/loss_memory.py                                  # SmolLM2, ~10 min
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    DEFAULT_MODEL,
    REPO,
    child_env,
    gib,
    machine_info,
    median,
    run_child,
    tiny_model,
    write_json,
)


def child(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(a.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainerd.worker.loss import loss_path, token_loss
    from trainerd.worker.model import hold_frozen_linears_in_bf16

    base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    torch.manual_seed(a.seed)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    amp = torch.bfloat16 if a.precision == "bfloat16" else None
    if amp is not None:
        hold_frozen_linears_in_bf16(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(a.seed)
    path = loss_path(model)
    step_s, losses = [], []
    for _ in range(a.steps):
        ids = torch.randint(0, vocab, (a.micro_batch, a.seq_len), generator=g)
        mask = torch.ones_like(ids)
        n_items = int(ids[:, 1:].numel())
        t0 = time.perf_counter()
        if a.loss == "full":
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
                loss = model(input_ids=ids, attention_mask=mask, labels=ids, num_items_in_batch=n_items).loss
        else:
            loss, _ = token_loss(model, ids, mask, ids, divide_by=n_items, autocast_dtype=amp, path=path)
        loss.backward()
        losses.append(loss.item())
        del loss
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
    return {"step_s": step_s, "losses": losses, "loss_path": path.kind}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8])
    p.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--work", type=Path, default=REPO / "bench-out" / "loss-memory-work")
    p.add_argument("--out", type=Path, default=REPO / "bench-out" / "loss_memory.json")
    p.add_argument("--role", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--loss", choices=("full", "fused"), help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--micro-batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.role:
        Path(a.result).write_text(json.dumps(child(a)))
        return 0

    a.work.mkdir(parents=True, exist_ok=True)
    model = tiny_model(a.work / "tiny-model") if a.tiny else a.model.resolve()
    report: dict[str, Any] = {"benchmark": "loss_memory", "machine": machine_info(), "model": str(model),
                              "settings": {k: str(v) for k, v in vars(a).items()}, "rounds": []}
    cases = list(itertools.product(a.precisions, a.micro_batches, ("full", "fused")))
    for rnd in range(1, a.rounds + 1):
        print(f"round {rnd}/{a.rounds}", flush=True)
        got: dict[str, Any] = {}
        for prec, mb, loss in cases:
            res = a.work / f"r{rnd}-{prec}-{mb}-{loss}.json"
            res.unlink(missing_ok=True)
            argv = [sys.executable, str(Path(__file__).resolve()), "--role", "--model", str(model), "--loss", loss,
                    "--precision", prec, "--micro-batch", str(mb), "--seq-len", str(a.seq_len),
                    "--steps", str(a.steps), "--threads", str(a.threads), "--seed", str(a.seed), "--result", str(res)]
            run = run_child(argv, env=child_env(a.threads), cwd=REPO, stderr_path=a.work / "stderr.log")
            rec = json.loads(res.read_text()) if run.exit_code == 0 and res.is_file() else {}
            key = f"{prec} micro {mb} {loss}"
            got[key] = {"peak_rss_bytes": run.peak_rss_bytes, "exit_code": run.exit_code, "wall_s": run.wall_s,
                        "median_step_s": median(rec.get("step_s", [])[1:] or rec.get("step_s", [])),
                        "first_loss": (rec.get("losses") or [None])[0], "loss_path": rec.get("loss_path")}
            r = got[key]
            print(f"  {key:<28} peak RSS {gib(r['peak_rss_bytes'])}  median step {r['median_step_s']:.2f} s  "
                  f"first loss {r['first_loss']}  exit {r['exit_code']}", flush=True)
        report["rounds"].append(got)
        write_json(a.out, report)
    summary: dict[str, Any] = {}
    print("\nmedians over rounds; fused / full paired per round:")
    for prec, mb in itertools.product(a.precisions, a.micro_batches):
        k_full, k_fused = f"{prec} micro {mb} full", f"{prec} micro {mb} fused"
        pairs = [(r[k_fused], r[k_full]) for r in report["rounds"] if r[k_full]["exit_code"] == 0 == r[k_fused]["exit_code"]]
        if not pairs:
            continue
        rss_ratio = median([f["peak_rss_bytes"] / u["peak_rss_bytes"] for f, u in pairs])
        t_ratio = median([f["median_step_s"] / u["median_step_s"] for f, u in pairs])
        full_rss = median([u["peak_rss_bytes"] for _, u in pairs])
        fused_rss = median([f["peak_rss_bytes"] for f, _ in pairs])
        summary[f"{prec} micro {mb}"] = {"full_peak_rss_bytes": full_rss, "fused_peak_rss_bytes": fused_rss,
                                         "rss_ratio_paired": round(rss_ratio, 4), "step_time_ratio_paired": round(t_ratio, 4),
                                         "saved_bytes": full_rss - fused_rss}
        print(f"  {prec:<9} micro {mb}: peak RSS full {gib(full_rss)} -> fused {gib(fused_rss)} "
              f"(x{rss_ratio:.3f}, -{(full_rss - fused_rss) / (1 << 20):.0f} MiB); step time x{t_ratio:.3f}")
    report["summary"] = summary
    write_json(a.out, report)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
