"""Where things are in the output directory, and the file operations every step of the output shares:
the names (``part-*.parquet``, ``_tmp/``, ``_staging-<run>/``, ``_committed-<run>.json``,
``_committed.json``), listing the parts, writing a file whole. The lowest module of ``pipelines.output``:
it imports none of the others."""

from __future__ import annotations

import re
import uuid

import pyarrow.fs as pafs

from schemas.storage import is_object_store

PART_PREFIX = "part-"
TMP_DIR = "_tmp"  # pyarrow and Ray ignore names starting with '_' or '.' when reading a directory
STAGING_PREFIX = "_staging-"  # an overwrite run's committed parts, until the swap
MARKER_PREFIX = "_committed-"
COMMIT_INDEX = "_committed.json"  # every run's marker in one object, read by name: no listing involved

# Writer actors of a run (pipelines.output.writer), each numbering its parts from 0 (part_name): writing a
# part takes milliseconds per thousand rows, so one writer keeps up with any engine pool.
WRITERS = 1


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def name_of(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def is_dir(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.Directory


def staging_name(run_id: str) -> str:
    return f"{STAGING_PREFIX}{run_id}"


def parts_in(fs: pafs.FileSystem, directory: str) -> list[str]:
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        return []
    return sorted(
        f.path for f in fs.get_file_info(pafs.FileSelector(directory, recursive=False))
        if f.type == pafs.FileType.File and f.base_name.startswith(PART_PREFIX) and f.base_name.endswith(".parquet")
    )  # fmt: skip


def parts_of(run_id: str) -> re.Pattern:
    """The names ``part_name`` gives a run's parts."""
    return re.compile(rf"{PART_PREFIX}{re.escape(run_id)}-\d{{6}}-\d{{4,}}\.parquet")


def part_name(run_id: str, task_idx: int, chunk_idx: int) -> str:
    # Unique in a run: writers number their parts on. The same name written again (a test's retry)
    # replaces the earlier file instead of adding to it.
    return f"{PART_PREFIX}{run_id}-{task_idx:06d}-{chunk_idx:04d}.parquet"


def write_atomically(fs: pafs.FileSystem, root: str, name: str, data: bytes) -> None:
    if is_object_store(fs):  # an upload appears whole or not at all
        upload(fs, f"{root}/{name}", data)
        return
    fs.create_dir(f"{root}/{TMP_DIR}", recursive=True)
    tmp = f"{root}/{TMP_DIR}/{name}.{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as sink:
        sink.write(data)
    fs.move(tmp, f"{root}/{name}")


def upload(fs: pafs.FileSystem, path: str, data) -> None:
    # Not `with`: a failed write must not be followed by a close, which would complete the upload.
    stream = fs.open_output_stream(path)
    stream.write(data)
    stream.close()
