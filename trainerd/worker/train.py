"""The training loop: one claimed batch, from its newest checkpoint to the end or a stop.

Shape of a step: fetch ``effective_batch`` blocks (micro x accumulation), count their label
tokens, run them in micro-batches with ``loss = sum / label_tokens_in_step`` (so the gradient
does not depend on how the step is split: the memory back-off keeps the same optimizer step),
clip, step, ``gc.collect()``. Stops are checked between micro-batches; a stop mid-step discards
the partial gradient and checkpoints the state at the step's start (parameters, optimizer and
scheduler are untouched until ``optimizer.step``; the RNG state and cursor are remembered), so
a stop never waits for a long step, let alone an epoch.

Distributed later: every stop decision goes through ``Stopper.agree`` (an all-reduce when
torch.distributed is initialised) and only rank 0 writes checkpoints and the published adapter.
"""

from __future__ import annotations

import gc
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainerd import faults
from trainerd.config import Settings
from trainerd.contract import BatchFiles, ExitCode, Outcome, RootLayout, StopReason
from trainerd.fsutil import atomic_write_json, free_bytes, publish_dir, read_json
from trainerd.worker import checkpoint as ckpt
from trainerd.worker.data import BlockStream, Cursor, DataError, Encoder, Interrupted, Scan, scan
from trainerd.worker.stopper import Stopper, StopRequested



class ConfigProblem(Exception):
    """The settings cannot work (exit 78)."""


class DiskFull(Exception):
    """A checkpoint or the adapter could not be written for lack of space (exit 75, ``disk_full``)."""


def _no_space(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception chain (safetensors wraps it in its message)."""
    import errno

    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def _disk_full(exc: BaseException, folder: Path, need_bytes: int) -> bool:
    """Was this write failure the file system running out of space?

    torch.save reports a short write as a bare RuntimeError ("unexpected pos ..."), with no
    errno: then judge by the space left once the torn temporary is gone.
    """
    if _no_space(exc):
        return True
    free = free_bytes(folder)
    return free is not None and free < max(need_bytes, 1 << 20)


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


# --- helpers -----------------------------------------------------------------------------


def set_oom_score_adj(value: int = 1000) -> None:
    """If the kernel must kill, it kills us, never the supervisor."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError:
        pass


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def pick_device(settings: Settings) -> torch.device:
    want = settings.model.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigProblem("model.device: cuda requested but torch sees no CUDA device")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def pick_dtype(settings: Settings, device: torch.device) -> tuple[torch.dtype, bool]:
    """(weights dtype, bf16 autocast on?)."""
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if settings.model.dtype == "bfloat16":
        return torch.bfloat16, device.type == "cuda"
    if settings.model.dtype == "float32":
        return torch.float32, bf16_ok
    return (torch.bfloat16 if bf16_ok else torch.float32), bf16_ok


@dataclass
class RunEnd:
    """How Trainer.run ended: result.json's status and reason, the exit code, extra fields."""

    status: Outcome
    reason: str
    exit_code: ExitCode
    extra: dict[str, Any] = field(default_factory=dict)


# --- the trainer -------------------------------------------------------------------------


class Trainer:
    def __init__(self, batch_dir: Path, settings: Settings, *, init_adapter: Path | None,
                 publish: Path | None, log: Any):
        self.batch_dir = batch_dir
        self.s = settings
        self.init_adapter = init_adapter
        self.publish = publish
        self.log = log
        self.files = BatchFiles(batch_dir)
        self.data_path = self.files.data
        self.ckpt_root = self.files.checkpoints
        self.stopper = Stopper(self.files.stop, RootLayout(settings.root).stop)
        self._last_ckpt_step = -1
        self.rank = int(os.environ.get("RANK", "0"))
        self.started = time.monotonic()
        self.result: dict[str, Any] = {
            "micro_batch_size": settings.train.micro_batch_size,
            "grad_accum_steps": settings.train.grad_accum_steps,
        }
        self.device: torch.device | None = None
        self.micro = 0  # set once training starts
        self.eff = 0
        self.step = 0
        self.tokens = 0
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.train_tokens_this_run = 0
        self.train_time_this_run = 0.0
        self.steps_this_run = 0
        self._oom_above = faults.number("oom_above_micro")
        self.total_steps = 0
        self._last_progress = 0.0
        self._last_ckpt_time = time.monotonic()

    # -- set-up --------------------------------------------------------------------------

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        mp = Path(self.s.model.path)
        if not (mp / "config.json").is_file():
            raise ConfigProblem(f"model.path: no model folder at {mp} (run scripts/fetch-model?)")
        if self.s.train.threads:
            torch.set_num_threads(self.s.train.threads)
        self.device = pick_device(self.s)
        self.dtype, self.autocast = pick_dtype(self.s, self.device)
        t0 = time.monotonic()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(mp))
        except Exception as e:
            raise ConfigProblem(f"model.path: cannot load the tokenizer from {mp}: {e}") from e
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        try:
            base = AutoModelForCausalLM.from_pretrained(str(mp), dtype=self.dtype)
        except Exception as e:
            raise ConfigProblem(f"model.path: cannot load the model from {mp}: {e}") from e
        self.base_load_s = time.monotonic() - t0
        self.base = base
        self.log.info("model_loaded", path=str(mp), dtype=str(self.dtype).removeprefix("torch."),
                      device=str(self.device), autocast_bf16=self.autocast, load_s=round(self.base_load_s, 2))

    def _build_peft(self, adapter_dir: Path | None) -> None:
        from peft import LoraConfig, PeftModel, get_peft_model

        torch.manual_seed(self.s.train.seed)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(self.base, str(adapter_dir), is_trainable=True)
            cfg = model.peft_config["default"]
            want = (self.s.lora.r, float(self.s.lora.alpha), sorted(self.s.lora.target_modules))
            have = (cfg.r, float(cfg.lora_alpha), sorted(cfg.target_modules or []))
            if want != have:
                self.log.warning("adapter_config_differs", adapter=str(adapter_dir),
                                 settings=list(map(str, want)), adapter_has=list(map(str, have)),
                                 hint="the adapter's own LoRA shape is kept; start a new lineage to change it")
        else:
            cfg = LoraConfig(r=self.s.lora.r, lora_alpha=self.s.lora.alpha, lora_dropout=self.s.lora.dropout,
                             target_modules=list(self.s.lora.target_modules), task_type="CAUSAL_LM")
            try:
                model = get_peft_model(self.base, cfg)
            except ValueError as e:
                raise ConfigProblem(f"lora.target_modules: {e}") from e
        if self.s.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.to(self.device)
        model.train()
        self.model = model

    def _schedule(self, total_steps: int):
        from transformers import get_linear_schedule_with_warmup

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.s.train.learning_rate,
                                           weight_decay=self.s.train.weight_decay)
        warmup = min(self.s.train.warmup_steps, total_steps // 2)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, total_steps)

    # -- the run -------------------------------------------------------------------------

    def run(self) -> RunEnd:
        try:
            return self._run()
        except (DiskFull, OSError) as e:
            if isinstance(e, OSError) and not _no_space(e):
                raise
            # The previous checkpoint and adapter are intact (writes are tmp + rename and a
            # torn temporary is removed); the supervisor waits for space and resumes us.
            free = free_bytes(self.batch_dir)
            self.log.error("disk_full", error=str(e), free_bytes=free, step=self.step,
                           checkpoint=self.result.get("checkpoint"),
                           action="stopping; resumes from the newest complete checkpoint once space is back")
            return RunEnd(Outcome.STOPPED, StopReason.DISK_FULL, ExitCode.TEMPFAIL, {"free_bytes": free})

    def _run(self) -> RunEnd:
        set_oom_score_adj(1000)
        self.stopper.install()
        if not self.data_path.is_file():
            raise DataError(f"data file missing: {self.data_path}")
        self._load()
        encoder = Encoder(self.tokenizer)

        # The first pass is reused on resume while the file is unchanged (size + mtime).
        scan_path = self.files.scan
        sc = self._cached_scan(scan_path)
        if sc is None:
            t0 = time.monotonic()
            try:
                sc = scan(self.data_path, encoder, seq_len=self.s.train.seq_len,
                          max_line_bytes=self.s.data.max_line_bytes, chunk_lines=self.s.data.chunk_lines,
                          max_bad_fraction=self.s.data.max_bad_fraction,
                          errors_path=self.files.errors,
                          max_errors=self.s.data.max_errors_reported,
                          should_stop=lambda: self.stopper.check() is not None)
            except Interrupted:
                return self._stopped_before_training()
            atomic_write_json(scan_path, sc.as_dict())
            self.log.info("data_scanned", lines=sc.lines, good=sc.good, bad=sc.bad, blank=sc.blank,
                          tokens=sc.tokens, blocks_per_epoch=sc.blocks_per_epoch,
                          scan_s=round(time.monotonic() - t0, 2))
        self.result.update(lines_good=sc.good, lines_bad=sc.bad, errors=sc.errors)

        eff = self.s.train.micro_batch_size * self.s.train.grad_accum_steps
        total_blocks = sc.blocks_per_epoch * self.s.train.epochs
        cursor = Cursor()
        resume = ckpt.complete(self.ckpt_root)
        adapter_dir = self.init_adapter
        state = None
        if resume:
            state = ckpt.load_state(resume[0])
            eff = state["effective_batch"]
            adapter_dir = resume[0]
        self.total_steps = max(1, -(-total_blocks // eff))
        self._build_peft(adapter_dir)
        self._schedule(self.total_steps)
        self.micro = min(self.s.train.micro_batch_size, eff)
        if state is not None:
            self._restore(resume[0], state)
            self._last_ckpt_step = self.step
            cursor = Cursor(**state["cursor"])
        else:
            torch.manual_seed(self.s.train.seed)
        self.result.update(total_steps=self.total_steps, effective_batch=eff)
        self.log.info("training_started", resumed_from=str(resume[0].name) if resume else None,
                      init_adapter=str(self.init_adapter) if (self.init_adapter and not resume) else None,
                      step=self.step, total_steps=self.total_steps, micro_batch_size=self.micro,
                      effective_batch=eff, seq_len=self.s.train.seq_len, cursor=cursor.as_dict())

        # Everything allocated so far lives for the whole run: move it out of the collector's
        # sight so the per-step gc.collect() is ~1 ms instead of ~270 ms (FACTS.md).
        gc.collect()
        gc.freeze()

        stream = iter(BlockStream(self.data_path, encoder, seq_len=self.s.train.seq_len,
                                  max_line_bytes=self.s.data.max_line_bytes, chunk_lines=self.s.data.chunk_lines,
                                  pad_id=self.tokenizer.pad_token_id, blocks_per_epoch=sc.blocks_per_epoch,
                                  epochs=self.s.train.epochs, cursor=cursor))
        self.eff = eff
        for key in ("micro_batch_size", "grad_accum_steps"):  # summary() reports the live split now
            self.result.pop(key, None)
        try:
            while self.step < self.total_steps:
                step_cursor, step_rng = cursor, ckpt.rng_state()
                blocks = []
                for _ in range(min(eff, total_blocks - self.step * eff)):
                    ids, labels, mask, cursor = next(stream)
                    blocks.append((ids, labels, mask))
                try:
                    loss = self._train_step(blocks, step_rng)
                except StopRequested as stop:
                    self._checkpoint(step_cursor, step_rng)
                    return self._stopped(stop.reason)
                self.step += 1
                self.steps_this_run += 1
                self._fault_at_step()
                self.last_loss = loss
                if self.first_loss is None:
                    self.first_loss = loss
                self._progress(loss)
                if self._checkpoint_due():
                    self._checkpoint(cursor, ckpt.rng_state())
                reason = self.stopper.agree()
                if reason and self.step < self.total_steps:
                    self._checkpoint(cursor, ckpt.rng_state())
                    return self._stopped(reason)
        except StopIteration:
            raise DataError("data file changed while training: it ended before the counted blocks")
        # The final state is checkpointed before publishing: a crash while publishing resumes
        # here and only publishes again.
        if self._last_ckpt_step != self.step:
            self._checkpoint(cursor, ckpt.rng_state())
        published = self._publish()
        self._progress(self.last_loss, log_step=False)
        return RunEnd(Outcome.DONE, "finished", ExitCode.OK, {"adapter": str(published)})

    def _cached_scan(self, scan_path: Path) -> Scan | None:
        try:
            d = read_json(scan_path)
        except (OSError, ValueError):
            return None
        st = os.stat(self.data_path)
        if d.get("size") != st.st_size or d.get("mtime_ns") != st.st_mtime_ns or d.get("seq_len") != self.s.train.seq_len:
            if ckpt.complete(self.ckpt_root):
                raise DataError("data file changed since it was scanned: size or mtime differ; "
                                "its checkpoints no longer match it")
            return None
        d.pop("blocks_per_epoch", None)
        return Scan(**d)

    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(ckpt.load_tensors(path, "optimizer.pt"))
        self.scheduler.load_state_dict(ckpt.load_tensors(path, "scheduler.pt"))
        ckpt.set_rng_state(ckpt.load_tensors(path, "rng.pt"))
        self.step = state["step"]
        self.tokens = state["tokens"]
        self.first_loss = state.get("first_loss")
        self.last_loss = state.get("last_loss")
        if state.get("total_steps") != self.total_steps:
            self.log.warning("checkpoint_schedule_differs", checkpoint_total=state.get("total_steps"),
                             now_total=self.total_steps)

    # -- one optimizer step --------------------------------------------------------------

    def _train_step(self, blocks: list, step_rng: dict[str, Any]) -> float:
        ids = torch.tensor([b[0] for b in blocks], dtype=torch.long)
        labels = torch.tensor([b[1] for b in blocks], dtype=torch.long)
        mask = torch.tensor([b[2] for b in blocks], dtype=torch.long)
        # HF shifts labels inside the loss: position 0 of each block predicts nothing.
        n_items = int((labels[:, 1:] != -100).sum())
        t0 = time.monotonic()
        while True:
            try:
                loss_sum = self._accumulate(ids, labels, mask, max(n_items, 1))
                break
            except torch.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.micro <= 1:
                    self.log.error("cuda_oom_at_micro_batch_1", step=self.step + 1)
                    raise StopRequested(StopReason.MEMORY)
                old = self.micro
                self.micro = max(1, self.micro // 2)
                ckpt.set_rng_state(step_rng)  # redo the step with the same tokens and dropout
                self.log.warning("cuda_oom_backoff", step=self.step + 1, micro_batch_size_was=old,
                                 micro_batch_size=self.micro, grad_accum_steps=-(-len(blocks) // self.micro))
        if self.s.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.s.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        del ids, labels, mask
        gc.collect()  # cheap after gc.freeze(); keeps cyclic garbage from piling up per step
        real_tokens = sum(sum(b[2]) for b in blocks)
        self.tokens += real_tokens
        self.train_tokens_this_run += real_tokens
        self.train_time_this_run += time.monotonic() - t0
        return loss_sum

    def _accumulate(self, ids, labels, mask, n_items: int) -> float:
        total = 0.0
        for start in range(0, ids.shape[0], self.micro):
            if start:  # a stop never waits for the rest of a long step
                reason = self.stopper.check()
                if reason:
                    self.optimizer.zero_grad(set_to_none=True)
                    raise StopRequested(reason)
            if self._oom_above is not None and self.micro > self._oom_above:
                # Fault injection (TRAINERD_FAULT=oom_above_micro:K): the CPU has no CUDA OOM to
                # provoke, so the back-off path is exercised by raising the very same error.
                raise torch.OutOfMemoryError(f"injected: micro-batch {self.micro} > {self._oom_above}")
            sl = slice(start, start + self.micro)
            x, y, m = ids[sl].to(self.device), labels[sl].to(self.device), mask[sl].to(self.device)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.model(input_ids=x, attention_mask=m, labels=y, num_items_in_batch=n_items).loss
            # Only the loss is kept: holding the model output would keep its logits (micro x seq x
            # vocab floats, ~200 MB for SmolLM2 at 4 x 256) alive through backward(), where the
            # peak is. Measured: +0.13 to +0.22 GiB peak RSS with the output held.
            loss.backward()
            total += loss.item()  # a CPU-GPU sync point on CUDA, once per micro-batch
            del loss, x, y, m
        return total

    # -- checkpoints, progress, result ---------------------------------------------------

    def _checkpoint_due(self) -> bool:
        every = self.s.train.checkpoint_every_steps
        if every and self.step % every == 0:
            return True
        secs = self.s.train.checkpoint_every_s
        return bool(secs) and time.monotonic() - self._last_ckpt_time >= secs

    def _checkpoint(self, cursor: Cursor, rng: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        t0 = time.monotonic()
        state = {"tokens": self.tokens, "cursor": cursor.as_dict(), "total_steps": self.total_steps,
                 "effective_batch": self.eff, "micro_batch_size": self.micro,
                 "first_loss": self.first_loss, "last_loss": self.last_loss}
        try:
            path = ckpt.save(self.ckpt_root, self.step, model=self.model, optimizer=self.optimizer,
                             scheduler=self.scheduler, rng=rng, state=state, keep=self.s.train.keep_checkpoints)
        except Exception as e:
            newest = ckpt.complete(self.ckpt_root)
            if _disk_full(e, self.ckpt_root, _tree_bytes(newest[0]) if newest else 0):
                raise DiskFull(f"cannot write checkpoint step-{self.step:08d}: {e}") from e
            raise
        self._last_ckpt_time = time.monotonic()
        self._last_ckpt_step = self.step
        self.result["checkpoint"] = str(path.relative_to(self.batch_dir))
        self.log.info("checkpoint_saved", step=self.step, path=path.name,
                      save_s=round(time.monotonic() - t0, 3), cursor=cursor.as_dict())

    def _publish(self) -> Path:
        if self.rank != 0:
            return Path()
        dest = self.publish or self.files.final_adapter
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        # Half adapters of earlier attempts that died mid-write (SIGKILL, power loss): never
        # visible (they were never renamed), but they hold space; only this worker writes here.
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            self.model.save_pretrained(str(tmp), safe_serialization=True)
            atomic_write_json(tmp / "trainerd.json", {
                "base_model": self.s.model.path,
                "init_adapter": str(self.init_adapter) if self.init_adapter else None,
                "batch": self.batch_dir.name, "steps": self.step, "tokens": self.tokens,
                "first_loss": self.first_loss, "last_loss": self.last_loss, "seed": self.s.train.seed,
            })
            faults.die_at("crash_in_publish")
            publish_dir(tmp, dest, replace=True)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave half an adapter holding the space
            newest = ckpt.complete(self.ckpt_root)
            if _disk_full(e, dest.parent, _tree_bytes(newest[0]) // 2 if newest else 0):
                raise DiskFull(f"cannot write the adapter to {dest}: {e}") from e
            raise
        self.log.info("adapter_written", path=str(dest), steps=self.step)
        return dest

    def _progress(self, loss: float | None, log_step: bool = True) -> None:
        """Log the step and refresh progress.json (for `trainerd status`) at most twice a second."""
        now = time.monotonic()
        tps = self.train_tokens_this_run / self.train_time_this_run if self.train_time_this_run else 0.0
        eta = (self.total_steps - self.step) * self.train_time_this_run / max(1, self.steps_this_run)
        if log_step:
            self.log.info("step", step=self.step, total_steps=self.total_steps,
                          loss=None if loss is None else round(loss, 5), lr=self.scheduler.get_last_lr()[0],
                          tokens=self.tokens, tokens_per_s=round(tps, 1), eta_s=round(eta, 1), rss_bytes=current_rss_bytes())
        if not log_step or now - self._last_progress >= 0.5:
            self._last_progress = now
            try:
                atomic_write_json(self.files.progress, {
                    "step": self.step, "total_steps": self.total_steps, "loss": loss, "tokens": self.tokens,
                    "tokens_per_s": tps, "eta_s": eta, "rss_bytes": current_rss_bytes(),
                    "peak_rss_bytes": peak_rss_bytes(), "micro_batch_size": self.micro,
                    "pid": os.getpid(), "updated": time.time(),
                }, durable=False)
            except OSError as e:
                # A status hint only: a full disk must not end the run here; the next
                # checkpoint tells (and stops cleanly) if the space does not come back.
                if not _no_space(e):
                    raise

    def _fault_at_step(self) -> None:
        if faults.number("crash_at_step") == self.step:
            faults.die_at("crash_at_step")

    def _stopped(self, reason: str) -> RunEnd:
        self.log.info("stopped", reason=reason, step=self.step, total_steps=self.total_steps)
        return RunEnd(Outcome.STOPPED, reason, ExitCode.TEMPFAIL)

    def _stopped_before_training(self) -> RunEnd:
        reason = self.stopper.check() or StopReason.SHUTDOWN
        self.log.info("stopped", reason=reason, step=0, during="scan")
        return RunEnd(Outcome.STOPPED, reason, ExitCode.TEMPFAIL)

    def summary(self) -> dict[str, Any]:
        """What result.json reports; safe to call at any point of the run (even before set-up)."""
        tps = self.train_tokens_this_run / self.train_time_this_run if self.train_time_this_run else 0.0
        out = dict(self.result)
        out.update(step=self.step, total_steps=self.total_steps, tokens=self.tokens, first_loss=self.first_loss,
                   last_loss=self.last_loss, tokens_per_s=round(tps, 2), peak_rss_bytes=peak_rss_bytes(),
                   elapsed_s=round(time.monotonic() - self.started, 2))
        if self.micro:  # the CUDA OOM back-off may have changed the split: tell the supervisor
            out.update(micro_batch_size=self.micro, grad_accum_steps=-(-self.eff // self.micro))
        if self.device is not None and self.device.type == "cuda":
            out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out
