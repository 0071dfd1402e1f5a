"""Whatever the input's files and row groups, the CPU stage gets blocks of one batch each, so every actor
of its pool can work (Ray hands a whole block to one actor)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.phi4mm import read_input
from tests.helpers import make_config

ROWS, BATCH = 40, 8


def _table(start: int, n: int) -> pa.Table:
    return pa.table({"id": [f"r{i}" for i in range(start, start + n)], "prompt": ["hi"] * n})


def _one_file_one_row_group(root):
    pq.write_table(_table(0, ROWS), root / "one.parquet", row_group_size=ROWS)


def _many_tiny_files(root):
    for i in range(ROWS):
        pq.write_table(_table(i, 1), root / f"tiny-{i:03d}.parquet")


@pytest.mark.parametrize("layout", [_one_file_one_row_group, _many_tiny_files])
def test_cpu_stage_blocks_are_one_batch_each(local_ray, tiny_model, tmp_path, layout):
    data = tmp_path / "in"
    data.mkdir()
    layout(data)
    config = make_config(
        tiny_model,
        tmp_path,
        input={"path": str(data)},
        resources={"preprocess": {"concurrency": 2, "batch_size": BATCH, "num_cpus": 0.5}},
    )
    done = pa.array(["r0", "r1"])  # a resumed run: done rows are dropped before the split
    sizes = [b.num_rows() for b in read_input(config, done).iter_internal_ref_bundles()]
    assert sorted(sizes, reverse=True) == [8, 8, 8, 8, 6]  # 38 rows left: split, or combined from 1-row files
