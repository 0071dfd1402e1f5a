"""One writer per output: the lock file ``_lock`` in the output directory.

A run takes the lock before it changes anything in the output and gives it back at the end. The file
holds the run's id, host, pid and a heartbeat time the run refreshes every ``HEARTBEAT_S``; a second run
finds it and stops at once (``JobError``: exit status 2). A lock whose run is gone is taken over, and the
log says so: at once when the run was on this host and its process is dead, otherwise once its heartbeat
is older than ``STALE_AFTER_S``. Write tasks check the lock before each commit (``assert_lock_held``), so
a run whose lock was taken over (it froze for ten minutes, or its driver died while tasks went on) stops
committing instead of writing beside the new owner.

Local directories get an exclusive create (``O_EXCL``), so two runs never both win. Object stores have
no exclusive create in pyarrow: there the lock is written and read back, which leaves a window of a
request's latency in which two runs starting together could both proceed (docs/reliability.md, "Reliability").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

import pyarrow.fs as pafs

from pipelines.output.interrupted import record_interrupted_run
from pipelines.output.layout import WRITERS
from schemas.errors import JobError
from schemas.storage import filesystem_for, unwritable

logger = logging.getLogger(__name__)

LOCK_NAME = "_lock"  # '_': readers of the Parquet directory ignore it
STALE_AFTER_S = 600.0
HEARTBEAT_S = 30.0


class LockLost(RuntimeError):
    """The output's lock no longer names this run: another run took it over. Nothing more is committed."""


@dataclass(frozen=True)
class LockInfo:
    run_id: str
    host: str
    pid: int
    started: float
    heartbeat: float

    def describe(self, now: float | None = None) -> str:
        age = (now or time.time()) - self.heartbeat
        return f"run {self.run_id} (host {self.host}, pid {self.pid}, last heartbeat {age:.0f} s ago)"

    def stale_reason(self, now: float, stale_after_s: float) -> str | None:
        """Why the lock's run is gone, or None while it may still be running."""
        if now - self.heartbeat > stale_after_s:
            return f"its heartbeat is {now - self.heartbeat:.0f} s old (over {stale_after_s:.0f} s)"
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return f"its process {self.pid} on this host has ended"
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _fs_and_root(uri: str) -> tuple[pafs.FileSystem, str]:
    return filesystem_for(uri)


def _local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def read_lock(uri: str) -> LockInfo | None:
    """The lock of the output at ``uri``, or None when it is free."""
    fs, root = _fs_and_root(uri)
    path = f"{root}/{LOCK_NAME}"
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise
    try:
        return LockInfo(**json.loads(data))
    except (ValueError, TypeError):
        # Written by a process that died between creating and filling it: only its age tells.
        mtime = fs.get_file_info(path).mtime
        stamp = mtime.timestamp() if mtime else 0.0
        return LockInfo(run_id="unknown", host="", pid=0, started=stamp, heartbeat=stamp)


def assert_lock_held(uri: str, run_id: str) -> None:
    """Raise LockLost unless the output's lock names ``run_id`` (checked before each commit)."""
    held = read_lock(uri)
    if held is None or held.run_id != run_id:
        owner = held.describe() if held else "nobody"
        raise LockLost(
            f"run {run_id} no longer holds the lock of output {uri} (it is held by {owner}): it stops "
            "committing so two runs never write the same output. Try output.mode: resume once no run writes it."
        )


class OutputLock:
    """``with OutputLock(uri, run_id):`` holds the output's lock, with a heartbeat thread."""

    def __init__(
        self, uri: str, run_id: str, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S
    ):
        self.uri, self.run_id = uri, run_id
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.fs, self.root = _fs_and_root(uri)
        self.path = f"{self.root}/{LOCK_NAME}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: LockInfo | None = None  # the stale lock this run replaced, if any

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> OutputLock:
        """Take the lock: the run's first write to the output, so an output it cannot write (a bucket that
        does not exist, credentials that may not write) is a JobError here, with nothing written."""
        try:
            self.fs.create_dir(self.root, recursive=True)
            return self._acquire()
        except OSError as e:
            raise unwritable(self.uri, e) from None

    def _acquire(self) -> OutputLock:
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                if self.took_over is not None:  # its parts get the marker it never wrote
                    self._record(self.took_over.run_id)
                return self
            held = read_lock(self.uri)
            if held is None:
                continue  # released between our create and our read: try again
            now = time.time()
            reason = held.stale_reason(now, self.stale_after_s)
            if reason is None:
                raise JobError(
                    f"output {self.uri} is being written by {held.describe(now)}; one run writes an output at "
                    f"a time. Try again when that run has ended, or another output.path (the lock of a run "
                    f"that died is taken over: at once on its host, after {self.stale_after_s / 60:.0f} min "
                    "elsewhere)."
                )
            logger.warning(
                "taking over the lock of output %s from %s: %s", self.uri, held.describe(now), reason
            )
            self.took_over = held
            self._remove_stale(held)
        raise JobError(f"could not take the lock of output {self.uri}: other runs keep taking it. Try again.")

    def _record(self, run_id: str) -> None:
        """Give ``run_id`` (a run that ended without its commit marker) a marker naming its parts."""
        try:
            record_interrupted_run(self.uri, run_id, WRITERS)
        except OSError as e:  # a correction for lagging listings: without it resume lists them as before
            logger.warning("output %s: could not record interrupted run %s's parts (%s)", self.uri, run_id, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
            self._thread = None
        held = read_lock(self.uri)
        if held is not None and held.run_id == self.run_id:
            # A run that failed or was stopped committed parts but no marker: name them, so that they
            # count as this output's (an overwrite replaces only parts a marker names). A finished run
            # has its marker, and nothing is written.
            self._record(self.run_id)
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(self.path)

    def _info(self, started: float | None = None) -> bytes:
        now = time.time()
        info = LockInfo(self.run_id, socket.gethostname(), os.getpid(), started or now, now)
        return json.dumps(asdict(info)).encode()

    def _create(self) -> bool:
        """Create the lock file if there is none; True when this run now holds it."""
        if _local(self.fs):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._info())
                f.flush()
                os.fsync(f.fileno())
            return True
        # Object stores: no exclusive create; write, then read back to see who won a near-simultaneous race.
        if self.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
            return False
        with self.fs.open_output_stream(self.path) as f:
            f.write(self._info())
        held = read_lock(self.uri)
        return held is not None and held.run_id == self.run_id

    def _remove_stale(self, stale: LockInfo) -> None:
        if not _local(self.fs):
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(self.path)
            return
        # Move the stale lock aside (atomic: only one taker succeeds), then make sure it was the stale
        # one we judged and not a fresh lock another taker created meanwhile; put a fresh one back.
        aside = f"{self.path}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = read_json(aside)
            if moved is not None and (moved.get("run_id"), moved.get("heartbeat")) != (
                stale.run_id,
                stale.heartbeat,
            ):
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(aside)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="output-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                held = read_lock(self.uri)
                if held is None or held.run_id != self.run_id:
                    logger.error(
                        "the lock of output %s was taken over by %s: this run commits nothing more",
                        self.uri,
                        held.describe() if held else "nobody",
                    )
                    return
                self._write(self._info(started=held.started))
            except OSError as e:  # a flaky store: the next beat tries again, staleness takes 10 min
                logger.warning("could not refresh the lock of output %s: %s", self.uri, e)

    def _write(self, data: bytes) -> None:
        if _local(self.fs):
            tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)  # readers never see a half-written lock
        else:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)


def read_json(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None
