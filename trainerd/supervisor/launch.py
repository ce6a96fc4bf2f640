"""How a worker is launched: one process, or PyTorch's own engine (torchrun) for several.

With ``train.nproc_per_node > 1`` or ``train.nnodes > 1`` the worker command runs under
``python -m torch.distributed.run`` (torch.distributed.elastic): ``--standalone`` on one node,
a c10d rendezvous (``train.rdzv_endpoint``, ``train.rdzv_id``) across nodes, and
``--max-restarts 0`` (the supervisor owns retries). No home-made launcher, rendezvous or
collective: the supervisor only builds this argv (it never imports torch).

Facts it relies on (torch/distributed/run.py and elastic/multiprocessing):
- torchrun forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to every rank, then SIGKILLs them after its
  shutdown timeout (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, 30 s by default): it is set to
  ``supervisor.stop_grace_s`` so a rank has the same time to checkpoint as a single worker;
  torches without that setting keep 30 s, and the supervisor's grace is then the shorter one;
- every rank runs in a session of its own, so the supervisor's SIGKILL goes to the whole
  process tree, not the group (child.py);
- any failed rank makes torchrun exit 1: a rank's exit 75 does not come through, so the outcome
  is taken from the ranks' result files (attempts.py), torchrun's code only as a fallback.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["distributed", "launch_argv", "launch_env"]


def distributed(settings: Any) -> bool:
    t = settings.train
    return t.nproc_per_node > 1 or t.nnodes > 1


def launch_argv(settings: Any, worker_cmd: list[str], worker_args: list[str]) -> list[str]:
    """The argv that starts the worker for ``worker_args`` (batch folder and options)."""
    if not distributed(settings):
        return [*worker_cmd, *worker_args]
    t = settings.train
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(t.nproc_per_node),
           "--nnodes", str(t.nnodes), "--max-restarts", "0"]
    if t.nnodes == 1:
        run.append("--standalone")
    else:
        run += ["--rdzv-backend", "c10d", "--rdzv-endpoint", t.rdzv_endpoint, "--rdzv-id", t.rdzv_id]
    # The worker command after the launcher, which runs it with its own python: `-m module`, a
    # script, or (--no-python) any other program.
    cmd = list(worker_cmd)
    is_python = bool(cmd) and os.path.basename(cmd[0]).startswith("python")
    if is_python and len(cmd) >= 3 and cmd[1] == "-m":
        return [*run, "-m", *cmd[2:], *worker_args]
    if is_python and len(cmd) >= 2:
        return [*run, *cmd[1:], *worker_args]
    return [*run, "--no-python", *cmd, *worker_args]


def launch_env(settings: Any, env: dict[str, str] | None) -> dict[str, str] | None:
    if not distributed(settings):
        return env
    out = dict(os.environ if env is None else env)
    out.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(settings.supervisor.stop_grace_s)))
    return out
