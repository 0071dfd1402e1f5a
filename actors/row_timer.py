"""A time limit per row for the CPU stage (``media.preprocess_timeout_s``): see ``RowTimer``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from schemas.rows import ErrorCode, Status, empty_prepared_row

MAX_ABANDONED_ROWS = 4  # rows per actor still running past their time limit before new rows wait


class RowTimer:
    """Runs ``prepare(row)`` with a time limit, in a worker thread per row.

    Python cannot stop a thread, and decoding runs in C (Pillow, libsndfile, soxr) where no signal or
    check between steps reaches it, so a row past its limit is abandoned: the caller gets a
    ``PREPROCESS_TIMEOUT`` row at once and the rest of the batch goes on, while the thread runs to its end
    and its result is dropped. The media caps bound what such a thread can cost, and time-outs should be
    rare (a slow remote read, a pathological file within the caps). At most ``max_abandoned`` abandoned
    threads may run at once (one more per concurrent batch at a race): past that a new row first waits
    for one to finish, up to one more time limit, and is a ``PREPROCESS_TIMEOUT`` row if none does. While
    that is so, later rows do not wait again, so a stuck actor answers fast rather than a limit per row.
    Threads are daemons: an actor that exits never waits for them.
    """

    def __init__(self, limit_s: float, max_abandoned: int = MAX_ABANDONED_ROWS):
        self.limit_s = limit_s
        self.max_abandoned = max_abandoned
        self._abandoned: list[threading.Thread] = []
        self._saturated = False  # a row already waited a whole limit in vain for a slot
        self._lock = threading.Lock()  # Ray may call one actor from several threads (concurrent_batches)
        self.timed_out = 0  # PREPROCESS_TIMEOUT rows: abandoned ones and ones not started
        self.abandoned = 0  # threads left running past their limit (each one a timed-out row)

    def run(self, prepare: Callable[[dict], dict], row: dict, row_id) -> dict:
        """``prepare(row)``, or a ``PREPROCESS_TIMEOUT`` row for ``row_id`` when it is not done in time."""
        if not self._free_slot():
            return self._timeout_row(row_id, busy=True)
        result: dict = {}
        worker = threading.Thread(
            target=lambda: result.update(row=prepare(row)), name="preprocess-row", daemon=True
        )
        worker.start()
        worker.join(self.limit_s)
        if worker.is_alive():
            with self._lock:
                self._abandoned.append(worker)
                self.abandoned += 1
            return self._timeout_row(row_id, busy=False)
        if "row" not in result:  # prepare catches Exception; only a BaseException (SystemExit) gets here
            why = "preparing the row stopped its thread. This is a bug; please report it with the row."
            return _error_row(row_id, ErrorCode.PREPROCESS_ERROR, why)
        return result["row"]

    def stats(self) -> dict[str, int]:
        """Counts for the run summary: rows that timed out, threads abandoned so far, and how many of
        those are still running now (what they cost this actor's CPU and memory)."""
        with self._lock:
            running = sum(t.is_alive() for t in self._abandoned)
            return {"timed_out": self.timed_out, "abandoned": self.abandoned, "abandoned_running": running}

    def _free_slot(self) -> bool:
        deadline = time.monotonic() + self.limit_s
        while True:
            with self._lock:
                self._abandoned = [t for t in self._abandoned if t.is_alive()]
                if len(self._abandoned) < self.max_abandoned:
                    self._saturated = False
                    return True
                if self._saturated or time.monotonic() >= deadline:
                    self._saturated = True
                    return False
                oldest = self._abandoned[0]
            oldest.join(min(0.05, max(0.0, deadline - time.monotonic())))

    def _timeout_row(self, row_id, busy: bool) -> dict:
        with self._lock:
            self.timed_out += 1
        if busy:
            why = (
                f"was not started: {self.max_abandoned} earlier rows on this CPU actor are still running past "
                f"media.preprocess_timeout_s ({self.limit_s:g} s). Try smaller media or lower media.max_* "
                "caps for the rows that timed out, or raise media.preprocess_timeout_s"
            )
        else:
            why = (
                f"took longer than media.preprocess_timeout_s ({self.limit_s:g} s) and was abandoned. Try "
                "smaller media or lower media.max_* caps, or raise media.preprocess_timeout_s"
            )
        out = _error_row(row_id, ErrorCode.PREPROCESS_TIMEOUT, f"preparing the row {why}.")
        out["preprocess_s"] = 0.0 if busy else None  # the abandoned thread's CPU time is not known yet
        return out


def _error_row(row_id, code: ErrorCode, message: str) -> dict:
    out = empty_prepared_row(None if row_id is None else str(row_id))
    out.update(status=Status.ERROR.value, error_code=code.value, error_message=message)
    return out
