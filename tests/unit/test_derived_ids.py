"""Hugging Face datasets exports as they are (no id column): ``input.derived_ids`` makes each row's id from
its file and row (``pipelines.output.ids``), and every reader of ids (validation, a --limit run, resume's pending
files and skip sets, the read tasks, the dry run, the audit) sees the same ids."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import pipelines.output.ids as ids_mod
from jobs.run import main
from pipelines.incremental import done_among, pending_files
from pipelines.output.audit import audit
from pipelines.output.parts import write_part_files
from pipelines.validate import validate_job
from schemas.errors import JobError
from schemas.rows import OUTPUT_SCHEMA
from tests.helpers import MEDIA, make_config

# the ids of the export below: files relative to the input directory, rows counted from 0 in each
IDS = ["more/train-00001.parquet:0", "more/train-00001.parquet:1"] + [
    f"train-00000.parquet:{i}" for i in range(3)
]


def _export(folder, rows: int, with_id: bool = False):
    """What users have: ``Dataset.to_parquet()`` of local files (the image struct holds absolute paths)."""
    import datasets

    folder.parent.mkdir(parents=True, exist_ok=True)
    images = [str(MEDIA / name) for name in ("cat.jpg", "logo.png", "rocket.jpg")]
    data = {"image": [images[i % 3] for i in range(rows)], "prompt": [f"Describe {i}." for i in range(rows)]}
    if with_id:
        data["id"] = [f"r{i}" for i in range(rows)]
    datasets.Dataset.from_dict(data).cast_column("image", datasets.Image()).to_parquet(str(folder))


@pytest.fixture
def hf(tiny_model, tmp_path):
    """An export in two files (one in a sub-directory), its config (derived ids, the media's directory
    allowed), and the output's path."""
    _export(tmp_path / "hf" / "train-00000.parquet", 3)
    _export(tmp_path / "hf" / "more" / "train-00001.parquet", 2)
    config = make_config(
        tiny_model,
        tmp_path,
        input={"path": str(tmp_path / "hf"), "derived_ids": True, "columns": {"audio": None},
               "media_root": str(tmp_path / "hf"), "allowed_media_roots": [str(MEDIA)]},
        output={"path": str(tmp_path / "out"), "mode": "resume"},
    )  # fmt: skip
    return config, tmp_path / "out"


def _batches_ids(column) -> list[str]:
    return [i for _, _, batch in column.batches() for i in batch.to_pylist()]


def test_each_row_is_named_by_its_file_and_row_the_same_wherever_it_is_read(hf, monkeypatch):
    config, _ = hf
    monkeypatch.setattr(ids_mod, "BATCH_IDS", 2)  # batches that end inside a file
    plan = validate_job(config)
    ids = plan.input_ids
    assert _batches_ids(ids) == IDS and ids.rows == 5  # path order, rows in file order
    assert [(start, len(b)) for path, start, b in ids.batches() if path.endswith("00000.parquet")] == [
        (0, 2),
        (2, 1),
    ]
    read = [t.column("id").to_pylist() for path in plan.files for t in ids.tables(path, 2)]
    assert sum(read, []) == IDS  # the read tasks' ids (whole rows, in batches) are the same
    assert plan.schema.field("id").type == pa.string() and "id" not in pq.read_schema(plan.files[0]).names
    one = validate_job(
        config.model_copy(update={"input": config.input.model_copy(update={"path": plan.files[1]})})
    )
    assert _batches_ids(one.input_ids) == IDS[2:]  # one file as the input: its base name


def test_a_limit_resume_and_the_audit_use_the_derived_ids(hf):
    from pipelines.phi4mm import _read_files

    config, out = hf
    limited = config.model_copy(update={"input": config.input.model_copy(update={"limit": 3})})
    plan = validate_job(limited)
    assert plan.run_ids.to_pylist() == IDS[:3]
    # a killed or --limit run wrote the first three: the sub-directory's file is done, the other half
    done = pa.array(IDS[:3])
    write_part_files(pa.Table.from_pylist([{"id": i, "status": "ok"} for i in IDS[:3]], schema=OUTPUT_SCHEMA),
                     str(out), "first", 0, 100)  # fmt: skip
    plan = validate_job(config)
    assert pending_files(plan.input_ids, done) == [plan.files[1]]
    assert done_among(plan.input_ids, [plan.files[1]], done).to_pylist() == IDS[2:3]
    check = audit(plan.input_ids, str(out))
    assert not check.ok and check.missing_ids == 2 and check.unexpected_ids == 0
    # the read task of that file: the rows not done, with their ids, in the input's schema
    (read,) = list(_read_files(pa.table({"file": [plan.files[1]]}), plan.input_ids, 8, id_column="id",
                               done_ids=done, keep_ids=None, schema=plan.schema))  # fmt: skip
    assert read.column("id").to_pylist() == IDS[3:] and read.schema == plan.schema
    write_part_files(pa.Table.from_pylist([{"id": i, "status": "ok"} for i in IDS[3:]], schema=OUTPUT_SCHEMA),
                     str(out), "rest", 0, 100)  # fmt: skip
    assert audit(plan.input_ids, str(out)).ok


def test_the_dry_run_reports_rows_by_their_derived_ids(hf, tmp_path, capsys):
    config, _ = hf
    _export(tmp_path / "hf" / "zzz.parquet", 1)
    pq.write_table(pq.read_table(tmp_path / "hf" / "zzz.parquet").drop_columns(["image"])
                   .append_column("image", pa.array([{"bytes": None, "path": "/elsewhere/x.png"}])),
                   tmp_path / "hf" / "zzz.parquet")  # fmt: skip
    raw = json.loads(config.model_dump_json(exclude_defaults=True))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    assert main(["--config", str(tmp_path / "job.yaml"), "--dry-run"]) == 0
    report = json.loads(capsys.readouterr().out.split("DRY_RUN_JSON ", 1)[1])
    assert report["rows"] == 6 and report["status"] == {"ok": 5, "error": 1}
    (refused,) = report["error_examples"]["MEDIA_PATH_REFUSED"]
    assert (
        refused["id"] == "zzz.parquet:0" and "input.allowed_media_roots: ['/elsewhere']" in refused["message"]
    )


def test_an_export_without_ids_is_refused_with_the_setting_that_derives_them(hf, tmp_path):
    config, _ = hf
    plain = config.model_copy(update={"input": config.input.model_copy(update={"derived_ids": False})})
    with pytest.raises(JobError, match=r"has no id column 'id'.*input\.derived_ids: true"):
        validate_job(plain)
    _export(tmp_path / "hf" / "with-ids.parquet", 2, with_id=True)  # an id column, and derived ids asked for
    with pytest.raises(
        JobError, match=r"has a column 'id'.*Try input\.columns\.id: id without input\.derived_ids"
    ):
        validate_job(config)
