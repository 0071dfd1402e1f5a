"""bench.dataset: distinct, decodable media in the sample data's schema, in each layout."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from actors.media.decode import MediaSource, default_media_root, load_bytes
from bench.dataset import AUDIO_RATES, build_dataset, parse_mix
from jobs.make_sample_data import SCHEMA

SMALL = {"rows": 40, "max_megapixels": 0.05, "audio_seconds": (1.0, 2.5)}  # tiny media: a fast test


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("bench-data"), seed=3, workers=2, **SMALL)


@pytest.fixture(scope="module")
def rows(built):
    return pq.read_table(built.path).to_pylist()


def _media(rows):
    return [(column, row[column]["bytes"]) for row in rows for column in ("image", "audio") if row[column]]


def test_kinds_follow_the_default_mix(built, rows):
    assert built.counts == {"image": 16, "audio": 12, "text": 8, "image_audio": 4}
    assert built.rows == len(rows) == 40 and len({row["id"] for row in rows}) == 40
    for row in rows:
        kind = row["id"].split("-", 1)[1]
        assert (row["image"] is not None, row["audio"] is not None) == ("image" in kind, "audio" in kind)
        assert kind != "text" or row["prompt"]


def test_no_two_items_share_bytes_or_decoded_content(rows):
    media = _media(rows)
    decoded = [
        np.asarray(Image.open(io.BytesIO(data))) if column == "image" else sf.read(io.BytesIO(data))[0]
        for column, data in media
    ]
    assert len({hashlib.sha256(data).digest() for _, data in media}) == len(media) == 40 - 8 + 4
    assert len({hashlib.sha256(array.tobytes()).digest() for array in decoded}) == len(media)


def test_media_decodes_at_the_requested_sizes_rates_and_lengths(rows):
    formats = set()
    for column, data in _media(rows):
        if column == "image":
            image = Image.open(io.BytesIO(data))
            image.load()
            formats.add(image.format)
            assert image.width * image.height <= 0.05e6 * 1.01
        else:
            info = sf.info(io.BytesIO(data))
            formats.add(info.format)
            assert info.samplerate in AUDIO_RATES and 1.0 - 0.05 <= info.duration <= 2.5 + 0.1
    assert {"JPEG", "WAV", "FLAC", "OGG"} <= formats


def test_schema_is_the_sample_datas(built):
    assert len(built.files) == 4 and built.total_bytes == sum(f.stat().st_size for f in built.files)
    for path in built.files:
        assert pq.read_schema(path).equals(SCHEMA, check_metadata=True)
        assert pq.ParquetFile(path).metadata.num_row_groups == 1  # 10-row files of one <=256-row group


def test_same_seed_same_rows_whatever_the_workers(built, rows, tmp_path):
    again = pq.read_table(build_dataset(tmp_path, seed=3, workers=1, **SMALL).path).to_pylist()
    assert [r["prompt"] for r in again] == [r["prompt"] for r in rows]
    cells = [(a[c], b[c]) for a, b in zip(again, rows, strict=True) for c in ("image", "audio") if a[c]]
    assert all(a == b for a, b in cells if not a["path"].endswith(".ogg"))  # OGG's stream serials are random


def test_one_file_path_media_resolve_from_the_input_directory(tmp_path):
    built = build_dataset(tmp_path, layout="one-file", media="path", seed=1, workers=1, **SMALL)
    (path,) = built.files
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    source = MediaSource(media_root=default_media_root(str(path)))
    assert default_media_root(str(tmp_path)) == source.media_root
    for row in pq.read_table(path).to_pylist():
        for column in ("image", "audio"):
            if row[column]:
                assert row[column]["bytes"] is None and row[column]["path"].startswith("media/")
                assert load_bytes(row[column], source, column)[0]


def test_many_files_with_a_mix_override(tmp_path):
    built = build_dataset(tmp_path, mix="audio=0.5,text=0.5", layout="many-files", workers=1, **SMALL)
    assert built.counts == {"audio": 20, "text": 20}
    assert [pq.ParquetFile(f).metadata.num_rows for f in built.files] == [16, 16, 8]
    with pytest.raises(FileExistsError):
        build_dataset(tmp_path, rows=1)


@pytest.mark.parametrize("mix", ["video=1", "audio=-1,text=2", "text=0"])
def test_bad_mixes_are_refused(mix):
    with pytest.raises(ValueError):
        parse_mix(mix)
