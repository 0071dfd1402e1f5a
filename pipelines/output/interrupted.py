"""Interrupted runs: a run that ended holding the output's lock without its commit marker gets one
(``record_interrupted_run``, called by ``pipelines.output.lock`` when it gives the lock back or takes it
over), and a swap cut short after its marker was written is finished (``finish_interrupted_swaps``,
called by ``prepare_output``)."""

from __future__ import annotations

import logging
import time

from pipelines.output.commit import SWAPPING_MODES, read_markers, swap, write_marker
from pipelines.output.layout import exists, name_of, part_name, parts_in, parts_of, staging_name
from schemas.storage import filesystem_for

logger = logging.getLogger(__name__)


def finish_interrupted_swaps(uri: str) -> list[str]:
    """Finish each overwrite whose marker was written but whose staging directory is still there (the
    run died mid-swap): the marker decided the swap, so it is rolled forward. Returns their run ids."""
    fs, root = filesystem_for(uri)
    finished = []
    for marker in read_markers(fs, root):
        if marker.get("mode") in SWAPPING_MODES and exists(fs, f"{root}/{staging_name(marker['run_id'])}"):
            logger.warning(
                "output %s: finishing the swap of overwrite run %s, cut short", uri, marker["run_id"]
            )
            swap(fs, root, marker)
            finished.append(marker["run_id"])
    return finished


def record_interrupted_run(uri: str, run_id: str, writers: int) -> dict | None:
    """Give a run that died holding the output's lock the commit marker it never wrote (mode
    ``interrupted``), naming the parts it committed in the output directory, so resume and the audit
    count them even where a listing lags behind writes. They are found by name as well as listed: each of
    the run's ``writers`` numbers its parts from 0 and commits them in order. Called, holding the lock, by
    the run that took it over; returns the marker, or None when there is nothing to record."""
    fs, root = filesystem_for(uri)
    if any(m["run_id"] == run_id for m in read_markers(fs, root)):
        return None
    parts = {name_of(p) for p in parts_in(fs, root) if parts_of(run_id).fullmatch(name_of(p))}
    for index in range(writers):
        n = 0
        while (name := part_name(run_id, index, n)) in parts or exists(fs, f"{root}/{name}"):
            parts.add(name)
            n += 1
    if not parts:
        return None
    marker = {"run_id": run_id, "mode": "interrupted", "parts": sorted(parts), "replaces": [],
              "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    write_marker(fs, root, marker)
    logger.warning("output %s: recorded the %d parts interrupted run %s committed", uri, len(parts), run_id)
    return marker
