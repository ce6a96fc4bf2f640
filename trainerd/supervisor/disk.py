"""Free space under the root: no attempt starts below ``disk.min_free_bytes``, and a ballast
file keeps room for the ledger's last words on a full disk."""

from __future__ import annotations

import os
from typing import Any

from trainerd.core.contract import RootLayout
from trainerd.core.fsutil import free_bytes, write_ballast

__all__ = ["DiskSpace"]

# A ballast file under the root keeps this much of its file system for the ledger: when the
# disk fills, SQLite must still be able to record what happened.
RESERVE_BYTES = 1 << 20


class DiskSpace:
    def __init__(self, layout: RootLayout, log: Any):
        self.layout, self.log = layout, log
        self._low_seen = False  # remembered only to log the edges (disk_low / disk_ok)

    def free(self) -> int | None:
        return free_bytes(self.layout.root)

    def low(self, min_free_bytes: int) -> bool:
        """Free space is below ``min_free_bytes``: no attempt starts."""
        free = self.free()
        return free is not None and free < min_free_bytes

    def may_start(self, min_free_bytes: int, batch_id: int) -> bool:
        """False (and ``disk_low`` logged once) while space is low; ``disk_ok`` when it is back."""
        free = self.free()
        if free is not None and free < min_free_bytes:
            if not self._low_seen:
                self._low_seen = True
                self.log.error("disk_low", free_bytes=free, min_free_bytes=min_free_bytes,
                               batch=batch_id, action="waiting; the batch stays queued")
            return False
        if self._low_seen:
            self._low_seen = False
            self.log.info("disk_ok", free_bytes=free)
        return True

    def keep_reserve(self, min_free_bytes: int) -> None:
        """Hold ``root/.disk-reserve`` (1 MiB of real blocks) while space allows; release it as
        soon as the file system is nearly full, so the ledger's next commits have room (no
        SQLITE_FULL crash) and the batch can be requeued as ``disk_full``. Call it only while no
        worker runs, so a worker cannot eat the released room before the ledger uses it; it is
        made again once free space is back above ``min_free_bytes`` plus a margin."""
        path = self.layout.disk_reserve
        free = self.free()
        if free is None:
            return
        have = os.path.exists(path)
        if have and free < RESERVE_BYTES:
            try:
                os.unlink(path)
            except OSError:
                return
            self.log.error("disk_reserve_released", free_bytes=free, released_bytes=RESERVE_BYTES,
                           action="the file system is full: no new attempt until space is back")
        elif not have and free > 4 * RESERVE_BYTES + min_free_bytes:
            write_ballast(path, RESERVE_BYTES)
