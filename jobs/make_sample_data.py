"""Build the bundled sample dataset: real photos and speech clips plus text rows, as Parquet in
Hugging Face datasets' layout (``image``/``audio`` are ``struct<bytes: binary, path: string>`` and the
schema carries the ``huggingface`` features metadata, so ``datasets`` reads the columns as Image/Audio).

    python -m jobs.make_sample_data OUT.parquet

Media (jobs/sample_media/): photos from scikit-image's sample data, speech made with espeak-ng and
converted with sox (WAV 16 kHz, FLAC 22.05 kHz, OGG 8 kHz, MP3). Two rows are broken on purpose, to show
that bad input becomes an error row instead of killing the job.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.rows import MEDIA_STRUCT

MEDIA_DIR = Path(__file__).parent / "sample_media"

HF_FEATURES = {
    "id": {"dtype": "string", "_type": "Value"},
    "image": {"_type": "Image"},
    "audio": {"_type": "Audio"},
    "prompt": {"dtype": "string", "_type": "Value"},
}


def _media(name: str, embed: bool = True) -> dict:
    """HF datasets' cell: the bytes plus the file name (path-only cells resolve against media_root)."""
    return {"bytes": (MEDIA_DIR / name).read_bytes() if embed else None, "path": name}


def sample_rows() -> list[dict]:
    truncated_jpeg = (MEDIA_DIR / "cat.jpg").read_bytes()[:300]
    return [
        {"id": "text-capital", "image": None, "audio": None, "prompt": "What is the capital of France?"},
        {"id": "text-haiku", "image": None, "audio": None, "prompt": "Write a haiku about autumn."},
        {"id": "image-cat", "image": _media("cat.jpg"), "audio": None, "prompt": None},
        {"id": "image-coffee", "image": _media("coffee.jpg"), "audio": None, "prompt": "What drink is this?"},
        {"id": "image-rocket-by-path", "image": _media("rocket.jpg", embed=False), "audio": None, "prompt": None},
        {"id": "image-logo-rgba", "image": _media("logo.png"), "audio": None, "prompt": "Read the text in the logo."},
        {"id": "audio-fox-wav", "image": None, "audio": _media("fox.wav"), "prompt": None},
        {"id": "audio-morning-mp3", "image": None, "audio": _media("morning.mp3"), "prompt": None},
        {"id": "audio-translate-8k-ogg", "image": None, "audio": _media("translate_8k.ogg"),
         "prompt": "Translate the audio to French."},
        {"id": "image-audio-cat-question", "image": _media("cat.jpg"), "audio": _media("question.flac"), "prompt": None},
        {"id": "broken-truncated-jpeg", "image": {"bytes": truncated_jpeg, "path": "cat.jpg"}, "audio": None,
         "prompt": None},
        {"id": "broken-empty-row", "image": None, "audio": None, "prompt": None},
    ]  # fmt: skip


SCHEMA = pa.schema(
    [("id", pa.string()), ("image", MEDIA_STRUCT), ("audio", MEDIA_STRUCT), ("prompt", pa.string())],
    metadata={"huggingface": json.dumps({"info": {"features": HF_FEATURES}})},
)


def write_sample_dataset(out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(sample_rows(), schema=SCHEMA), out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="Parquet file to write.")
    out = write_sample_dataset(parser.parse_args(argv).out)
    print(f"wrote {len(sample_rows())} sample rows to {out}")


if __name__ == "__main__":
    main()
