"""What the guard works with: a :class:`Sample` (one measurement) in, a :class:`Decision` (what the
supervisor should do now, and the numbers behind it; a :class:`Leak` fit behind a recycle) out.
Plain frozen values; the rules that turn one into the other are rules.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ACTIONS", "Decision", "Leak", "Sample"]

ACTIONS = ("none", "stop", "recycle", "term", "kill")


@dataclass(frozen=True)
class Sample:
    """One measurement. ``usage_bytes`` against ``limit_bytes`` is what decisions use."""

    t: float
    usage_bytes: int
    limit_bytes: int
    source: str
    tree_bytes: int                  # worker tree RssAnon + RssShmem
    tree_rss_bytes: int              # worker tree VmRSS (counts shared pages once per process)
    tree_pids: int
    cgroup_usage_bytes: int | None   # raw, before inactive_file is subtracted
    inactive_file_bytes: int | None
    mem_available_bytes: int
    psi_some_avg10: float | None
    alive: bool


@dataclass(frozen=True)
class Leak:
    """The fit behind a "recycle"/"leak" decision (logged as memory_leak_detected)."""

    bytes_per_s: float
    window_s: float
    recent_peak_bytes: int
    time_to_soft_s: float


@dataclass(frozen=True)
class Decision:
    """What the supervisor should do now, and the numbers behind it."""

    action: str = "none"             # none | stop | recycle | term | kill
    # soft | predicted | predicted_fast | psi | hard | grace | margin | imminent | still_alive |
    # leak | age
    reason: str = ""
    usage_bytes: int = 0
    limit_bytes: int = 0
    source: str = ""
    soft_bytes: int = 0
    hard_bytes: int = 0
    # sustained growth: min(trend, recent) when both grow, else 0; computed from soft - (hard -
    # soft) up (below that nothing is predicted, and the robust trend is not worth its cost)
    rate_bytes_per_s: float = 0.0
    recent_rate_bytes_per_s: float = 0.0  # growth over the last second
    time_to_hard_s: float | None = None  # at that rate; None when not growing
    tree_bytes: int = 0
    psi_some_avg10: float | None = None
    # A long gap between polls means the supervisor itself was starved of CPU (or stopped):
    # the log says so, since it explains a late decision. None on a worker's first poll.
    since_last_poll_s: float | None = None
    leak: Leak | None = None         # set on "recycle"/"leak"

    def fields(self) -> dict[str, Any]:
        return {
            "action": self.action, "reason": self.reason, "usage_bytes": self.usage_bytes,
            "limit_bytes": self.limit_bytes, "source": self.source, "soft_bytes": self.soft_bytes,
            "hard_bytes": self.hard_bytes, "rate_bytes_per_s": round(self.rate_bytes_per_s),
            "recent_rate_bytes_per_s": round(self.recent_rate_bytes_per_s),
            "time_to_hard_s": None if self.time_to_hard_s is None else round(self.time_to_hard_s, 3),
            "tree_bytes": self.tree_bytes, "psi_some_avg10": self.psi_some_avg10,
        }
