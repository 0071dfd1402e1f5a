"""Ids in bounded memory (pipelines.output.ids): the bucketed path (forced with a tiny bucket) finds exactly what
the in-memory path finds, for validation and the audit, and never holds more than a bucket of ids."""

import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import pipelines.output.ids as ids_mod
from pipelines.output.audit import Audit, audit
from pipelines.output.ids import IdColumn, bucket_of, count_in, id_strings
from pipelines.output.parts import write_part_files
from pipelines.validate import check_ids
from schemas.errors import JobError
from schemas.rows import OUTPUT_SCHEMA

IN_MEMORY = 10**9  # one bucket whatever the data: the fast path
TINY = 64  # many buckets even for a few hundred ids


def _bucket(monkeypatch, n):
    monkeypatch.setattr(ids_mod, "BUCKET_IDS", n)


def _column(tmp_path, arrays, name="in"):
    """One Parquet file per array (an id type each), as validation's IdColumn sees them."""
    root = tmp_path / name
    root.mkdir()
    for i, array in enumerate(arrays):
        pq.write_table(pa.table({"id": array, "x": pa.nulls(len(array))}), root / f"f{i}.parquet")
    files = sorted(str(p) for p in root.iterdir())
    return IdColumn.of_files(pafs.LocalFileSystem(), files, "id", str(root))


def _typed_files(values):
    """The same ids spread over files of several Arrow types, in order."""
    cut = [0, len(values) // 4, len(values) // 2, 3 * len(values) // 4, len(values)]
    chunks = [values[a:b] for a, b in zip(cut, cut[1:], strict=False)]
    return [
        pa.array([None if v is None else int(v) for v in chunks[0]], pa.int64()),
        pa.array([None if v is None else float(v) for v in chunks[1]], pa.float64()),
        pa.array(chunks[2], pa.large_string()),
        pa.array(chunks[3], pa.string()).dictionary_encode(),
    ]


def _write_output(out, ids, run="r1"):
    rows = [{"id": i, "status": "ok"} for i in ids]
    write_part_files(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), str(out), run, 0, 97)


def _expected_audit(inputs, run, outputs):
    """The audit's definition, by Counter, as a third opinion."""
    key = {None: "\x00null"}
    inputs, outputs = [key.get(i, i) for i in inputs], [key.get(i, i) for i in outputs]
    run = inputs if run is None else [key.get(i, i) for i in run]
    known, wanted = set(inputs), Counter(run)
    mine = [o for o in outputs if o in wanted]
    have = Counter(mine)
    return Audit(
        input_rows=len(run),
        output_rows=len(mine),
        missing_ids=sum(max(n - have[i], 0) for i, n in wanted.items()),
        duplicate_ids=sum(max(n - wanted[i], 0) for i, n in have.items()),
        unexpected_ids=sum(1 for o in outputs if o not in known),
    )


def test_equal_ids_share_a_bucket_whatever_the_batch():
    values = [f"id-{random.Random(1).random()}-{i}" for i in range(2000)] + ["", "x" * 5000]
    whole = bucket_of(pa.array(values), 7)
    parts = np.concatenate([bucket_of(pa.array(values)[i : i + 333], 7) for i in range(0, len(values), 333)])
    assert (whole == parts).all()  # slices (non-zero offsets) hash the same
    assert (bucket_of(pa.array(values), 7) == whole).all()  # deterministic
    assert set(np.bincount(whole[:2000], minlength=7)) <= set(range(200, 400))  # spread evenly
    assert (bucket_of(pa.array(["a", None, "b"]), 5)[[1]] == bucket_of(pa.array([""]), 5)).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_bucketed_audit_finds_what_the_in_memory_audit_finds(tmp_path, monkeypatch, seed):
    rng = random.Random(seed)
    values = [str(i) for i in rng.sample(range(10**6), 600)]
    values[5] = values[400]  # an id repeated in the input
    columns = _column(tmp_path, _typed_files(values))
    inputs = id_strings(pa.concat_arrays([id_strings(a) for a in _typed_files(values)])).to_pylist()
    outputs = [v for v in inputs if rng.random() > 0.1]  # some missing
    outputs += rng.sample(outputs, 30) + ["stray-1", "stray-2", None]  # duplicated, unexpected, null
    rng.shuffle(outputs)
    out = tmp_path / "out"
    _write_output(out, outputs[:300], "r1")
    _write_output(out, outputs[300:], "r2")
    for run in (None, pa.array(inputs[:100])):
        results = []
        for size in (IN_MEMORY, TINY):
            _bucket(monkeypatch, size)
            results.append(audit(columns, str(out), run))
            results.append(audit(pa.array(inputs), str(out), run))  # ids in memory: same answer
        expected = _expected_audit(inputs, None if run is None else run.to_pylist(), outputs)
        assert results == [expected] * 4 and not expected.ok
        assert expected.missing_ids and expected.duplicate_ids and expected.unexpected_ids == 3


def _check_message(column, limit=None):
    try:
        return check_ids(column, limit)
    except JobError as e:
        return str(e)


@pytest.mark.parametrize("case", ["clean", "repeated", "blank"])
def test_bucketed_validation_names_the_same_offenders(tmp_path, monkeypatch, case):
    rng = random.Random(7)
    values = [str(i) for i in rng.sample(range(10**6), 800)]
    if case == "repeated":
        for i in rng.sample(range(800), 40):  # 40 repeats, some of them of one id
            values[i] = values[rng.randrange(800)]
    if case == "blank":
        for i in (3, 250, 420, 421, 700, 799):
            values[i] = None
    column = _column(tmp_path, _typed_files(values))
    found = []
    for size in (IN_MEMORY, TINY):
        _bucket(monkeypatch, size)
        found.append(_check_message(column, limit=50))
    assert found[0] == found[1] if isinstance(found[0], str) else found[0].equals(found[1])
    if case == "clean":
        assert found[0].to_pylist() == values[:50]
    elif case == "repeated":
        strings = id_strings(pa.concat_arrays([id_strings(a) for a in _typed_files(values)])).to_pylist()
        counts = Counter(strings)
        firsts = [v for v in dict.fromkeys(strings) if counts[v] > 1]  # in order of first occurrence
        shown = ", ".join(f"{v!r} x{counts[v]}" for v in firsts[:5])
        assert f"repeated ids: {shown} and {len(firsts) - 5} more." in found[0]
    else:
        assert "null or empty in 6 rows" in found[0] and "f0.parquet row 3" in found[0]
        assert "f1.parquet row 50" in found[0]  # the row in its own file


def test_no_step_holds_more_than_a_bucket_of_ids(tmp_path, monkeypatch):
    """200,000 ids with buckets of 1,000: every step (read batch, spill buffer, bucket) is counted."""
    _bucket(monkeypatch, 1000)
    held = []
    monkeypatch.setattr(ids_mod, "observe", held.append)
    n = 200_000
    values = pa.array([f"row-{i:07d}" for i in range(n)])
    column = _column(tmp_path, [values.slice(i, n // 4) for i in range(0, n, n // 4)])
    assert check_ids(column) is None
    assert max(held) <= 1000 and sum(1 for h in held if h) > n // 1000  # many steps, each small
    out = tmp_path / "out"
    half = values.slice(0, n // 2).to_pylist()
    _write_output(out, half[:60_000], "a")
    _write_output(out, half[60_000:], "b")
    held.clear()
    result = audit(column, str(out))
    assert (result.input_rows, result.output_rows, result.missing_ids) == (n, n // 2, n // 2)
    assert max(held) <= 1000
    held.clear()
    assert count_in(column.batches(), pa.array(half[:10])) == 10  # resume's skipped count, streamed
    assert max(held) <= 1000


def test_small_inputs_stay_in_memory(tmp_path, monkeypatch):
    """Up to a bucket of ids: one bucket, no temporary files (as fast as holding the ids was)."""
    monkeypatch.setattr(ids_mod.tempfile, "TemporaryDirectory", lambda **kw: pytest.fail("spilled"))
    column = _column(tmp_path, _typed_files([str(i) for i in range(500)]))
    assert check_ids(column, limit=3).to_pylist() == ["0", "1", "2"]
    _write_output(tmp_path / "out", [str(i) for i in range(500)])
    assert audit(column, str(tmp_path / "out")).ok
