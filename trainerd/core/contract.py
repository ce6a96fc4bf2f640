"""The contract both processes share, said once (stdlib only).

The supervisor and the worker talk through argv, files and exit codes (docs/architecture.md);
everything they must agree on is named here: exit codes, stop reasons, attempt outcomes, and
every path under the root and inside a batch folder. A literal repeated in two processes is a
rename waiting to break the other one.
"""

from __future__ import annotations

import os
from enum import Enum, IntEnum
from pathlib import Path

__all__ = ["BatchFiles", "COMPRESSED_SUFFIXES", "DATA_SUFFIXES", "ExitCode", "LANES", "Outcome", "RootLayout",
           "StopReason", "data_suffix", "lane_name"]

# What the inbox takes: plain JSONL, and the same compressed (the worker decompresses it into the
# batch's data.jsonl before its first pass; the supervisor never reads the content).
COMPRESSED_SUFFIXES = (".jsonl.gz", ".jsonl.zst")
DATA_SUFFIXES = (".jsonl", *COMPRESSED_SUFFIXES)


def data_suffix(name: str) -> str | None:
    """``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst`` as ``name`` ends, else None."""
    return next((s for s in (*COMPRESSED_SUFFIXES, ".jsonl") if name.endswith(s)), None)


# Priority lanes: inbox/high/, inbox/ (normal) and inbox/low/; the ledger stores the number.
LANES = {"high": 1, "normal": 0, "low": -1}


_LANE_NAMES = {v: k for k, v in LANES.items()}


def lane_name(priority: int | None) -> str:
    return _LANE_NAMES.get(priority or 0, "normal")


class ExitCode(IntEnum):
    """Process exit codes (sysexits.h). An IntEnum: ``sys.exit`` of a str-Enum would exit 1."""

    OK = os.EX_OK                # worker: done; CLI: success
    FAIL = 1                     # CLI: a general failure (refused, not found, problems found)
    USAGE = 2                    # CLI: bad arguments (argparse's own code)
    DATAERR = os.EX_DATAERR      # 65: the data is unusable (a file would be rejected)
    NOINPUT = os.EX_NOINPUT      # 66: CLI: a named file, or the root, does not exist (or is not a root)
    UNAVAILABLE = os.EX_UNAVAILABLE  # 69: CLI: something it needs cannot be had now (the model, its libraries)
    SOFTWARE = os.EX_SOFTWARE    # 70: the worker crashed with a Python exception
    TEMPFAIL = os.EX_TEMPFAIL    # 75: stopped, resumable (CLI: a daemon already runs)
    CONFIG = os.EX_CONFIG        # 78: the settings are unusable


class StopReason(str, Enum):
    """Why a worker stopped (exit 75), as ``result.json`` and the ledger say it."""

    PAUSED = "paused"                  # root/.stop (the operator)
    MEMORY = "memory"                  # the memory guard (.stop "memory", SIGTERM at hard), a CUDA OOM at micro 1
    RECYCLE = "recycle"                # the guard: a steady leak or max_worker_age_s
    SHUTDOWN = "shutdown"              # SIGTERM/SIGINT: the daemon (or systemd) is stopping
    PARENT_GONE = "parent_gone"        # EOF on the stdin lifeline: the supervisor died
    DISK_FULL = "disk_full"            # a checkpoint or the adapter found no space
    PEER_STOPPED = "peer_stopped"      # distributed: another rank asked to stop
    KERNEL_OOM_KILL = "kernel_oom_kill"  # supervisor only: SIGKILLed by the kernel's OOM killer
    SUPERVISOR_RESTART = "supervisor_restart"  # supervisor only: the attempt was lost with its supervisor
    STALLED = "stalled"                # supervisor only: no progress for supervisor.stall_timeout_s
    CANCELLED = "cancelled"            # `trainerd cancel`: checkpoint, exit 75; the batch is withdrawn

    def __str__(self) -> str:
        return self.value

    @classmethod
    def from_stop_file(cls, text: str) -> "StopReason":
        """The reason a batch ``.stop`` asks for; unknown or empty content means memory."""
        try:
            reason = cls(text.strip())
        except ValueError:
            return cls.MEMORY
        return reason if reason in STOP_FILE_REASONS else cls.MEMORY


# What a batch's .stop may say (the guard writes memory/recycle; an operator may write the rest).
STOP_FILE_REASONS = (StopReason.MEMORY, StopReason.RECYCLE, StopReason.PAUSED, StopReason.SHUTDOWN,
                     StopReason.CANCELLED)


class Outcome(str, Enum):
    """How an attempt ended: ``result.json``'s ``status`` and the ledger's attempt outcome."""

    DONE = "done"
    STOPPED = "stopped"
    BAD_DATA = "bad_data"
    BAD_CONFIG = "bad_config"
    CRASHED = "crashed"
    LOST = "lost"  # ledger only: the supervisor died and no result.json says what happened

    def __str__(self) -> str:
        return self.value


class BatchFiles:
    """The files of one batch folder, ``root/batches/<id>/`` (or any folder the worker is given)."""

    def __init__(self, batch_dir: str | os.PathLike[str]):
        self.dir = d = Path(batch_dir)
        self.data = d / "data.jsonl"              # the claimed file itself (original bytes)
        self.settings = d / "settings.json"       # this attempt's resolved settings
        self.stop = d / ".stop"                   # stop request for this batch; content = reason
        self.scan = d / "scan.json"               # the worker's first pass, reused on resume
        self.precision = d / "precision.json"     # the precision the worker chose; kept on resume
        self.errors = d / "errors.jsonl"          # every bad line
        self.checkpoints = d / "checkpoints"
        self.progress = d / "progress.json"       # live progress (status reads it)
        self.heartbeat = d / "heartbeat"          # touched by the worker's own loops: its mtime is its last sign of life
        self.tally = d / "tally.json"             # this attempt's running account (worker/tally.py), per step
        self.result = d / "result.json"           # the worker's last word for the attempt (rank 0's)
        self.stderr = d / "worker.stderr"
        self.published = d / "published"         # the attempt's final adapter (--publish)
        self.final_adapter = d / "final_adapter"  # the adapter when the worker runs without --publish
        self.reserve = d / ".reserve"             # ballast the worker frees to write result.json on a full disk
        # The evaluation gate (docs/architecture.md, "Evaluate and decide")
        self.eval_file = d / "eval.jsonl"         # an eval file claimed with the data (replaces the holdout)
        self.holdout = d / "holdout.jsonl"        # the held-out slice of data.jsonl (distinct lines, once each)
        self.parent = d / "parent.json"           # the champion / init adapter, fixed at the first attempt
        self.evalsets = d / "evalsets.json"       # the evaluation memory's version and the suites, fixed at the first attempt
        self.split = d / "split.json"             # the worker's first split: counts, this batch's held-out and excluded hashes
        self.replay = d / "replay.jsonl"          # earlier batches' lines drawn into this batch, fixed at the first pass
        self.replay_contrib = d / "replay-contrib.jsonl"  # this batch's training lines, for the store once published
        self.eval_result = d / "eval.json"        # candidate and champion figures on every set
        self.heal = d / "heal.json"               # a healing try the supervisor asked for: try, batches to rehearse
        self.tries = d / "tries.json"             # each refused try's gate figures (the lineage's "heals")

    def claimed(self, name: str) -> Path:
        """Where the claimed original of a file called ``name`` lies: ``data.jsonl``, or
        ``data.jsonl.gz`` / ``data.jsonl.zst`` for a compressed one (whose decompressed copy, made
        by the worker, is ``data.jsonl``)."""
        suffix = data_suffix(name)
        return self.data if suffix in (None, ".jsonl") else self.dir / f"data{suffix}"

    def compressed(self) -> Path | None:
        """The compressed original in this folder, if the batch came compressed."""
        return next((p for p in (self.dir / f"data{s}" for s in COMPRESSED_SUFFIXES) if os.path.lexists(p)), None)

    def rank_result(self, rank: int) -> Path:
        """A distributed attempt's other ranks' last words (exit code and reason)."""
        return self.result if rank == 0 else self.dir / f"result.rank{rank}.json"

    def __repr__(self) -> str:
        return f"BatchFiles({str(self.dir)!r})"


class RootLayout:
    """Every path under ``root`` (docs/architecture.md). Creates nothing but in :meth:`make`."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = r = Path(root)
        self.inbox = r / "inbox"
        self.batches = r / "batches"
        self.adapters = r / "adapters"
        self.current = self.adapters / "current"
        self.done = r / "done"
        self.failed = r / "failed"
        self.logs = r / "logs"
        self.log_file = self.logs / "trainerd.jsonl"
        self.db = r / "state.db"
        self.stop = r / ".stop"
        self.lock = r / "trainerd.pid"          # flock held by the running supervisor; holds its pid
        self.daemon = r / "daemon.json"         # what the supervisor is doing now (for status)
        self.disk_reserve = r / ".disk-reserve"  # ballast the supervisor frees so the ledger can commit
        self.suites = r / "evals"                # standing evaluation suites (the operator's *.jsonl)
        self.evalsets = r / "evalsets"           # every set ever judged on, and the evaluation memory (trainerd/core/evalmemory.py)
        self.rejected = self.adapters / "rejected"  # candidates the gate refused, by batch id
        self.requests = r / "requests"           # promote/rollback/... asked of the running daemon (group-writable)
        self.replay = r / "replay"               # earlier batches' training lines, for replay (trainerd/core/replay.py)
        self.chain = r / "chain.json"            # a rebase: the base model the chain continues on, and since when
        # Issue 14 (operations): priority lanes, publish hooks, the disk-use cache.
        self.inbox_high = self.inbox / "high"    # claimed before the normal inbox ...
        self.inbox_low = self.inbox / "low"      # ... and this one after it
        self.hooks = r / "hooks"                 # pending publish-hook runs (supervisor/hooks.py)
        self.disk_usage = r / "disk-usage.json"  # sizes by kind: the daemon's disk book (supervisor/diskbook.py)
        self.tensorboard = r / "tensorboard"     # TensorBoard event files, a run per batch (worker/curves.py)

    @staticmethod
    def batch_name(batch_id: int) -> str:
        """The folder name (and the tag of a renamed original) of a batch: zero-padded."""
        return f"{batch_id:06d}"

    def batch_dir(self, batch_id: int) -> Path:
        return self.batches / self.batch_name(batch_id)

    def batch(self, batch_id: int) -> BatchFiles:
        return BatchFiles(self.batch_dir(batch_id))

    def adapter_dir(self, n: int) -> Path:
        return self.adapters / str(n)

    def rejected_dir(self, batch_id: int) -> Path:
        return self.rejected / self.batch_name(batch_id)

    def lane(self, priority: int | None) -> Path:
        """The inbox folder of a priority lane (LANES)."""
        p = priority or 0
        return self.inbox_high if p > 0 else self.inbox_low if p < 0 else self.inbox

    def looks_like_root(self) -> bool:
        return self.missing() is None

    def missing(self) -> str | None:
        """Why this folder is not a trainerd root, or None when it is one. A root holds the ledger
        (``state.db``) or at least the inbox (a root made ready by scripts/install-service before
        the daemon's first start); only ``trainerd run`` makes one."""
        if not self.root.is_dir():
            return "no such folder" if not self.root.exists() else "not a folder"
        if self.db.exists() or self.inbox.is_dir():
            return None
        return "no ledger (state.db) and no inbox/ in it"

    def make(self) -> None:
        for d in (self.root, self.batches, self.adapters, self.done, self.failed, self.logs):
            d.mkdir(mode=0o750, parents=True, exist_ok=True)
        # The inbox and the request folder are where operators (group members, not the daemon's
        # user) drop files: group writable, and setgid so what they drop stays in the daemon's
        # group. Set explicitly: mkdir's mode is filtered by the daemon's umask 027. Nothing else
        # is group-writable. Under the hardened unit (RestrictSUIDSGID=yes) setting setgid fails
        # with EPERM; there scripts/install-service creates both 2770 beforehand, as root.
        for shared in (self.inbox, self.inbox_high, self.inbox_low, self.requests):
            if not shared.is_dir():
                shared.mkdir(mode=0o750, parents=True, exist_ok=True)
                try:
                    os.chmod(shared, 0o2770)
                except PermissionError:
                    os.chmod(shared, 0o770)
