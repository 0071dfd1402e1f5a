"""Prepare: before a run writes, refuse what the output's state forbids (``check_output_mode``,
``check_run_id_unused``: read-only, so validation calls them too); once the run holds the output's lock,
make the output ready (``prepare_output``): finish swaps cut short, remove what interrupted runs left
(``remove_stale_files``), and return the ids to skip."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.output.commit import committed_ids, named_parts, read_markers
from pipelines.output.interrupted import finish_interrupted_swaps
from pipelines.output.layout import MARKER_PREFIX, STAGING_PREFIX, TMP_DIR, name_of, parts_in, parts_of
from pipelines.output.lock import read_lock
from schemas.errors import JobError
from schemas.job import OutputConfig
from schemas.storage import filesystem_for

logger = logging.getLogger(__name__)


def check_output_mode(config: OutputConfig) -> None:
    """Refuse, before anything is touched, a run the output's state forbids (read-only)."""
    fs, root = filesystem_for(config.path)
    kind = fs.get_file_info(root).type
    if kind == pafs.FileType.File:
        raise JobError(
            f"output.path {config.path} is a file; the output is a directory of part files. "
            "Try a directory path (CLI: --output)."
        )
    if config.mode == "error" and (parts := parts_in(fs, root)):
        raise JobError(
            f"output {config.path} already holds {len(parts)} part files and output.mode is 'error'. "
            "Try output.mode: resume (skip rows already done) or overwrite (replace them) (CLI: --mode)."
        )
    if config.mode == "overwrite" and (strays := _strays(config.path)):
        raise JobError(
            f"output {config.path} holds {len(strays)} part files no run of this output wrote (no commit "
            f"marker names them; first: {', '.join(strays[:3])}). An overwrite deletes only the parts its "
            "runs committed, so these would stay in the new output. Try moving them out of the output "
            "directory (or deleting them if they are not needed), or another output.path (CLI: --output)."
        )


def _strays(uri: str) -> list[str]:
    """Part files in the output that no run of it committed: not named by a commit marker, nor by the name
    of the run holding the output's lock (still writing, or killed: the run taking its lock over names its
    parts in a marker first)."""
    fs, root = filesystem_for(uri)
    named = named_parts(read_markers(fs, root))
    holder = read_lock(uri)
    writing = parts_of(holder.run_id) if holder else None
    return [
        name_of(p) for p in parts_in(fs, root)
        if name_of(p) not in named and not (writing and writing.fullmatch(name_of(p)))
    ]  # fmt: skip


def check_run_id_unused(uri: str, run_id: str) -> None:
    """Refuse a run id the output already knows: its part names would replace that run's parts."""
    fs, root = filesystem_for(uri)
    names = (
        [f"{MARKER_PREFIX}{run_id}.json"] if run_id in {m["run_id"] for m in read_markers(fs, root)} else []
    )
    if not names and fs.get_file_info(root).type == pafs.FileType.Directory:  # the index read by name first
        own = parts_of(run_id)
        names = [
            f.base_name for f in fs.get_file_info(pafs.FileSelector(root, recursive=False))
            if own.fullmatch(f.base_name) or f.base_name in (f"{MARKER_PREFIX}{run_id}.json", f"_run-{run_id}.json")
        ]  # fmt: skip
    if names:
        raise JobError(
            f"run id {run_id} already wrote to output {uri} ({names[0]}); a second run under it would "
            "replace that run's parts. Try another --run-id, or leave it out for a fresh one."
        )


def prepare_output(config: OutputConfig) -> pa.Array:
    """Make the output ready for a run that holds its lock (``pipelines.output.lock``); return the ids to skip
    (non-empty only when resuming). Finishes a swap an earlier overwrite left half done, removes what
    interrupted runs left behind, then checks the mode. An overwrite deletes nothing here: the old parts
    stay until the new run swaps its own in (``commit_run``)."""
    fs, root = filesystem_for(config.path)
    check_output_mode(config)
    fs.create_dir(root, recursive=True)
    finish_interrupted_swaps(config.path)
    remove_stale_files(config.path)
    check_output_mode(config)  # a finished swap may have added parts
    return committed_ids(config.path) if config.mode == "resume" else pa.array([], pa.string())


def remove_stale_files(uri: str) -> int:
    """Remove what interrupted runs left: half-written files in ``_tmp/``, staging directories of overwrite
    runs that never committed, lock temporaries. Only safe with the output's lock held."""
    fs, root = filesystem_for(uri)
    removed = 0
    for f in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        name = f.base_name
        if f.type == pafs.FileType.Directory and (name == TMP_DIR or name.startswith(STAGING_PREFIX)):
            removed += sum(
                1
                for g in fs.get_file_info(pafs.FileSelector(f.path, recursive=True))
                if g.type == pafs.FileType.File
            )
            if name == TMP_DIR:
                fs.delete_dir_contents(f.path)
            else:
                fs.delete_dir(f.path)
        elif f.type == pafs.FileType.File and name.startswith("_lock.") and name != "_lock":
            fs.delete_file(f.path)
            removed += 1
    if removed:
        logger.warning("output %s: removed %d stale temporary files left by interrupted runs", uri, removed)
    return removed
