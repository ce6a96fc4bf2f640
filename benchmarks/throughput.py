"""Throughput benchmark: the trainerd worker against a plain PyTorch+peft loop and HF Trainer.

One session, contenders alternating (worker, plain, hf, worker, plain, hf, ...) so machine
noise lands on all of them alike. Every contender is a separate process started the same way,
on the same model, the same token blocks, the same LoRA/optimizer settings, the same seed and
the same thread count, for the same number of optimizer steps:

- worker: ``python -m trainerd.worker BATCH_DIR`` exactly as the supervisor runs it (stdin a
  pipe held open, settings.json, data.jsonl). It tokenizes and packs the JSONL itself.
- plain:  a minimal loop over pre-tokenized packed blocks: forward with labels, backward,
  clip, AdamW step, LR schedule, zero_grad.
- hf:     ``transformers.Trainer`` over the same pre-tokenized blocks, sequential sampling.

The data file is built so that it packs into exactly ``steps x micro x accum`` full blocks:
the worker's own packing and the blocks handed to the other two are the same tokens in the
same order (the first loss, taken before any update, must agree; it is printed as a check).

What is timed (tokens/s) is the same span in all three: one optimizer step from just before
the first forward to just after zero_grad (worker: its ``result.json`` ``tokens_per_s``, which
counts step time only; plain: the same span with ``perf_counter``; hf: ``on_step_begin`` to
``on_step_end``). Data fetching, logging, progress files and checkpoints are outside it.
``tps`` INCLUDES the first (warm-up) step in all three; ``tps_steady`` excludes it in all
three (for the worker, derived from the cumulative tokens/s in its per-step log lines);
``tps_mstep`` is tokens per step over the median time of steps 2..N, the figure least moved by
bursts of load from other processes on a shared machine. Peak RSS is ``ru_maxrss`` of each
child from ``wait4``; wall time is process start to exit.

Usage (from the repository root):
    .venv/bin/python benchmarks/throughput.py --tiny --steps 5 --rounds 2      # smoke, ~1 min
    .venv/bin/python benchmarks/throughput.py --steps 20 --rounds 3            # the real one
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    DEFAULT_MODEL,
    REPO,
    child_env,
    cpu_bf16_features,
    model_flops_per_token,
    gib,
    iter_synthetic_lines,
    json_lines,
    machine_info,
    median,
    run_child,
    spread,
    tiny_model,
    worker_settings,
    write_batch,
    write_json,
)
from trainerd.core.planning import read_model_shape  # noqa: E402

CONTENDERS = ("worker", "plain", "hf")
# --cross: the headline pair run step by step in one lock-step group, with the plain
# loop's own bf16 beside them: worker (auto) vs the fp32 plain loop.
CROSS = [("worker", "best"), ("plain", "fp32"), ("plain", "best")]
IGNORE_INDEX = -100


# --- data -------------------------------------------------------------------------------


def build_data(model: Path, work: Path, *, n_blocks: int, seq_len: int, seed: int,
               text: str = "synthetic") -> dict[str, Any]:
    """Write ``work/data.jsonl`` ({"text": ...} lines) whose tokens (+1 eos per line, as the
    worker renders them) fill exactly ``n_blocks`` blocks of ``seq_len``, and ``work/blocks.pt``
    holding those blocks as tensors for the plain loop and HF Trainer."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    eos = tok.eos_token_id
    target = n_blocks * seq_len

    def ntok(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False)["input_ids"]

    lines: list[str] = []
    ids: list[int] = []
    gen = iter(real_text_lines()) if text == "real" else iter_synthetic_lines(10**9, seed=seed)
    done = False
    while not done:
        batch = [next(gen) for _ in range(64)]
        for text, t in zip(batch, ntok(batch)):
            if len(ids) + len(t) + 1 > target - 2:
                done = True
                break
            lines.append(text)
            ids.extend(t)
            ids.append(eos)
    # One filler line makes the total exact (>= 2 tokens: at least one word plus its eos).
    need = target - len(ids) - 1
    filler = _filler(tok, need)
    lines.append(filler)
    ids.extend(ntok([filler])[0])
    ids.append(eos)
    if len(ids) != target:
        raise RuntimeError(f"data build: {len(ids)} tokens, wanted {target}")
    with open(work / "data.jsonl", "w", encoding="utf-8") as f:
        for text in lines:
            f.write(json.dumps({"text": text}) + "\n")
    t = torch.tensor(ids, dtype=torch.long).view(n_blocks, seq_len)
    # Plain causal-LM blocks: every token is trained on (the worker's "text" format does the same).
    torch.save({"input_ids": t, "labels": t.clone(), "attention_mask": torch.ones_like(t)}, work / "blocks.pt")
    return {"lines": len(lines), "tokens": len(ids), "blocks": n_blocks, "bytes": (work / "data.jsonl").stat().st_size}


def _filler(tok: Any, need: int) -> str:
    """A text that tokenizes to exactly ``need`` tokens (``need`` >= 1)."""
    for word in ("the", "a", "x", "model", "data"):
        base = [word] * need
        for k in range(need, 0, -1):
            text = " ".join(base[:k])
            n = len(tok(text, add_special_tokens=False)["input_ids"])
            if n == need:
                return text
            if n < need:
                break
    raise RuntimeError(f"cannot build a filler line of exactly {need} tokens")


# --- the contenders, as children of this file --------------------------------------------


def _step_line(step: int) -> None:
    """One JSON line per finished step on stdout (outside the timed span), as the worker logs
    one: the lock-step mode of the parent paces every contender by these lines."""
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = 0
    print(json.dumps({"event": "step", "step": step, "rss_bytes": rss}), flush=True)


def _child_common(a: argparse.Namespace):
    """Model + LoRA as every user of transformers/peft writes it: the fp32 base in both
    precisions (bf16 = autocast around it, which is what ``Trainer(bf16=True)`` does too)."""
    import torch

    torch.set_num_threads(a.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    blocks = torch.load(a.blocks, weights_only=True)
    base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    torch.manual_seed(a.seed)  # as the worker: seed, then wrap (LoRA A init draws from it)
    cfg = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                     target_modules=list(a.targets), task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    model.train()
    if a.device == "cuda":
        model.to("cuda")
        blocks = {k: v.to("cuda") for k, v in blocks.items()}
    return torch, blocks, model, time.perf_counter() - t0


def _sync(torch: Any, a: argparse.Namespace) -> None:
    """Wait for the GPU before reading a clock (a no-op on CPU)."""
    if a.device == "cuda":
        torch.cuda.synchronize()


def _cuda_peak(torch: Any, a: argparse.Namespace) -> int | None:
    return int(torch.cuda.max_memory_allocated()) if a.device == "cuda" else None


def child_plain(a: argparse.Namespace) -> dict[str, Any]:
    torch, blocks, model, load_s = _child_common(a)
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, min(a.warmup_steps, a.steps // 2), a.steps)
    torch.manual_seed(a.seed)
    eff = a.micro_batch * a.grad_accum
    ids_all, labels_all, mask_all = blocks["input_ids"], blocks["labels"], blocks["attention_mask"]
    bf16 = a.precision == "bf16"
    step_s, losses, step_tokens = [], [], []
    for step in range(a.steps):
        sl = slice(step * eff, (step + 1) * eff)
        ids, labels, mask = ids_all[sl], labels_all[sl], mask_all[sl]
        n_items = int((labels[:, 1:] != IGNORE_INDEX).sum())
        _sync(torch, a)
        t0 = time.perf_counter()
        total = 0.0
        for start in range(0, ids.shape[0], a.micro_batch):
            ms = slice(start, start + a.micro_batch)
            # Keep only the loss: holding the whole output would keep this step's logits
            # (micro x seq x vocab fp32, ~200 MB here) alive through backward (the peak).
            with torch.autocast(a.device, dtype=torch.bfloat16, enabled=bf16):
                out = model(input_ids=ids[ms], attention_mask=mask[ms], labels=labels[ms],
                            num_items_in_batch=n_items)
            loss = out.loss
            if not a.hold_output:
                del out
            loss.backward()
            total += loss.item()
            del loss
            if a.hold_output:
                del out
        if a.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        _sync(torch, a)
        step_s.append(time.perf_counter() - t0)
        losses.append(total)
        step_tokens.append(int(mask.sum()))
        _step_line(step + 1)
    return {"step_s": step_s, "losses": losses, "step_tokens": step_tokens, "load_s": load_s,
            "cuda_peak_bytes": _cuda_peak(torch, a)}


def child_hf(a: argparse.Namespace) -> dict[str, Any]:
    torch, blocks, model, load_s = _child_common(a)
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return blocks["input_ids"].shape[0]

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {k: v[i] for k, v in blocks.items()}

    rec: dict[str, Any] = {"step_s": [], "losses": [], "step_tokens": [], "load_s": load_s}

    class StepTimer(TrainerCallback):
        # on_step_begin fires after the step's batches were fetched, on_step_end after
        # zero_grad: the same span the worker and the plain loop time.
        def on_step_begin(self, args, state, control, **kw):
            _sync(torch, a)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(torch, a)
            rec["step_s"].append(time.perf_counter() - self.t0)
            rec["step_tokens"].append(a.micro_batch * a.grad_accum * a.seq_len)
            _step_line(state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                rec["losses"].append(float(logs["loss"]))

    out_dir = Path(a.result).with_suffix(".hf-out")
    kw = dict(
        output_dir=str(out_dir), per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=a.grad_accum, max_steps=a.steps, learning_rate=a.lr,
        weight_decay=0.0, warmup_steps=min(a.warmup_steps, a.steps // 2), lr_scheduler_type="linear",
        max_grad_norm=a.max_grad_norm,
        optim="adamw_torch",  # torch.optim.AdamW, as the worker and the plain loop (HF's default is the fused one)
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=a.device == "cpu", seed=a.seed,
        data_seed=a.seed, bf16=a.precision == "bf16",
        dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True,
        remove_unused_columns=False, train_sampling_strategy="sequential",
    )
    try:
        args = TrainingArguments(**kw)
    except TypeError:  # an older transformers (the GPU machine's 5.17) may lack the sampler switch
        kw.pop("train_sampling_strategy")
        args = TrainingArguments(**kw)
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(), data_collator=default_data_collator,
                      callbacks=[StepTimer()])
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    rec["cuda_peak_bytes"] = _cuda_peak(torch, a)
    return rec


def child_matmul(a: argparse.Namespace) -> dict[str, Any]:
    """The machine's matmul peak in each precision, fp32 and bf16 alternating: GFLOP/s of an
    n x n x n matmul, the best of ``reps`` timed batches (a peak is a maximum)."""
    import torch

    torch.set_num_threads(a.threads)
    n = a.matmul_n
    out: dict[str, list[float]] = {"fp32": [], "bf16": []}
    mats = {k: (torch.randn(n, n, device=a.device).to(dt), torch.randn(n, n, device=a.device).to(dt))
            for k, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    for k, (x, y) in mats.items():  # warm-up: oneDNN/cuBLAS pick (and JIT) their kernels on first use
        for _ in range(3):
            torch.mm(x, y)
    _sync(torch, a)
    for _ in range(a.matmul_reps):
        for k, (x, y) in mats.items():
            reps, t0 = 0, time.perf_counter()
            while True:
                torch.mm(x, y)
                reps += 1
                _sync(torch, a)
                dt = time.perf_counter() - t0
                if dt > 0.5:
                    break
            out[k].append(2 * n**3 * reps / dt / 1e9)
    return {"n": n, "gflops": out, "peak_gflops": {k: max(v) for k, v in out.items()}}


# --- the parent ---------------------------------------------------------------------------


def _shared_child_args(a: argparse.Namespace, model: Path, precision: str = "fp32") -> list[str]:
    return ["--model", str(model), "--device", a.device, "--precision", precision, "--steps", str(a.steps), "--seq-len", str(a.seq_len),
            "--micro-batch", str(a.micro_batch), "--grad-accum", str(a.grad_accum), "--threads", str(a.threads),
            "--seed", str(a.seed), "--lr", str(a.lr), "--warmup-steps", str(a.warmup_steps),
            "--max-grad-norm", str(a.max_grad_norm), "--lora-r", str(a.lora_r), "--lora-alpha", str(a.lora_alpha),
            "--lora-dropout", str(a.lora_dropout), "--targets", *a.targets]


def _rates(step_s: list[float], step_tokens: list[int]) -> dict[str, float]:
    """tokens/s three ways from per-step times: over all steps (``tps``), over steps 2..N
    (``tps_steady``), and tokens per step over the median time of steps 2..N (``tps_mstep``:
    robust to bursts of load from other processes on a shared machine)."""
    nan = float("nan")
    out = {"tps": sum(step_tokens) / sum(step_s) if step_s and sum(step_s) > 0 else nan,
           "tps_steady": nan, "tps_mstep": nan, "tps_best": nan}
    if len(step_s) > 1 and sum(step_s[1:]) > 0:
        out["tps_steady"] = sum(step_tokens[1:]) / sum(step_s[1:])
        m = median(step_s[1:])
        if m > 0:
            out["tps_mstep"] = median(step_tokens[1:]) / m
        # The fastest step is the one least disturbed by other processes: on a busy machine
        # the closest thing to the quiet-machine speed.
        out["tps_best"] = max(t / s_ for t, s_ in zip(step_tokens[1:], step_s[1:]) if s_ > 0)
    return out


def _worker_settings(a: argparse.Namespace, model: Path, work: Path, precision: str = "fp32") -> dict[str, Any]:
    """fp32 forced, or ``best``: the worker's own ``model.dtype: auto``; ``--compile``: train.compile."""
    (work / "root").mkdir(exist_ok=True)
    s = worker_settings(root=work / "root", model=model, seq_len=a.seq_len, micro_batch=a.micro_batch,
                           grad_accum=a.grad_accum, threads=a.threads, seed=a.seed, lr=a.lr,
                           warmup_steps=a.warmup_steps, max_grad_norm=a.max_grad_norm, lora_r=a.lora_r,
                           lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, targets=a.targets,
                           dtype="float32" if precision == "fp32" else "auto", device=a.device)
    s["train"]["compile"] = bool(a.compile)
    return s


def run_worker(a: argparse.Namespace, model: Path, work: Path, rnd: int, precision: str = "fp32") -> dict[str, Any]:
    batch = work / f"round{rnd}" / f"worker-{precision}"
    shutil.rmtree(batch, ignore_errors=True)
    write_batch(batch, _worker_settings(a, model, work, precision), work / "data.jsonl")
    run = run_child([sys.executable, "-m", "trainerd.worker", str(batch)], env=child_env(a.threads), cwd=REPO,
                    stderr_path=batch / "worker.stderr", stdin_pipe=True)
    res = json.loads((batch / "result.json").read_text())
    events = json_lines(run.stdout_lines)
    # Per-step training time from the cumulative figures the worker logs after every step:
    # time_k = tokens_k / tokens_per_s_k (tokens/s is rounded to 0.1: error < 0.1% of a step).
    cum = [(e["tokens"], e["tokens_per_s"]) for e in events if e.get("event") == "step"]
    t_cum = [tok / tps if tps else 0.0 for tok, tps in cum]
    step_s = [t_cum[0]] + [t_cum[i] - t_cum[i - 1] for i in range(1, len(t_cum))] if t_cum else []
    step_tokens = [cum[0][0]] + [cum[i][0] - cum[i - 1][0] for i in range(1, len(cum))] if cum else []
    rates = _rates(step_s, step_tokens)
    # Cross-check at microsecond precision: the interval between consecutive step log lines is
    # the step plus the worker's between-step work (fetching blocks, progress file, stop check).
    stamps = [datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
              for e in events if e.get("event") == "step" and "timestamp" in e]
    intervals = [b - a_ for a_, b in zip(stamps, stamps[1:])]
    (batch / "worker.stdout").write_text("\n".join(run.stdout_lines) + "\n")
    ev = {e.get("event"): e for e in events}
    out = {
        "exit_code": run.exit_code, "status": res.get("status"),
        "tps": float(res.get("tokens_per_s") or 0.0),  # straight from result.json (step time only)
        "tps_steady": rates["tps_steady"], "tps_mstep": rates["tps_mstep"], "tps_best": rates["tps_best"],
        "tps_derived_all": rates["tps"],
        "median_step_interval_s": median(intervals) if intervals else None,
        "steps": res.get("step"), "tokens": res.get("tokens"),
        "first_loss": res.get("first_loss"), "last_loss": res.get("last_loss"),
        "peak_rss_bytes": run.peak_rss_bytes, "self_reported_peak_rss_bytes": res.get("peak_rss_bytes"),
        "wall_s": run.wall_s, "cpu_s": run.cpu_s, "train_s": sum(step_s),
        "load_s": (ev.get("model_loaded") or {}).get("load_s"), "scan_s": (ev.get("data_scanned") or {}).get("scan_s"),
        "precision": res.get("precision"), "min_flt": run.min_flt,
        "cuda_peak_bytes": res.get("cuda_peak_allocated_bytes"),
        "step_s": step_s, "loadavg_before": run.loadavg_before,
    }
    if run.exit_code != 0:
        out["stderr_tail"] = (batch / "worker.stderr").read_text(errors="replace")[-2000:]
    return out


def run_baseline(role: str, a: argparse.Namespace, model: Path, work: Path, rnd: int,
                 precision: str = "fp32") -> dict[str, Any]:
    d = work / f"round{rnd}"
    d.mkdir(parents=True, exist_ok=True)
    result = d / f"{role}-{precision}.json"
    result.unlink(missing_ok=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--blocks", str(work / "blocks.pt"),
            "--result", str(result), *_shared_child_args(a, model, _baseline_precision(precision))]
    run = run_child(argv, env=child_env(a.threads), cwd=REPO, stderr_path=d / f"{role}-{precision}.stderr")
    out: dict[str, Any] = {"exit_code": run.exit_code, "peak_rss_bytes": run.peak_rss_bytes, "wall_s": run.wall_s,
                           "cpu_s": run.cpu_s, "loadavg_before": run.loadavg_before, "min_flt": run.min_flt,
                           "precision": "float32" if _baseline_precision(precision) == "fp32" else "bfloat16"}
    if run.exit_code != 0 or not result.is_file():
        out["stderr_tail"] = (d / f"{role}.stderr").read_text(errors="replace")[-2000:]
        out.update(tps=float("nan"), tps_steady=float("nan"), tps_mstep=float("nan"))
        return out
    rec = json.loads(result.read_text())
    out.update(**_rates(rec["step_s"], rec["step_tokens"]), steps=len(rec["step_s"]), tokens=sum(rec["step_tokens"]),
               first_loss=rec["losses"][0] if rec["losses"] else None,
               last_loss=rec["losses"][-1] if rec["losses"] else None,
               train_s=sum(rec["step_s"]), load_s=rec["load_s"], step_s=rec["step_s"],
               cuda_peak_bytes=rec.get("cuda_peak_bytes"))
    return out


# --- lock-step mode -----------------------------------------------------------------------


class Paced:
    """A contender process run one optimizer step at a time: SIGCONT, wait for its step line,
    SIGSTOP. The reader thread stops the child itself, the moment the line arrives, so the
    child gets as little as possible of its next step done before it is frozen."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], stderr_path: Path, stdin_pipe: bool):
        self.name = name
        self.err = open(stderr_path, "ab")
        self.proc = subprocess.Popen(argv, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=self.err,
                                     stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL)
        self.lines: list[str] = []
        self.target = 1
        self.arrived = threading.Event()
        self.arrived_at = 0.0
        self.cpu_at_arrival = 0.0
        self.stopped = False
        self.rusage = None
        self.status = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            now = time.monotonic()
            self.lines.append(line)
            if not line.startswith("{") or '"step"' not in line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == "step" and ev.get("step") == self.target:
                os.kill(self.proc.pid, signal.SIGSTOP)
                self.stopped = True
                self.arrived_at = now
                self.cpu_at_arrival = self.cpu_s()
                self.arrived.set()

    def cpu_s(self) -> float:
        """CPU seconds (user + system, all threads) the child used so far, from /proc."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")

    def step(self, k: int, timeout_s: float) -> float | None:
        """Let the child run until it reports step ``k``; the seconds it was allowed to run.
        ``self.last_cpu_s`` is the CPU time it used meanwhile (less moved by other processes'
        load than wall time, though OpenMP threads spinning for a descheduled sibling count)."""
        self.target = k
        self.arrived.clear()
        cpu0 = self.cpu_s()
        t0 = time.monotonic()
        if k > 1:
            self.stopped = False
            os.kill(self.proc.pid, signal.SIGCONT)
        while not self.arrived.wait(1.0):
            if self._reaped_nohang() or time.monotonic() - t0 > timeout_s:
                return None
        self.last_cpu_s = self.cpu_at_arrival - cpu0
        return self.arrived_at - t0

    def _reaped_nohang(self) -> bool:
        if self.rusage is None:
            pid, status, ru = os.wait4(self.proc.pid, os.WNOHANG)
            if pid == 0:
                return False
            self.rusage, self.status = ru, os.waitstatus_to_exitcode(status)
        return True

    def finish(self) -> None:
        """Let it run to its end (final checkpoint, publish, result file) and reap it."""
        if self.rusage is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            _pid, status, self.rusage = os.wait4(self.proc.pid, 0)
            self.status = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.status
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.err.close()

    def kill(self) -> None:
        if self.rusage is None:
            try:
                self.proc.kill()  # SIGKILL ends a stopped process too
                _pid, status, self.rusage = os.wait4(self.proc.pid, 0)
                self.status = os.waitstatus_to_exitcode(status)
            except (ProcessLookupError, ChildProcessError):
                pass


def run_lockstep(a: argparse.Namespace, model: Path, work: Path, rnd: int, precision: str = "fp32",
                 members: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """All contenders alive at once but only one running: step k of worker, plain, hf, then
    step k + 1 of each, ... The parent times each step from SIGCONT to the step line, the same
    way for all three, so the load of the moment is shared step by step, not run by run.

    Step 1 (start-up, model load, first pass, warm-up step) runs alone and is not timed. Each
    timed interval holds one optimizer step plus the contender's own between-step work
    (fetching the next blocks, logging); the in-process step timers are not used here (a
    SIGSTOP can land after a child started its next step's timer). One precision at a time
    (three processes alive, not six: the machine has 24 GiB). ``members`` instead: any
    (role, precision) list, e.g. ``--cross``: worker-best, plain-fp32, plain-best."""
    d = work / f"round{rnd}"
    d.mkdir(parents=True, exist_ok=True)
    children: dict[str, Paced] = {}
    members_given = members is not None
    if members is None:
        members = [(c, precision) for c in CONTENDERS if c in a.only]
    prec_of = {f"{r}-{p}": p for r, p in members}
    try:
        for role, precision in members:
            name = f"{role}-{precision}"
            batch = d / name
            if role in ("worker", "workerc"):  # workerc: the worker with train.compile
                shutil.rmtree(batch, ignore_errors=True)
                settings = _worker_settings(a, model, work, precision)
                settings["train"]["compile"] = (role == "workerc") if members_given else bool(a.compile)
                write_batch(batch, settings, work / "data.jsonl")
                argv = [sys.executable, "-m", "trainerd.worker", str(batch)]
                c = Paced(name, argv, env=child_env(a.threads), stderr_path=batch / "worker.stderr", stdin_pipe=True)
            else:
                result = d / f"{name}.json"
                result.unlink(missing_ok=True)
                argv = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--blocks",
                        str(work / "blocks.pt"), "--result", str(result),
                        *_shared_child_args(a, model, _baseline_precision(precision))]
                c = Paced(name, argv, env=child_env(a.threads), stderr_path=d / f"{name}.stderr", stdin_pipe=False)
            children[name] = c
            # Start-up and step 1 one contender at a time (never two loads at once).
            if c.step(1, timeout_s=1800) is None:
                raise RuntimeError(f"{name} did not reach step 1 (exit {c.status}); see its stderr")
        intervals: dict[str, list[float]] = {n: [] for n in children}
        cpu: dict[str, list[float]] = {n: [] for n in children}
        for k in range(2, a.steps + 1):
            for name, c in children.items():
                dt = c.step(k, timeout_s=1800)
                if dt is None:
                    raise RuntimeError(f"{name} did not reach step {k} (exit {c.status}); see its stderr")
                intervals[name].append(dt)
                cpu[name].append(c.last_cpu_s)
            print("  step %2d  " % k + "  ".join(f"{n} {intervals[n][-1]:6.2f} s (cpu {cpu[n][-1]:6.2f})"
                                                 for n in children), flush=True)
        for c in children.values():
            c.finish()
    finally:
        for c in children.values():
            c.kill()
    tokens_per_step = a.micro_batch * a.grad_accum * a.seq_len
    out: dict[str, Any] = {}
    for name, c in children.items():
        iv = intervals[name]
        r: dict[str, Any] = {
            "exit_code": c.status, "peak_rss_bytes": c.rusage.ru_maxrss * 1024 if c.rusage else 0,
            "cpu_s": (c.rusage.ru_utime + c.rusage.ru_stime) if c.rusage else 0.0, "wall_s": float("nan"),
            "tps": float("nan"), "tps_steady": tokens_per_step * len(iv) / sum(iv) if iv else float("nan"),
            "tps_mstep": tokens_per_step / median(iv) if iv else float("nan"),
            "tps_best": tokens_per_step / min(iv) if iv else float("nan"), "step_s": iv,
            "step_cpu_s": cpu[name], "median_step_cpu_s": median(cpu[name]) if cpu[name] else float("nan"),
        }
        precision = prec_of[name]
        if name.startswith(("worker-", "workerc-")):
            batch = d / name
            (batch / "worker.stdout").write_text("\n".join(c.lines) + "\n")
            try:
                res = json.loads((batch / "result.json").read_text())
                r.update(status=res.get("status"), steps=res.get("step"), tokens=res.get("tokens"),
                         first_loss=res.get("first_loss"), last_loss=res.get("last_loss"),
                         self_reported_tps=res.get("tokens_per_s"), precision=res.get("precision"))
            except (OSError, ValueError):
                pass
        else:
            r["precision"] = "float32" if _baseline_precision(precision) == "fp32" else "bfloat16"
            try:
                rec = json.loads((d / f"{name}.json").read_text())
                r.update(steps=len(rec["step_s"]), tokens=sum(rec["step_tokens"]),
                         first_loss=rec["losses"][0] if rec["losses"] else None,
                         last_loss=rec["losses"][-1] if rec["losses"] else None)
            except (OSError, ValueError, KeyError):
                pass
        out[name] = r
    # Step-by-step pairs: the first member's step k against each other member's step k, run
    # seconds apart (e.g. worker-fp32 vs plain-fp32 as paired_step_tps_ratio_vs_plain).
    first = next(iter(intervals))
    for other in list(intervals)[1:]:
        pr = [o / w for w, o in zip(intervals[first], intervals[other]) if w > 0]  # = tps ratio
        tag = other.split("-")[0] if prec_of[other] == prec_of[first] else other
        out[first][f"paired_step_tps_ratio_vs_{tag}"] = {
            "median": round(median(pr), 4), "min": round(min(pr), 4), "max": round(max(pr), 4)} if pr else {}
        wc, oc = out[first]["median_step_cpu_s"], out[other]["median_step_cpu_s"]
        if wc and oc:
            out[first][f"median_step_cpu_ratio_vs_{tag}"] = round(wc / oc, 4)
    return out


def _line(name: str, r: dict[str, Any]) -> str:
    fl = r.get("first_loss")
    return (f"  {name:<11} tps {r.get('tps', float('nan')):7.2f}  steady {r.get('tps_steady', float('nan')):7.2f}  "
            f"median-step {r.get('tps_mstep', float('nan')):7.2f}  MFU {100 * r.get('mfu', float('nan')):5.1f}%  "
            f"peak RSS {gib(r['peak_rss_bytes'])}  wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  "
            + (f"GPU peak {gib(r['cuda_peak_bytes'])}  " if r.get("cuda_peak_bytes") else "")
            + f"[{r.get('precision')}] first loss {fl if fl is None else round(fl, 4)}  exit {r['exit_code']}")


DEVICE = {"kind": "cpu"}  # set by main(): the plain loop and HF use bf16 on any bf16 GPU


def _baseline_precision(precision: str) -> str:
    """What the plain loop and HF Trainer run for a precision label: ``best`` is bf16 autocast
    where the hardware computes bf16 natively (what a user of either would turn on), fp32 elsewhere."""
    native = DEVICE["kind"] == "cuda" or cpu_bf16_features()["native_bf16"]
    return "bf16" if precision == "best" and native else "fp32"


KEYS = ("tps", "tps_steady", "tps_mstep", "tps_best", "mfu", "peak_rss_bytes", "wall_s", "cpu_s", "train_s")


def _ok(r: dict[str, Any], k: str) -> bool:
    v = r.get(k)
    return r.get("exit_code") == 0 and isinstance(v, (int, float)) and v == v and v != 0


def paired(rounds: list[dict[str, Any]], num: str, den: str, k: str) -> dict[str, Any] | None:
    """num / den per round (they ran back to back, so slow drifts of the load cancel), and the
    median of those."""
    per = [r[num][k] / r[den][k] for r in rounds if num in r and den in r and _ok(r[num], k) and _ok(r[den], k)]
    return {"per_round": [round(x, 4) for x in per], "median": round(median(per), 4)} if per else None


def summarize(rounds: list[dict[str, dict[str, Any]]], names: list[str]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for name in names:
        rs = [r[name] for r in rounds if name in r and r[name].get("exit_code") == 0]
        s[name] = {k: spread([float(x[k]) for x in rs if x.get(k) is not None and x[k] == x[k]]) for k in KEYS}
    ratios: dict[str, Any] = {}
    pairs = []
    for prec in ("fp32", "best"):
        for other in ("plain", "hf"):
            pairs.append((f"worker-{prec}", f"{other}-{prec}"))
    pairs += [("worker-best", "plain-fp32"), ("worker-best", "worker-fp32"), ("plain-best", "plain-fp32"),
              ("hf-best", "hf-fp32"), ("workerc-best", "plain-fp32"), ("workerc-best", "worker-best"),
              ("workerc-best", "plain-best")]
    for num, den in pairs:
        if num not in names or den not in names:
            continue
        for k in ("tps", "tps_steady", "tps_mstep", "tps_best", "peak_rss_bytes", "wall_s"):
            w, o = s[num].get(k, {}).get("median"), s[den].get(k, {}).get("median")
            if w and o:
                ratios[f"{num}/{den} {k} (of medians)"] = round(w / o, 4)
            pr = paired(rounds, num, den, k)
            if pr:
                ratios[f"{num}/{den} {k} (paired per round)"] = pr
    s["ratios"] = ratios
    return s


def targets(rounds: list[dict[str, Any]], names: list[str], head: str, feats: dict[str, bool]) -> list[str]:
    """Issue 12's targets, as paired medians, for the CPU this ran on; one line each."""
    out = []

    def check(label: str, num: str, den: str, k: str, want: float, le: bool = False) -> None:
        if num not in names or den not in names:
            return
        pr = paired(rounds, num, den, k)
        if not pr:
            out.append(f"  {label}: no successful pair")
            return
        v = pr["median"]
        ok = v <= want if le else v >= want
        out.append(f"  {label}: {v:.3f}x {'<=' if le else '>='} {want}x  {'OK' if ok else 'MISSED'}  "
                   f"(per round {pr['per_round']})")

    if DEVICE["kind"] == "cuda":
        pass  # the CPU targets do not apply; the same-precision comparisons below do
    elif feats["amx_bf16"]:
        check("AMX CPU: worker (auto) tokens/s vs plain fp32", "worker-best", "plain-fp32", head, 1.8)
        check("AMX CPU: worker (auto, train.compile) tokens/s vs plain fp32", "workerc-best", "plain-fp32", head, 1.8)
        mfus = [r["worker-best"].get("mfu") for r in rounds if "worker-best" in r and _ok(r["worker-best"], "mfu")]
        if mfus:
            m = median(mfus)
            out.append(f"  AMX CPU: worker (auto) MFU of the same-run bf16 matmul peak: {100 * m:.1f}% >= 40%  "
                       f"{'OK' if m >= 0.40 else 'MISSED'}")
    elif feats["avx512_bf16"]:
        check("AVX512-BF16 CPU (no AMX): worker (auto) tokens/s vs plain fp32", "worker-best", "plain-fp32", head, 1.2)
    else:
        out.append("  no native bf16 on this CPU: the bf16 speed targets do not apply (auto = fp32)")
    for prec in ("fp32", "best"):
        for other in ("plain", "hf"):
            check(f"worker-{prec} vs {other}-{prec} tokens/s (same precision)", f"worker-{prec}", f"{other}-{prec}",
                  head, 1.0)
    check("worker-fp32 vs plain-fp32 tokens/s", "worker-fp32", "plain-fp32", head, 0.97)
    if DEVICE["kind"] == "cpu":
        check("worker (auto) peak RSS vs plain fp32", "worker-best", "plain-fp32", "peak_rss_bytes", 0.8, le=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--tiny", action="store_true", help="use the tiny random test model (quick smoke run)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (same for all three)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS),
                   help="run a subset (the order stays worker, plain, hf)")
    p.add_argument("--precisions", nargs="+", choices=("fp32", "best"), default=["fp32", "best"],
                   help="fp32, and best: the worker's auto precision, bf16 autocast for the plain loop and "
                        "HF Trainer (bf16=True) where the CPU has native bf16")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: every contender on the GPU (benchmarks/gpu_check.sh)")
    p.add_argument("--matmul-n", type=int, default=0, help="matmul size for the peak (default 2048 CPU, 8192 GPU)")
    p.add_argument("--matmul-reps", type=int, default=3)
    p.add_argument("--text", choices=("synthetic", "real"), default="synthetic",
                   help="the training text: deterministic pseudo-English, or real prose (Python's own docs)")
    p.add_argument("--quality", action="store_true",
                   help="instead: the worker in fp32 and in bf16 on real text; bf16's loss within "
                        "--quality-tol of fp32's at every step after the first 5 (use --steps 50)")
    p.add_argument("--quality-tol", type=float, default=0.02)
    p.add_argument("--compile", action="store_true",
                   help="the worker with train.compile: true (with --cross: an extra contender workerc-best)")
    p.add_argument("--cross", action="store_true",
                   help="with --lockstep: one group of worker-best, plain-fp32, plain-best (the 1.8x target, paired "
                        "step by step)")
    p.add_argument("--lockstep", action="store_true",
                   help="alternate step by step instead of run by run (all contenders alive, one running; "
                        "timed from outside) - for a busy machine")
    p.add_argument("--work", type=Path, default=REPO / "bench-out" / "throughput-work")
    p.add_argument("--out", type=Path, default=REPO / "bench-out" / "throughput.json")
    # internal: the baseline children
    p.add_argument("--role", choices=("plain", "hf", "matmul"), help=argparse.SUPPRESS)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--blocks", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    # diagnostic: the plain loop keeps the model output (and its logits) alive through backward
    p.add_argument("--hold-output", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.role:
        rec = {"plain": child_plain, "hf": child_hf, "matmul": child_matmul}[a.role](a)
        Path(a.result).write_text(json.dumps(rec))
        return 0

    t_start = time.monotonic()
    a.matmul_n = a.matmul_n or (8192 if a.device == "cuda" else 2048)
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    model = tiny_model(a.work / "tiny-model") if a.tiny else a.model.resolve()
    if not (model / "config.json").is_file():
        print(f"no model at {model}: run scripts/fetch-model (or use --tiny)", file=sys.stderr)
        return 2
    n_blocks = a.steps * a.micro_batch * a.grad_accum
    if a.quality:
        a.text = "real"
    data = build_data(model, a.work, n_blocks=n_blocks, seq_len=a.seq_len, seed=a.seed, text=a.text)
    print(f"model {model}  steps {a.steps}  seq {a.seq_len}  micro {a.micro_batch}  accum {a.grad_accum}  "
          f"threads {a.threads}  rounds {a.rounds}")
    print(f"data: {data['lines']} lines, {data['tokens']} tokens = {data['blocks']} blocks of {a.seq_len}")
    report: dict[str, Any] = {
        "benchmark": "throughput", "machine": machine_info(), "model": str(model),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                     if k not in ("role", "blocks", "result")},
        "data": data, "timed_span": "one optimizer step: first forward .. zero_grad; "
        "tps includes step 1 (warm-up) in all three, tps_steady excludes it in all three, "
        "tps_mstep = tokens per step / median time of steps 2..N",
        "rounds": [],
    }
    DEVICE["kind"] = a.device
    if a.quality:
        return quality(a, model, report, t_start)
    feats = cpu_bf16_features()
    cross = CROSS + ([("workerc", "best")] if a.compile else [])
    names = ([f"{r}-{p}" for r, p in cross] if a.cross else
             [f"{c}-{prec}" for prec in a.precisions for c in CONTENDERS if c in a.only])
    flops_tok = model_flops_per_token(read_model_shape(model), a.seq_len)
    report.update(contenders=names, cpu_bf16=feats, model_flops_per_token=flops_tok,
                  precision_note="fp32: everything fp32. best: the worker's model.dtype auto; plain and HF "
                  "bf16 autocast (HF bf16=True) where the CPU has native bf16, else fp32")
    print(f"CPU: {report['machine'].get('cpu')}  bf16 features: {feats}  model FLOPs/token {flops_tok / 1e6:.1f} M")
    print("contenders: " + ", ".join(names))
    for rnd in range(1, a.rounds + 1):
        print(f"round {rnd}/{a.rounds}")
        results: dict[str, Any] = {}
        mm = measure_peak(a)
        results["matmul"] = mm
        print(f"  matmul {mm['n']}^3 peak: fp32 {mm['peak_gflops']['fp32']:.0f} GFLOP/s, "
              f"bf16 {mm['peak_gflops']['bf16']:.0f} GFLOP/s", flush=True)
        for prec in (["cross"] if a.cross else a.precisions):
            if prec == "cross":
                results.update(run_lockstep(a, model, a.work, rnd, members=cross))
                for name in results:
                    if name != "matmul":
                        _add_mfu(results[name], a, flops_tok, mm)
                        print(_line(name, results[name]), flush=True)
                continue
            if a.lockstep:
                results.update(run_lockstep(a, model, a.work, rnd, prec))
            else:
                for c in CONTENDERS:
                    if c not in a.only:
                        continue
                    name = f"{c}-{prec}"
                    r = (run_worker(a, model, a.work, rnd, prec) if c == "worker"
                         else run_baseline(c, a, model, a.work, rnd, prec))
                    results[name] = r
                    _add_mfu(r, a, flops_tok, mm)
                    print(_line(name, r), flush=True)
                    if r["exit_code"] != 0:
                        print(r.get("stderr_tail", ""), file=sys.stderr)
            if a.lockstep:
                for name in names:
                    if name.endswith(prec) and name in results:
                        _add_mfu(results[name], a, flops_tok, mm)
                        print(_line(name, results[name]), flush=True)
        report["rounds"].append(results)
        report["summary"] = summarize(report["rounds"], names)
        write_json(a.out, report)  # after every round: an interrupted run still leaves figures

    s = report["summary"]
    report["total_s"] = round(time.monotonic() - t_start, 1)
    head = "tps_steady" if a.lockstep else "tps"
    report["targets"] = targets(report["rounds"], names, head, feats)
    write_json(a.out, report)
    peaks = {k: median([r["matmul"]["peak_gflops"][k] for r in report["rounds"]]) for k in ("fp32", "bf16")}
    print(f"\nCPU {report['machine'].get('cpu')}, flags {feats}; matmul peak (median of rounds): "
          f"fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s")
    print("medians over rounds (spread = (max-min)/median):")
    for name in names:
        m = s[name]
        parts = []
        for k, label in (("tps", "tps"), ("tps_steady", "steady"), ("tps_mstep", "median-step"),
                         ("tps_best", "best-step")):
            if m.get(k):
                parts.append(f"{label} {m[k]['median']:8.2f} (spread {m[k]['spread_pct']:5.1f}%)")
        if m.get("mfu") and m.get("tps"):
            parts.append(f"{m['tps']['median'] * flops_tok / 1e9:.0f} GFLOP/s = MFU {100 * m['mfu']['median']:.1f}%")
        if m.get("peak_rss_bytes"):
            parts.append(f"peak RSS {gib(m['peak_rss_bytes']['median'])}")
        if m.get("wall_s"):
            parts.append(f"wall {m['wall_s']['median']:.1f} s")
        print(f"  {name:<11} " + ("  ".join(p_ for p_ in parts if p_) or "no successful run"))
    print("ratios:")
    for k, v in s["ratios"].items():
        if "(paired per round)" in k and any(x in k for x in (" tps ", " tps_steady ", " peak_rss_bytes ")):
            print(f"  {k}: {v}")
    if a.lockstep:
        for i, r in enumerate(report["rounds"], 1):
            for name, res in r.items():
                for k, pr in (res.items() if isinstance(res, dict) else ()):
                    if k.startswith("paired_step_tps_ratio_vs_") and pr:
                        print(f"  round {i}: {name} / {k.removeprefix('paired_step_tps_ratio_vs_')} tokens/s, step by "
                              f"step: median {pr['median']} (min {pr['min']}, max {pr['max']})")
    print(f"targets ({head}, paired medians; this CPU: "
          f"{'AMX' if feats['amx_bf16'] else 'AVX512-BF16' if feats['avx512_bf16'] else 'no native bf16'}):")
    for line in report["targets"]:
        print(line)
    print(f"wrote {a.out}  ({report['total_s']} s)")
    return 0


def measure_peak(a: argparse.Namespace) -> dict[str, Any]:
    result = a.work / "matmul.json"
    result.unlink(missing_ok=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "--role", "matmul", "--result", str(result),
            "--device", a.device,
            "--threads", str(a.threads), "--matmul-n", str(a.matmul_n), "--matmul-reps", str(a.matmul_reps)]
    run = run_child(argv, env=child_env(a.threads), cwd=REPO, stderr_path=a.work / "matmul.stderr")
    if run.exit_code != 0:
        raise RuntimeError(f"matmul child failed (exit {run.exit_code}); see {a.work / 'matmul.stderr'}")
    return json.loads(result.read_text())


def _add_mfu(r: dict[str, Any], a: argparse.Namespace, flops_tok: float, mm: dict[str, Any]) -> None:
    """Model FLOPs/s and their share of the same round's matmul peak in the precision used."""
    tps = r.get("tps") if r.get("tps") == r.get("tps") and r.get("tps") else r.get("tps_steady")
    if not tps or tps != tps:
        return
    peak = mm["peak_gflops"]["bf16" if r.get("precision") == "bfloat16" else "fp32"] * 1e9
    r["model_flops_s"] = tps * flops_tok
    r["mfu"] = tps * flops_tok / peak


def real_text_lines() -> list[str]:
    """Real English prose that ships with every Python: the documentation topics of the language
    reference (``pydoc_data.topics``, ~1 MB), one paragraph a line, in a fixed order."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            para = " ".join(para.split())
            if len(para) >= 200:
                out.append(para)
    return out


def quality(a: argparse.Namespace, model: Path, report: dict[str, Any], t_start: float) -> int:
    """The worker in fp32 and in bf16 on the same real text, step by step: the bf16 loss must stay
    within ``--quality-tol`` (2%) of the fp32 loss at every step after the first 5."""
    curves: dict[str, list[float]] = {}
    for prec, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        batch = a.work / f"quality-{prec}"
        shutil.rmtree(batch, ignore_errors=True)
        settings = _worker_settings(a, model, a.work, "fp32")
        settings["model"]["dtype"] = dtype
        write_batch(batch, settings, a.work / "data.jsonl")
        run = run_child([sys.executable, "-m", "trainerd.worker", str(batch)], env=child_env(a.threads), cwd=REPO,
                        stderr_path=batch / "worker.stderr", stdin_pipe=True)
        (batch / "worker.stdout").write_text("\n".join(run.stdout_lines) + "\n")  # the curve survives us
        ev = [e for e in json_lines(run.stdout_lines) if e.get("event") == "step"]
        curves[prec] = [e["loss"] for e in ev]
        report["quality_partial"] = dict(curves)
        write_json(a.out, report)
        res = json.loads((batch / "result.json").read_text())
        print(f"  worker {prec}: exit {run.exit_code}, {len(ev)} steps, precision {res.get('precision')}, "
              f"tokens/s {res.get('tokens_per_s')}, peak RSS {gib(run.peak_rss_bytes)}", flush=True)
    rel = [abs(b - f) / abs(f) for f, b in zip(curves["fp32"], curves["bf16"])]
    after = rel[5:]
    worst = max(after) if after else float("nan")
    print(" step   loss fp32   loss bf16   rel diff")
    for i, (f, b, r) in enumerate(zip(curves["fp32"], curves["bf16"], rel), 1):
        print(f" {i:4d}  {f:10.5f}  {b:10.5f}  {100 * r:7.3f}%{'' if i > 5 else '  (not judged)'}")
    ok = worst <= a.quality_tol
    print(f"bf16 vs fp32 loss, steps 6..{len(rel)}: max relative difference {100 * worst:.3f}% "
          f"(median {100 * median(after):.3f}%) <= {100 * a.quality_tol:.1f}%: {'OK' if ok else 'MISSED'}")
    report.update(quality={"fp32": curves["fp32"], "bf16": curves["bf16"], "rel_diff": rel,
                           "max_rel_after_5": worst, "ok": ok}, total_s=round(time.monotonic() - t_start, 1))
    write_json(a.out, report)
    print(f"wrote {a.out}  ({report['total_s']} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
