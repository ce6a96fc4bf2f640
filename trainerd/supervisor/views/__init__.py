"""Read-only views of a root: ``trainerd status`` (status.py), the health conditions of ``trainerd
check`` and of the metrics (health.py), a version's held-out figures (heldout.py), and how much of a
long list a view shows (paging.py). The CLI reads them in its own process; the supervisor's metrics
and lineage use them in the daemon's.

May import: the standard library, :mod:`trainerd.core`, and the ledger read-only
(:mod:`trainerd.supervisor.ledger`); nothing of the daemon's loop, never torch & co., and only
lightly: ``trainerd status`` imports this package and answers in tens of milliseconds.
"""
