"""The config's schema: one dataclass per section of the YAML file, each field with its default (the
documented ones in configs/trainerd.yaml) and its check (field metadata, which config.py validates a
file by). Stdlib only: a module that only needs the settings' shape (or their defaults) does not pay
for yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["SECTIONS", "Settings"]


# Each section is a dataclass; field metadata carries the check. Defaults are the
# documented ones in configs/trainerd.yaml.


def _check(kind: str, **kw: Any) -> dict[str, Any]:
    return {"check": (kind, kw)}


@dataclass
class ModelSettings:
    path: str = field(default="models/SmolLM2-135M-Instruct", metadata=_check("str", nonempty=True))
    dtype: str = field(default="auto", metadata=_check("choice", choices=("auto", "float32", "bfloat16")))
    device: str = field(default="auto", metadata=_check("choice", choices=("auto", "cpu", "cuda")))
    # How the frozen base is held (trainerd/core/ladder.py): auto = the memory plan picks the fastest
    # layout that fits (nf4 last, CUDA only); unquantized = never nf4; or pin one layout.
    base_weights: str = field(default="auto", metadata=_check(
        "choice", choices=("auto", "unquantized", "float32", "bfloat16", "nf4")))


@dataclass
class LoraSettings:
    r: int = field(default=8, metadata=_check("int", min=1))
    alpha: float = field(default=16.0, metadata=_check("float", min=0.0, exclusive_min=True))
    dropout: float = field(default=0.05, metadata=_check("float", min=0.0, max=0.99))
    target_modules: list = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata=_check("strlist", nonempty=True)
    )


@dataclass
class TrainSettings:
    seq_len: int = field(default=256, metadata=_check("int", min=8, max=1 << 20))
    micro_batch_size: int = field(default=4, metadata=_check("int", min=1))
    grad_accum_steps: int = field(default=4, metadata=_check("int", min=1))
    learning_rate: float = field(default=2e-4, metadata=_check("float", min=0.0, exclusive_min=True, max=1.0))
    weight_decay: float = field(default=0.0, metadata=_check("float", min=0.0))
    warmup_steps: int = field(default=10, metadata=_check("int", min=0))
    max_grad_norm: float = field(default=1.0, metadata=_check("float", min=0.0))
    epochs: int = field(default=1, metadata=_check("int", min=1))
    seed: int = field(default=1234, metadata=_check("int", min=0))
    # 0 = by time alone. A stop always writes one.
    checkpoint_every_steps: int = field(default=0, metadata=_check("int", min=0))
    # auto = Young/Daly from the measured checkpoint cost and the supervisor's MTBF estimate
    # (trainerd/core/cadence.py); a number = a fixed interval (0 disables).
    checkpoint_every_s: Any = field(default="auto", metadata=_check("float_or_auto", min=0.0))
    # auto = write in a background thread (from a copy) when adapter + optimizer state is >= 64 MiB.
    checkpoint_async: Any = field(default="auto", metadata=_check("bool_or_auto"))
    keep_checkpoints: int = field(default=3, metadata=_check("int", min=1))
    # A finished batch keeps its adapter (adapters/, or adapters/rejected/) and drops its checkpoints
    # (adapter + optimizer state, x keep_checkpoints: ~0.5 GB each for an 8B model); true keeps them.
    keep_finished_checkpoints: bool = field(default=False, metadata=_check("bool"))
    gradient_checkpointing: bool = field(default=False, metadata=_check("bool"))
    # torch.compile each decoder layer (regional): ~1 min of compiling per attempt, then faster
    # steps (measured ~1.2-1.3x in bf16 on a 2-core AMX Xeon); off with gradient checkpointing.
    compile: bool = field(default=False, metadata=_check("bool"))
    # 0 = let torch decide. Fixed thread counts keep CPU runs reproducible across machines.
    threads: int = field(default=0, metadata=_check("int", min=0))
    # Distributed (torchrun + DDP): ranks per node and nodes. micro_batch_size and
    # grad_accum_steps are per rank: the effective batch is micro x accumulation x ranks.
    nproc_per_node: int = field(default=1, metadata=_check("int", min=1))
    nnodes: int = field(default=1, metadata=_check("int", min=1))
    # Across nodes: the c10d rendezvous every node's torchrun agent joins (HOST:PORT), and its id.
    rdzv_endpoint: str = field(default="", metadata=_check("str"))
    rdzv_id: str = field(default="trainerd", metadata=_check("str", nonempty=True))
    # auto: nccl on CUDA, gloo on CPU. A rank that dies leaves the others in their next
    # collective: they give up after dist_timeout_s (torch's defaults are 10 and 30 minutes).
    dist_backend: str = field(default="auto", metadata=_check("choice", choices=("auto", "gloo", "nccl")))
    dist_timeout_s: float = field(default=60.0, metadata=_check("float", min=1.0))


@dataclass
class DataSettings:
    chunk_lines: int = field(default=1000, metadata=_check("int", min=1))
    max_bad_fraction: float = field(default=0.01, metadata=_check("float", min=0.0, max=1.0))
    max_line_bytes: int = field(default=1 << 20, metadata=_check("size", min=16))
    max_errors_reported: int = field(default=20, metadata=_check("int", min=1))
    # A compressed file (*.jsonl.gz, *.jsonl.zst) may decompress to at most this much; more is a
    # decompression bomb (or a mistake) and fails the batch (exit 65) before it can fill the disk.
    max_file_bytes: int = field(default=16 << 30, metadata=_check("size", min=1))


@dataclass
class MemorySettings:
    # "auto" = the smallest of the cgroup limit and physical memory.
    limit: Any = field(default="auto", metadata=_check("size_or_auto"))
    soft: float = field(default=0.85, metadata=_check("float", min=0.1, max=1.0))
    hard: float = field(default=0.95, metadata=_check("float", min=0.1, max=1.0))
    interval_ms: int = field(default=100, metadata=_check("int", min=10, max=60_000))
    kill_grace_s: float = field(default=10.0, metadata=_check("float", min=0.0))
    # PSI "some avg10" percentage that counts as the soft limit when sustained; 0 disables.
    psi_threshold: float = field(default=40.0, metadata=_check("float", min=0.0, max=100.0))
    psi_sustain_s: float = field(default=10.0, metadata=_check("float", min=0.0))
    # Recycle a worker (checkpoint + restart) after this long; 0 disables.
    max_worker_age_s: float = field(default=0.0, metadata=_check("float", min=0.0))
    # Recycle when steady-state growth would reach the soft limit within this horizon; 0 disables.
    leak_horizon_s: float = field(default=3600.0, metadata=_check("float", min=0.0))
    # Leak fit: ignore the first leak_warmup_s of a worker (loading), then fit the peaks of
    # eighths of the last leak_window_s (a training step must be shorter than an eighth, so
    # that every eighth holds one of its peaks).
    leak_warmup_s: float = field(default=300.0, metadata=_check("float", min=0.0))
    leak_window_s: float = field(default=600.0, metadata=_check("float", min=1.0))
    # First guess of how long a stop takes (finish the step + checkpoint + exit) before the
    # guard has timed one; used to predict whether usage reaches hard before a stop completes.
    checkpoint_estimate_s: float = field(default=5.0, metadata=_check("float", min=0.0))


@dataclass
class RetrySettings:
    max_attempts: int = field(default=5, metadata=_check("int", min=1))
    backoff_s: float = field(default=5.0, metadata=_check("float", min=0.0))
    backoff_max_s: float = field(default=600.0, metadata=_check("float", min=0.0))
    # Memory stops that made no progress before the batch is failed (never loop).
    max_memory_stops: int = field(default=8, metadata=_check("int", min=1))


@dataclass
class SupervisorSettings:
    stop_grace_s: float = field(default=60.0, metadata=_check("float", min=0.0))
    rescan_s: float = field(default=5.0, metadata=_check("float", min=0.1))
    # A file must be unchanged (size, mtime) for this long and not open for writing.
    settle_s: float = field(default=1.0, metadata=_check("float", min=0.0))
    watchdog_ping_s: float = field(default=0.0, metadata=_check("float", min=0.0))
    # A consistent copy of the ledger (state.db.backup) this often while anything changed (and at a
    # clean stop); between copies the ledger's own WAL and the batch folders' manifests are the log a
    # rebuild replays. 0 = after every batch's end as well (a copy costs O(ledger size)).
    ledger_backup_s: float = field(default=300.0, metadata=_check("float", min=0.0))
    # A worker whose loops make no progress this long is stopped and counted as a crash; 0 =
    # max(300 s, 10 x its median step), doubled while the model loads.
    stall_timeout_s: float = field(default=0.0, metadata=_check("float", min=0.0))


@dataclass
class DiskSettings:
    min_free_bytes: int = field(default=1 << 30, metadata=_check("size", min=0))


@dataclass
class EvalSettings:
    # The automatic held-out slice of every batch: distinct good lines chosen by content hash.
    holdout_fraction: float = field(default=0.1, metadata=_check("float", min=0.0, max=0.5))
    # At least this many distinct lines once the batch has two or more (one is always trained).
    holdout_min: int = field(default=1, metadata=_check("int", min=0))
    holdout_max: int = field(default=64, metadata=_check("int", min=0))
    # Budget of the new set and the standing suites after training, both passes together.
    max_tokens: int = field(default=32768, metadata=_check("int", min=0))
    max_fraction: float = field(default=0.1, metadata=_check("float", min=0.0, max=10.0))
    # The evaluation memory (trainerd/core/evalmemory.py): a stratified sample of every published
    # batch's held-out contents that every candidate is judged on, whole; its bound is the
    # evaluation's cost, whatever the length of the chain.
    memory_examples: int = field(default=512, metadata=_check("int", min=0))
    memory_tokens: int = field(default=16384, metadata=_check("int", min=0))
    batch_size: int = field(default=4, metadata=_check("int", min=1))
    # During training: the new set's loss every N optimizer steps (0 = off), and early stopping
    # after this many evaluations without improvement (0 = off; needs every_steps).
    every_steps: int = field(default=0, metadata=_check("int", min=0))
    early_stopping_patience: int = field(default=0, metadata=_check("int", min=0))


@dataclass
class ReplaySettings:
    # Each batch also trains on this fraction of its own training examples, drawn from earlier
    # batches' lines (root/replay/); 0 turns replay off.
    fraction: float = field(default=0.1, metadata=_check("float", min=0.0, max=1.0))
    max_fraction: float = field(default=0.5, metadata=_check("float", min=0.0, max=1.0))
    # The store's bound: beyond it, a uniform reservoir over all history.
    max_bytes: int = field(default=2 << 30, metadata=_check("size", min=1 << 20))


@dataclass
class GateSettings:
    enabled: bool = field(default=True, metadata=_check("bool"))
    # nats/token the candidate may be worse than the champion on the batch's own set
    new_tolerance: float = field(default=0.02, metadata=_check("float", min=0.0))
    # nats/token it may be worse on earlier batches (each, and all together) and standing suites
    max_regression: float = field(default=0.05, metadata=_check("float", min=0.0))
    # Probability (0..1) the candidate may lose, per token on average, on what an earlier batch (or
    # a suite) was judged on: each example's exp(-loss per token), champion minus candidate. What a
    # model knew (a fact's answer at p 0.97) shows here when it is forgotten; text it never could
    # predict (p 0.004, its loss wobbling by tenths of a nat) does not.
    max_forgetting: float = field(default=0.05, metadata=_check("float", min=0.0, max=1.0))
    # How sure a refusal must be (supervisor/gate.py): the history tests together refuse a candidate
    # that harmed no batch with probability at most 1 - confidence, whatever the chain's length.
    confidence: float = field(default=0.95, metadata=_check("float", min=0.5, max=0.9999))
    # A group this large is judged on its own spread; a smaller one borrows the memory's.
    min_examples: int = field(default=8, metadata=_check("int", min=2))
    # The smallest per-example spread (nats/token) the tests assume, and the one they assume where
    # too few examples measure it: 2 held-out examples cannot bless or refuse a small change.
    noise_floor: float = field(default=0.05, metadata=_check("float", min=0.0, exclusive_min=True))
    # A candidate refused for forgetting is trained again from the same champion with its
    # regressed batches' lines replayed (heal_replay x its own lines, x the try's number), at
    # most heal_attempts times, before it is rejected (0 = reject at once).
    heal_attempts: int = field(default=2, metadata=_check("int", min=0))
    heal_replay: float = field(default=0.25, metadata=_check("float", min=0.0, max=1.0))


@dataclass
class PublishSettings:
    # An executable run after every publish (promote and rollback too) and every rejection, as an
    # argv list (no shell); [] = none. TRAINERD_* variables say what happened (docs/publish-hooks.md).
    hook: list = field(default_factory=list, metadata=_check("strlist"))
    hook_timeout_s: float = field(default=60.0, metadata=_check("float", min=1.0))


@dataclass
class RetentionSettings:
    # All off (0) by default: keeping every original byte is the promise; deleting is the
    # operator's explicit choice. Never deleted: current, adapters a batch in progress or a
    # pending request needs, evalsets/, replay/.
    done_days: float = field(default=0.0, metadata=_check("float", min=0.0))      # originals in done/
    failed_days: float = field(default=0.0, metadata=_check("float", min=0.0))    # originals in failed/
    keep_adapters: int = field(default=0, metadata=_check("int", min=0))          # newest published versions
    keep_batch_dirs: int = field(default=0, metadata=_check("int", min=0))        # newest finished batch folders
    keep_curves: int = field(default=0, metadata=_check("int", min=0))            # newest finished batches' TensorBoard runs
    keep_attempt_rows: int = field(default=0, metadata=_check("int", min=0))      # newest finished batches' attempt rows


@dataclass
class MetricsSettings:
    # Prometheus textfile (node_exporter's textfile collector); relative to root; "" = off.
    textfile: str = field(default="metrics/trainerd.prom", metadata=_check("str"))
    # The group that may read the file's folder (node_exporter's); "" = leave it as created.
    group: str = field(default="", metadata=_check("str"))
    interval_s: float = field(default=5.0, metadata=_check("float", min=0.5, max=3600.0))


@dataclass
class CheckSettings:
    # `trainerd check` and the metrics' trainerd_health (trainerd/supervisor/views/health.py, docs/cli.md).
    paused_warning_s: float = field(default=3600.0, metadata=_check("float", min=0.0))  # paused longer: WARNING
    # A quarantined batch or a kernel OOM kill is reported this long after it happened.
    window_s: float = field(default=3600.0, metadata=_check("float", min=1.0))


@dataclass
class LogSettings:
    level: str = field(default="info", metadata=_check("choice", choices=("debug", "info", "warning", "error")))
    file: bool = field(default=True, metadata=_check("bool"))
    format: str = field(default="auto", metadata=_check("choice", choices=("auto", "json", "console")))
    # The log file rotates at this size (0 = never: an external logrotate's job), keeping this many
    # rotated files, all but the newest gzip-compressed: at most ~rotate_bytes x (1 + keep_files / 8).
    rotate_bytes: int = field(default=64 << 20, metadata=_check("size", min=0))
    keep_files: int = field(default=8, metadata=_check("int", min=1, max=1000))


@dataclass
class Settings:
    root: str = field(default="/var/lib/trainerd", metadata=_check("str", nonempty=True))
    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    retry: RetrySettings = field(default_factory=RetrySettings)
    supervisor: SupervisorSettings = field(default_factory=SupervisorSettings)
    disk: DiskSettings = field(default_factory=DiskSettings)
    log: LogSettings = field(default_factory=LogSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    replay: ReplaySettings = field(default_factory=ReplaySettings)
    publish: PublishSettings = field(default_factory=PublishSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    check: CheckSettings = field(default_factory=CheckSettings)


# The sections by their key in the file.
SECTIONS = {
    "model": ModelSettings,
    "lora": LoraSettings,
    "train": TrainSettings,
    "data": DataSettings,
    "memory": MemorySettings,
    "retry": RetrySettings,
    "supervisor": SupervisorSettings,
    "disk": DiskSettings,
    "log": LogSettings,
    "eval": EvalSettings,
    "gate": GateSettings,
    "replay": ReplaySettings,
    "publish": PublishSettings,
    "retention": RetentionSettings,
    "metrics": MetricsSettings,
    "check": CheckSettings,
}
