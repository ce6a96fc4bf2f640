"""The trainer's first pass over a batch: the frozen split, the training source, and the scan
(validate, count, tokenize once; reused from scan.json while the file is unchanged).

Under torchrun rank 0 does it; the other ranks wait for its split.json and scan.json
(:func:`wait_for_lead`) and read the same answers.
"""

from __future__ import annotations

import os
import time
from typing import Any

from trainerd.core.contract import BatchFiles, RootLayout
from trainerd.core.fsutil import atomic_write_json, read_json
from trainerd.core.lines import ScanReport
from trainerd.core.replay import Store
from trainerd.worker import checkpoint as ckpt
from trainerd.worker.data import DataError, Encoder, Interrupted, TrainSource, scan
from trainerd.worker.split import Split, load_split

__all__ = ["cached_scan", "first_pass", "wait_for_lead"]


def cached_scan(files: BatchFiles, seq_len: int) -> ScanReport | None:
    """scan.json when it still describes data.jsonl at this seq_len; None when there is none to
    reuse. A changed file under complete checkpoints is bad data: they no longer match it."""
    try:
        d = read_json(files.scan)
    except (OSError, ValueError):
        return None
    st = os.stat(files.data)
    if d.get("size") != st.st_size or d.get("mtime_ns") != st.st_mtime_ns or d.get("seq_len") != seq_len:
        if ckpt.complete(files.checkpoints):
            raise DataError("data file changed since it was scanned: size or mtime differ; "
                            "its checkpoints no longer match it")
        return None
    return ScanReport.from_cache(str(files.data), d)


def wait_for_lead(files: BatchFiles, seq_len: int, stopper: Any, log: Any) -> bool:
    """Not rank 0: wait (without a heartbeat: rank 0's is the attempt's) until rank 0 has split
    and scanned the file; False when a stop came first. Rank 0 exiting (bad data, a crash) makes
    torchrun stop this rank too."""
    t0 = time.monotonic()
    while not (files.split.is_file() and cached_scan(files, seq_len) is not None):
        if stopper.check() is not None:
            return False
        time.sleep(0.2)
    log.debug("lead_scanned", waited_s=round(time.monotonic() - t0, 2))
    return True


def first_pass(files: BatchFiles, settings: Any, encoder: Encoder, stopper: Any,
               log: Any) -> tuple[Split, TrainSource, ScanReport | None]:
    """The split, the source it defines (own lines and the replay draw), and the scan; the scan
    is None when a stop came first."""
    split = load_split(files) or Split(own_lines=0)
    d = settings.data
    source = TrainSource(files.data, max_line_bytes=d.max_line_bytes, skip=split.skip(),
                         replay=files.replay if split.replay_lines else None,
                         own_total=split.own_lines, replay_total=split.replay_lines)
    sc = cached_scan(files, settings.train.seq_len)
    if sc is None:
        t0 = time.monotonic()
        try:
            sc = scan(source, encoder, seq_len=settings.train.seq_len,
                      chunk_lines=d.chunk_lines, max_bad_fraction=d.max_bad_fraction,
                      contrib=files.replay_contrib,
                      contrib_threshold=Store.open(RootLayout(settings.root).replay).threshold,
                      errors_path=files.errors, max_errors=d.max_errors_reported,
                      should_stop=lambda: stopper.check() is not None)
        except Interrupted:
            return split, source, None
        atomic_write_json(files.scan, sc.as_cache())
        log.info("data_scanned", lines=sc.lines, good=sc.good, bad=sc.bad, blank=sc.blank,
                 tokens=sc.tokens, blocks_per_epoch=sc.blocks_per_epoch, scan_s=round(time.monotonic() - t0, 2))
    return split, source, sc
