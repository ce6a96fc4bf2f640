"""The ``trainerd`` command line: a process of its own, the supervisor side's client.

:mod:`.entry` is the entry point: it only assembles each command module's parser and runs the one
asked for. :mod:`.root` is the one module every command uses to find its root and its config. The
commands: :mod:`.daemon` (run, status, pause, resume), :mod:`.files` (submit, validate),
:mod:`.chain` (fsck, promote, rollback, rebase; :mod:`.history`), :mod:`.change` (a change asked of
the daemon, or applied under the root's lock), :mod:`.ops` (cancel, gc), :mod:`.logs`,
:mod:`.ask` (ask, learned), :mod:`.check`.

May import: the standard library, :mod:`trainerd.core` and :mod:`trainerd.supervisor` (its views,
its ledger, and for ``run`` and a direct change the daemon's rooms), lazily inside a command where
they are heavy; never :mod:`trainerd.worker` (``trainerd ask`` starts it as a child) and never torch
& co. A command module imports :mod:`.root` and the modules it shares, never :mod:`.entry`.
"""

from trainerd.cli.entry import main

__all__ = ["main"]
