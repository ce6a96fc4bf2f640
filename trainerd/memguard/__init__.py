"""The memory guard: stop the worker gracefully before the kernel OOM killer can.

Lives in the supervisor (stdlib + psutil only; never torch). It measures what the kernel
measures and decides; the supervisor's ``Escalation`` carries a decision out (writes
``batch_dir/.stop``, sends SIGTERM/SIGKILL). Every non-"none" decision is logged with the
numbers behind it.

May import: the standard library, psutil and :mod:`trainerd.core` (the memory plan); nothing of
the supervisor (it decides, :mod:`trainerd.supervisor.stopping` acts), never torch & co.

The rooms:

- :mod:`~trainerd.memguard.procfs`: the small readers of /proc (kept-open files, meminfo,
  a process's status, the process tree);
- :mod:`~trainerd.memguard.cgroup`: the memory cgroup, v1 or v2, and PSI parsing;
- :mod:`~trainerd.memguard.sampler`: the effective limit and one ``Sample`` per poll
  (what is measured, and what it costs);
- :mod:`~trainerd.memguard.decision`: the values: a ``Sample`` in, a ``Decision`` out;
- :mod:`~trainerd.memguard.rules`: pure: samples and time in, a ``Decision`` out (the rungs);
- :mod:`~trainerd.memguard.guard`: ``MemoryGuard``, the sampler + the rules + the log.

Planning a first attempt is :mod:`trainerd.core.ladder` (estimates: :mod:`trainerd.core.planning`).
"""

from trainerd.memguard.cgroup import Cgroup, find_memory_cgroup, parse_psi
from trainerd.memguard.guard import MemoryGuard
from trainerd.memguard.decision import Decision, Sample
from trainerd.core.ladder import Plan

__all__ = [
    "Cgroup",
    "Decision",
    "MemoryGuard",
    "Plan",
    "Sample",
    "find_memory_cgroup",
    "parse_psi",
]
