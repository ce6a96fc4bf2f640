"""MemoryGuard: the sampler and the rules for the worker being watched, and a log line for each
decision. It never writes a file or sends a signal: the supervisor hands each
:class:`~trainerd.memguard.decision.Decision` to its ``Escalation``, which does both.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from trainerd.core.settings import LoraSettings, MemorySettings, TrainSettings
from trainerd.memguard.cgroup import Cgroup, find_memory_cgroup
from trainerd.memguard.procfs import mem_available
from trainerd.memguard.decision import Decision, Sample
from trainerd.memguard.rules import Rules
from trainerd.memguard.sampler import AVAILABLE_SOURCE, Sampler
from trainerd.core.ladder import Plan, Rung, estimated_tokens_per_s, ladder, plan, quantization_available
from trainerd.core.planning import read_model_shape

__all__ = ["MemoryGuard"]


class _NullLog:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def _sampler_attr(name: str) -> property:
    return property(lambda self: getattr(self.sampler, name), doc=f"The sampler's ``{name}``.")


class MemoryGuard:
    """Samples the running worker and decides none / stop / recycle / term / kill.

    ``now`` and ``started_at`` must come from the same clock; ``time.monotonic()`` is best
    (a wall-clock step would read as sudden age, or distort a growth rate).
    Thread-safe: the supervisor polls it from its own thread (supervisor/guardthread.py) while
    the loop attaches, detaches, plans and samples it for the metrics; one lock serialises them,
    so the sampler's kept-open files are never closed under a read.
    """

    limit_bytes = _sampler_attr("limit_bytes")
    source = _sampler_attr("source")
    cgroup = _sampler_attr("cgroup")
    cgroup_limit_bytes = _sampler_attr("cgroup_limit_bytes")
    configured_bytes = _sampler_attr("configured_bytes")
    physical_bytes = _sampler_attr("physical_bytes")
    psi_path = _sampler_attr("psi_path")

    def __init__(self, settings: MemorySettings, log: Any = None, *, cgroup: Cgroup | str | Path | None = None,
                 psi_path: str | Path | None = None):
        """``cgroup`` / ``psi_path`` override detection (tests, benchmarks, a worker placed in
        its own cgroup); by default the guard watches the cgroup of this process."""
        self.settings = settings
        self.log = log if log is not None else _NullLog()
        if cgroup is None:
            cg, v2_dir = find_memory_cgroup()
            default_psi = (v2_dir / "memory.pressure") if v2_dir is not None else None
        else:
            cg = cgroup if isinstance(cgroup, Cgroup) else Cgroup.at(cgroup)
            if cg is None:
                raise ValueError(f"{cgroup}: not a memory cgroup (no memory.current / memory.usage_in_bytes)")
            default_psi = cg.pressure_path()
        if psi_path is None:
            psi_path = default_psi if default_psi is not None and default_psi.exists() else Path("/proc/pressure/memory")
        psi = Path(psi_path) if Path(psi_path).exists() else None
        self.interval_s = settings.interval_ms / 1000.0
        self.sampler = Sampler(settings, cg, psi, self.log)
        self.rules = Rules(settings)
        self._pid: int | None = None
        self._batch_dir: Path | None = None
        self._started_at = 0.0
        self._lock = threading.RLock()
        self.peak_bytes: int | None = None  # the attempt's highest sample (a failure names it)
        self.log.info(
            "memory_limit_detected", limit_bytes=self.limit_bytes, source=self.source,
            configured_bytes=self.configured_bytes, cgroup_limit_bytes=self.cgroup_limit_bytes,
            physical_bytes=self.physical_bytes,
            cgroup=None if cg is None else f"v{cg.version}:{cg.path}",
            psi=str(psi) if psi else None,
        )

    # How long "stop" takes to become an exit and how much memory the checkpoint adds, as
    # learned so far (settable: the benchmark zeroes the prediction horizon through it).
    @property
    def checkpoint_s(self) -> float:
        return self.rules.timing.checkpoint_s

    @checkpoint_s.setter
    def checkpoint_s(self, value: float) -> None:
        self.rules.timing.checkpoint_s = float(value)

    @property
    def checkpoint_bytes(self) -> int:
        return self.rules.timing.checkpoint_bytes

    # --- the worker --------------------------------------------------------------------

    def attach(self, pid: int, batch_dir: str | Path, started_at: float) -> None:
        """Start watching a worker (its whole process tree); ``batch_dir`` names it in the log."""
        with self._lock:
            self._pid, self._batch_dir, self._started_at = int(pid), Path(batch_dir), float(started_at)
            self.peak_bytes = None
            self.sampler.watch(pid)
            self.rules.start(started_at)

    def detach(self) -> None:
        """Stop watching; learn from a graceful stop how long stopping takes."""
        with self._lock:
            self._pid = None
            self.sampler.watch(None)
            learned = self.rules.finish()
        if learned is not None:
            self.log.info("memory_stop_timing_learned", **learned)

    def kernel_oom_kills(self) -> int:
        """The cgroup's oom_kill counter (v2 memory.events, v1 memory.oom_control); 0 if unknown."""
        if self.cgroup is None:
            return 0
        return self.cgroup.oom_kills() or 0

    # --- sampling and deciding ---------------------------------------------------------

    def sample(self, now: float) -> Sample:
        """Measure once. Cheap: a few small file reads; the process tree at most once a second."""
        with self._lock:
            return self.sampler.sample(now)

    def poll(self, now: float) -> Decision:
        """Sample and decide. The caller carries out the decision (writes .stop, signals)."""
        with self._lock:
            if self._pid is None:
                return Decision()
            return self.decide(self.sampler.sample(now), now)

    def decide(self, s: Sample, now: float) -> Decision:
        """The rules on one sample, logged. Public so that tests can feed exact samples."""
        with self._lock:
            return self._decide(s, now)

    def _decide(self, s: Sample, now: float) -> Decision:
        d = self.rules.decide(s, now)
        if s.alive:
            self.peak_bytes = max(self.peak_bytes or 0, s.usage_bytes)
        if d.action == "none":
            return d
        extra = {"by": "memory_guard"} if d.action == "kill" else {}
        warn = d.action in ("term", "kill") and hasattr(self.log, "warning")
        (self.log.warning if warn else self.log.info)(
            f"memory_{d.action}_decided", pid=self._pid, batch_dir=str(self._batch_dir),
            age_s=round(now - self._started_at, 3), tree_pids=s.tree_pids,
            since_last_poll_s=None if d.since_last_poll_s is None else round(d.since_last_poll_s, 3),
            checkpoint_estimate_s=round(self.checkpoint_s, 3), **d.fields(), **extra)
        if d.leak is not None:
            lk = d.leak
            self.log.info("memory_leak_detected", pid=self._pid, leak_bytes_per_s=round(lk.bytes_per_s),
                          window_s=round(lk.window_s, 1), recent_peak_bytes=lk.recent_peak_bytes,
                          time_to_soft_s=round(lk.time_to_soft_s, 1))
        return d

    # --- planning ----------------------------------------------------------------------

    def plan(self, model_dir: Path, train: TrainSettings, lora: LoraSettings | None = None, *,
             precision: str = "float32", base_weights: str = "auto", device: str = "cpu") -> Plan:
        """The fastest rung of the batch's ladder (:func:`trainerd.core.ladder.ladder`) estimated to fit
        under the soft limit in ``precision``, logged as ``memory_plan`` (the rung, why, every rung's
        estimate and speed, the estimated tokens/s) and, as before, memory_plan_kept / _reduced /
        _does_not_fit. Reads config.json and the safetensors headers only: milliseconds."""
        with self._lock:  # the guard's thread samples beside this
            self.sampler.refresh_limit(force=True)
            limit, baseline = self.limit_bytes, self.sampler.baseline_bytes()
        shape = read_model_shape(model_dir)
        rungs = self.ladder(shape, train, lora, precision=precision, base_weights=base_weights, device=device)
        p = plan(rungs, limit_bytes=min(limit, baseline + mem_available()),
                 guard_limit_bytes=limit, baseline_bytes=baseline, soft=self.settings.soft)
        r = p.rung
        tps = estimated_tokens_per_s(shape, r, precision, device)
        fields = dict(micro_batch_size=r.micro_batch_size, grad_accum_steps=r.grad_accum_steps,
                      gradient_checkpointing=r.gradient_checkpointing, base_weights=r.weights,
                      estimate_bytes=r.estimate_bytes, budget_bytes=p.budget_bytes, limit_bytes=p.limit_bytes,
                      source=self.source if p.limit_bytes == limit else AVAILABLE_SOURCE,
                      configured_micro_batch_size=train.micro_batch_size,
                      configured_grad_accum_steps=train.grad_accum_steps,
                      effective_batch=train.micro_batch_size * train.grad_accum_steps, seq_len=train.seq_len,
                      params=shape["params"], fits=p.fits, precision=precision,
                      ranks_on_this_node=train.nproc_per_node)
        self.log.info("memory_plan", rung=r.describe(), why=p.why, speed=round(r.speed, 3),
                      estimated_tokens_per_s=round(tps, 1), never_fits=p.never_fits,
                      slow=r.speed < 0.9, rungs=[x.as_dict() for x in rungs], **fields)
        if not p.fits:
            (self.log.warning if hasattr(self.log, "warning") else self.log.info)("memory_plan_does_not_fit", **fields)
        elif r is not rungs[0]:
            self.log.info("memory_plan_reduced", **fields)
        else:
            self.log.info("memory_plan_kept", **fields)
        return p

    def ladder(self, shape: dict[str, int], train: TrainSettings, lora: LoraSettings | None = None, *,
               precision: str, base_weights: str = "auto", device: str = "cpu") -> list[Rung]:
        """The batch's rungs, fastest first (the plan's and the memory back-off's)."""
        return ladder(shape, train, lora, precision=precision, base_weights=base_weights,
                      quantize=base_weights == "auto" and quantization_available(device), ranks=train.nproc_per_node)
