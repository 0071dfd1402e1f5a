"""Commit: the commit markers ``_committed-<run>.json``, kept together in ``_committed.json``, name the
parts each finished run wrote and those an overwrite replaced (``commit_run``); an overwrite's or a
retry's swap then moves its staged parts in (``swap``). ``committed_parts`` reads the output as the markers
correct a lagging listing. ``write_manifest`` writes the run's manifest, last."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipelines.output.ids import id_strings
from pipelines.output.layout import (
    COMMIT_INDEX,
    MARKER_PREFIX,
    exists,
    is_dir,
    name_of,
    parts_in,
    staging_name,
    write_atomically,
)
from schemas.storage import filesystem_for

logger = logging.getLogger(__name__)

# Runs whose marker is followed by a swap of staged parts (finished by the next run if cut short): an
# overwrite, and a retry of error rows (``pipelines.output.retry``).
SWAPPING_MODES = ("overwrite", "retry")


def committed_parts(uri: str) -> list[str]:
    """The output's part files: every ``part-*.parquet`` directly under ``uri`` (what readers read), as
    the commit markers correct a listing that lags behind writes and deletes: parts a finished run's
    marker names are included when they exist (asked by name, which does not lag), parts an overwrite
    replaced are left out."""
    fs, root = filesystem_for(uri)
    listed = {name_of(p) for p in parts_in(fs, root)}
    named, replaced = set(), set()
    for marker in read_markers(fs, root):
        named.update(marker.get("parts", []))  # an overwrite's: those its swap already moved in
        replaced.update(marker.get("replaces", []))
    late = {n for n in named - listed - replaced if exists(fs, f"{root}/{n}")}
    if late:
        logger.info("output %s: %d committed parts not listed yet (the store's listing lags)", uri, len(late))
    return sorted(f"{root}/{n}" for n in (listed | late) - replaced)


def committed_ids(uri: str) -> pa.Array:
    """Ids (string form) of every row in the output's part files (empty when there are none)."""
    parts = committed_parts(uri)
    if not parts:
        return pa.array([], pa.string())
    fs, _ = filesystem_for(uri)
    table = pads.dataset(parts, filesystem=fs, format="parquet").to_table(columns=["id"])
    return id_strings(table.column("id"))


def named_parts(markers: Iterable[dict]) -> set[str]:
    """The parts the runs of this output committed: every part its commit markers name."""
    return {name for marker in markers for name in marker.get("parts", [])}


def read_markers(fs: pafs.FileSystem, root: str) -> list[dict]:
    """Every finished run's commit marker: those in the commit index ``_committed.json`` (read by name,
    so a lagging listing cannot hide one) and any marker file the index lacks (a run that died between
    writing its marker and the index, or an output written before the index existed)."""
    found = {m["run_id"]: m for m in _read_index(fs, root)}
    if not is_dir(fs, root):
        return list(found.values())
    for f in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        if (
            f.type == pafs.FileType.File
            and f.base_name.startswith(MARKER_PREFIX)
            and f.base_name.endswith(".json")
            and f.base_name[len(MARKER_PREFIX) : -len(".json")] not in found
        ):
            with fs.open_input_stream(f.path) as stream:
                marker = json.loads(stream.read())
            found[marker["run_id"]] = marker
    return list(found.values())


def _read_index(fs: pafs.FileSystem, root: str) -> list[dict]:
    try:
        with fs.open_input_stream(f"{root}/{COMMIT_INDEX}") as stream:
            return json.loads(stream.read())["runs"]
    except FileNotFoundError:
        return []


def commit_run(uri: str, run_id: str, mode: str, parts: list[str]) -> dict:
    """Record what a finished run committed in ``_committed-<run_id>.json``; for an overwrite, swap its
    staged parts in for every old part (the marker is written first, so a swap cut short is finished by
    the next run). Returns the marker."""
    fs, root = filesystem_for(uri)
    if mode == "overwrite":
        # the parts the run reports, plus any a retried task left that it no longer reports
        parts = sorted({*parts, *(name_of(p) for p in parts_in(fs, f"{root}/{staging_name(run_id)}"))})
        # only parts this output's runs committed: a part file none of them wrote is never deleted
        named = named_parts(read_markers(fs, root))
        replaces = [n for n in map(name_of, committed_parts(uri)) if n not in parts and n in named]
    else:
        replaces = []
    marker = {
        "run_id": run_id,
        "mode": mode,
        "parts": sorted(parts),
        "replaces": replaces,
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_marker(fs, root, marker)
    if mode == "overwrite":
        swap(fs, root, marker)
    return marker


def write_marker(fs: pafs.FileSystem, root: str, marker: dict) -> None:
    run_id = marker["run_id"]
    write_atomically(fs, root, f"{MARKER_PREFIX}{run_id}.json", json.dumps(marker, indent=1).encode())
    # Only the run holding the output's lock writes here, so rewriting the index cannot lose another's entry.
    runs = [m for m in read_markers(fs, root) if m["run_id"] != run_id] + [marker]
    write_atomically(fs, root, COMMIT_INDEX, json.dumps({"runs": runs}).encode())


def swap(fs: pafs.FileSystem, root: str, marker: dict) -> None:
    # New parts in first, old ones out second: a reader meanwhile sees every old row or every new one
    # (for a moment both), never an empty output.
    staging = f"{root}/{staging_name(marker['run_id'])}"
    for name in marker["parts"]:
        if exists(fs, f"{staging}/{name}"):
            fs.move(f"{staging}/{name}", f"{root}/{name}")
    named = named_parts(m for m in read_markers(fs, root) if m["run_id"] != marker["run_id"])
    for name in marker["replaces"]:
        if name not in named:  # a marker written before this rule may name a file no run wrote: kept
            logger.warning("output %s: kept %s, which no run of this output wrote", root, name)
        elif exists(fs, f"{root}/{name}"):
            fs.delete_file(f"{root}/{name}")
    ours = named | set(marker["parts"])
    if strays := [n for n in map(name_of, parts_in(fs, root)) if n not in ours]:
        logger.warning(
            "output %s: %d part files no run of this output wrote stay beside the new output (first: %s)",
            root, len(strays), ", ".join(strays[:3]),
        )  # fmt: skip
    if exists(fs, staging):
        fs.delete_dir(staging)


def write_manifest(uri: str, run_id: str, summary: dict, plot_png: bytes | None = None) -> None:
    """``_run-<run_id>.json`` beside the output, written last (its appearance says the run is over); the
    run's rate plot ``_run-<run_id>.png`` just before it."""
    fs, root = filesystem_for(uri)
    if plot_png is not None:
        write_atomically(fs, root, f"_run-{run_id}.png", plot_png)
    write_atomically(fs, root, f"_run-{run_id}.json", json.dumps(summary, indent=1, default=str).encode())
