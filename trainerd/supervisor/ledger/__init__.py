"""The SQLite ledger (``root/state.db``): the one source of truth for batches, attempts and
adapter versions.

Single writer: the supervisor. Every state change is ``UPDATE ... WHERE id=? AND state=?``
and raises :class:`LedgerConflict` when the row was not in the state the caller believed, so
a logic error shows up as a loud failure instead of a batch trained twice. The transition
table itself lives in :mod:`trainerd.supervisor.ledger.states`. Every transition returns the row as it now is
(a frozen :class:`Batch`): nobody re-reads what they just wrote.

Durability: WAL with ``synchronous=FULL`` (every commit is fsynced before it returns; the
default NORMAL could lose the last commits on power loss, and a claim that is on disk as a
rename but not in the ledger is exactly what reconcile must then guess at). Readers
(``trainerd status``) open the file read-only and never block the writer (WAL).

The tables, their version and the migrations between versions are in :mod:`trainerd.supervisor.ledger.schema`.

This package is the ledger and what its rows mean: the Ledger (store.py, batches.py, life.py,
attempts.py, versions.py), states.py (the transition table), rows.py (the
frozen rows), schema.py and aggregates.py (tables, migrations, running totals), goodput.py (the
accounts kept per batch). May import: the standard library (sqlite3) and :mod:`trainerd.core`;
nothing of the daemon's loop (the views and the CLI open it read-only).
"""

from __future__ import annotations

from trainerd.supervisor.ledger.attempts import AttemptRows
from trainerd.supervisor.ledger.batches import BatchRows
from trainerd.supervisor.ledger.life import BatchLife
from trainerd.supervisor.ledger.rows import AdapterVersion, Attempt, AttemptRecord, Batch, BatchSummary, decided_end
from trainerd.supervisor.ledger.schema import LedgerTooNew
from trainerd.supervisor.ledger.store import LedgerConflict
from trainerd.supervisor.ledger.versions import VersionRows

__all__ = ["AdapterVersion", "Attempt", "AttemptRecord", "Batch", "BatchSummary", "Ledger", "LedgerConflict",
           "LedgerTooNew", "decided_end"]


class Ledger(BatchLife, VersionRows, AttemptRows, BatchRows):
    """Read/write access for the supervisor; :meth:`open_readonly` for everyone else. Its records,
    one room each: the batches read (batches.py) and their life (life.py), the attempts
    (attempts.py), the adapter versions (versions.py), over the store (store.py)."""
