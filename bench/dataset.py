"""Build the GPU benchmark's input: a mixed dataset of distinct rows as Parquet in Hugging Face datasets'
layout (the schema of ``jobs.make_sample_data``): photos, speech clips, text and image+audio rows.

    python -m bench.dataset OUT_DIR [--rows 10000] [--seed 0] [--mix image=.4,audio=.3,text=.2,image_audio=.1]
        [--layout row-groups|one-file|many-files] [--media embedded|path] [--max-megapixels 12]
        [--audio-seconds 5,60] [--workers N] [--overwrite]

No two rows share media bytes or decoded content, so no cache (the engine's multimodal cache keyed by
the bytes' hash, a prefix cache, a decode cache) can flatter anyone: every item is made from the
committed jobs/sample_media/ files by per-row random transforms. Images: random crop, resize to the row's
size (0.3 MP up to --max-megapixels, a fifth at the maximum as camera photos are), flip, colour jitter,
per-pixel noise; JPEG mostly, some PNG. Audio: random clips sped up/down a little, concatenated to the
row's length with pauses, random gain and noise, encoded as WAV, FLAC, MP3 or OGG at 16-48 kHz.

Layouts, since the pipeline must keep every CPU actor busy whatever the input looks like: ``row-groups``
(a few files of ~256-row row groups), ``one-file`` (one file, ONE row group: the whole dataset is held in
memory until it is written, as a row group cannot be written piecemeal) and ``many-files`` (16-row
files). ``--media path`` writes media under OUT/media/ with path-only cells relative to OUT, which the
pipeline's default input.media_root (the input's directory) resolves. Deterministic for a seed
(except OGG's random stream serial numbers, which only change container bytes).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import soxr
from PIL import Image, ImageChops, ImageEnhance

from jobs.make_sample_data import MEDIA_DIR, SCHEMA
from pipelines.cpu_pool import in_order

KINDS = ("image", "audio", "text", "image_audio")
DEFAULT_MIX = {"image": 0.4, "audio": 0.3, "text": 0.2, "image_audio": 0.1}
IMAGE_SOURCES = ("cat.jpg", "coffee.jpg", "rocket.jpg", "logo.png")
AUDIO_SOURCES = ("fox.wav", "question.flac", "morning.mp3", "translate_8k.ogg")
ASPECTS = (4 / 3, 3 / 4, 16 / 9, 9 / 16, 3 / 2, 1.0)
PNG_SHARE, PNG_MAX_MP = 0.15, 4.0  # a noisy PNG is ~3 bytes/pixel: 12 MP ones would dominate the bytes
AUDIO_RATES = (16000, 22050, 44100, 48000)
HAS_MP3 = "MP3" in sf.available_formats()  # libsndfile < 1.1 has no MP3 writer: OGG stands in for it
AUDIO_FORMATS = (("WAV", "PCM_16", "wav"), ("FLAC", "PCM_16", "flac"), ("OGG", "VORBIS", "ogg")) + (
    (("MP3", "MPEG_LAYER_III", "mp3"),) if HAS_MP3 else (("OGG", "VORBIS", "ogg"),)
)  # (format, subtype, extension)
SR = 16000  # the sources are brought to this rate before mixing
LAYOUTS = {"row-groups": (None, 256), "one-file": (None, None), "many-files": (16, 16)}  # rows/file, /group
WORDS = ("rivers", "volcanoes", "bees", "lighthouses", "rockets", "owls", "glaciers", "bridges", "comets")
ADJECTIVES = ("quiet", "ancient", "bright", "tiny", "stormy", "golden", "curious", "frozen")
LANGS = ("French", "German", "Spanish", "Italian", "Portuguese", "Japanese", "Chinese")
PROMPTS = {
    "image": (None, "Describe this image in {n} words.", "Write a one-sentence caption for this photo.",
              "What is the main subject of this picture? Give {n} details.", "Are there {word} in this picture?"),
    "audio": (None, None, "Transcribe the audio clip into text.", "Translate the audio to {lang}.",
              "Transcribe the speech, then translate it to {lang}.", "Summarize what the speaker says in {n} words."),
    "text": ("Write a haiku about {word}.", "What is {a} times {b}?", "List {n} facts about {word}.",
             "Explain {word} to a {n}-year-old.", "Translate 'the {word} are {adj}' to {lang}.",
             "Write a {n}-line poem about {adj} {word}."),
    "image_audio": (None, None, "Answer the spoken question about this image in {n} words."),
}  # fmt: skip


@dataclass(frozen=True)
class Spec:
    """What every row is drawn from; picklable, sent with each chunk."""

    seed: int = 0
    max_megapixels: float = 12.0
    audio_seconds: tuple[float, float] = (5.0, 60.0)
    media_dir: str | None = None  # set: write media files there (``--media path``)


@dataclass
class BuiltDataset:
    path: Path
    counts: dict[str, int]
    total_bytes: int  # Parquet files plus media files
    files: list[Path] = field(default_factory=list)  # the Parquet files, in order
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        kinds = ", ".join(f"{k}={n}" for k, n in self.counts.items())
        return (f"wrote {self.rows} rows ({kinds}) to {self.path}: {len(self.files)} Parquet file(s), "
                f"{self.total_bytes / 1e6:.1f} MB, in {self.seconds:.1f} s")  # fmt: skip


def parse_mix(mix: str | dict[str, float]) -> dict[str, float]:
    """``audio=0.5,text=0.5`` (or a dict) -> shares summing to 1; ``image+audio`` means image_audio."""
    if isinstance(mix, str):
        mix = dict(part.partition("=")[::2] for part in mix.split(",") if part.strip())
    mix = {kind.strip().replace("+", "_"): float(share) for kind, share in mix.items()}
    if not set(mix) <= set(KINDS) or min(mix.values(), default=0) < 0 or sum(mix.values()) <= 0:
        raise ValueError(
            f"bad mix {mix}: expected KIND=SHARE,... with KIND in {KINDS}, shares >= 0, not all 0"
        )
    return {k: v / sum(mix.values()) for k, v in mix.items() if v > 0}


def assign_kinds(rows: int, mix: dict[str, float], seed: int) -> list[str]:
    """Exact counts (largest remainder), shuffled, so small datasets still match the mix."""
    exact = {k: share * rows for k, share in mix.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[: rows - sum(counts.values())]:
        counts[k] += 1
    kinds = [k for k in KINDS for _ in range(counts.get(k, 0))]
    return [kinds[i] for i in np.random.default_rng(seed).permutation(rows)]


def _pick(rng: np.random.Generator, seq: tuple):
    return seq[rng.integers(len(seq))]  # rng.choice would turn a tuple of tuples into an array


@cache
def _source_image(name: str) -> tuple[Image.Image, Image.Image | None]:
    """(RGB on white, alpha or None): only PNG rows keep the alpha."""
    img = Image.open(MEDIA_DIR / name)
    if img.mode != "RGBA":
        return img.convert("RGB"), None
    on_white = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img)
    return on_white.convert("RGB"), img.getchannel("A")


@cache
def _source_audio(name: str) -> np.ndarray:
    samples, rate = sf.read(MEDIA_DIR / name, dtype="float32", always_2d=True)
    return soxr.resample(samples.mean(axis=1), rate, SR).astype(np.float32)


def _image_size(rng: np.random.Generator, max_mp: float) -> tuple[int, int]:
    low = min(0.3, max_mp)  # log-uniform from low, a fifth at the top (phone photos, 4000x3000 at 12 MP)
    mp = max_mp if rng.random() < 0.2 else math.exp(rng.uniform(math.log(low), math.log(max_mp)))
    aspect = _pick(rng, ASPECTS)
    width = max(16, round(math.sqrt(mp * 1e6 * aspect)))
    return width, max(16, round(width / aspect))


def _crop_box(rng: np.random.Generator, size: tuple[int, int], aspect: float) -> tuple[float, ...]:
    """A random 50-100% (by area) crop of the source with the target's aspect ratio."""
    sw, sh = size
    cw, ch = (sw, sw / aspect) if aspect > sw / sh else (sh * aspect, sh)
    scale = math.sqrt(rng.uniform(0.5, 1.0))
    cw, ch = cw * scale, ch * scale
    x, y = rng.uniform(0, sw - cw), rng.uniform(0, sh - ch)
    return x, y, x + cw, y + ch


def make_image(rng: np.random.Generator, max_mp: float) -> tuple[bytes, str]:
    rgb, alpha = _source_image(_pick(rng, IMAGE_SOURCES))
    png = rng.random() < PNG_SHARE
    size = _image_size(rng, min(max_mp, PNG_MAX_MP) if png else max_mp)
    box = _crop_box(rng, rgb.size, size[0] / size[1])
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):  # small: cheap
        rgb = enhance(rgb).enhance(rng.uniform(0.75, 1.25))
    img = rgb.resize(size, Image.Resampling.BICUBIC, box=box)
    amp = int(rng.integers(2, 7))  # noise: no two rows decode alike, and JPEGs get a camera's texture
    noise = rng.integers(0, 2 * amp + 1, (size[1], size[0], 3), dtype=np.uint8)
    img = ImageChops.add(img, Image.fromarray(noise), 1.0, -amp)
    if png and alpha is not None:
        img.putalpha(alpha.resize(size, Image.Resampling.BICUBIC, box=box))
    flip = rng.random() < 0.5
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img
    out = io.BytesIO()
    if png:
        img.save(out, "PNG", compress_level=1)  # level 1: 6x faster than the default, 15% bigger
    else:
        img.save(out, "JPEG", quality=int(rng.integers(70, 96)), progressive=bool(rng.random() < 0.2))
    return out.getvalue(), "png" if png else "jpg"


def _speech(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Random source clips, each trimmed and sped up/down a little (resampling moves speed and pitch
    together), with pauses between them, to ``seconds`` at 16 kHz; then random gain and noise."""
    pieces, total, target = [], 0, int(seconds * SR)
    while total < target:
        clip = _source_audio(_pick(rng, AUDIO_SOURCES))
        clip = clip[rng.integers(0, len(clip) // 4) :]
        clip = soxr.resample(clip, SR, SR / rng.uniform(0.9, 1.1)) * rng.uniform(0.5, 1.0)
        pause = np.zeros(int(rng.uniform(0.1, 0.8) * SR), np.float32)
        pieces += [clip, pause]
        total += len(clip) + len(pause)
    speech = np.concatenate(pieces)[:target] * rng.uniform(0.3, 1.0)
    return np.clip(speech + rng.normal(0, 10 ** rng.uniform(-3.5, -2.5), target), -1, 1).astype(np.float32)


def make_audio(rng: np.random.Generator, seconds: tuple[float, float]) -> tuple[bytes, str]:
    speech = _speech(rng, rng.uniform(*seconds))
    rate = _pick(rng, AUDIO_RATES)
    fmt, subtype, ext = _pick(rng, AUDIO_FORMATS)
    samples = soxr.resample(speech, SR, rate)
    if rng.random() < 0.25:  # some stereo, as recordings often are: the reader has to downmix
        samples = np.stack([samples, samples * rng.uniform(0.6, 1.0)], axis=1)
    out = io.BytesIO()
    with sf.SoundFile(out, "w", rate, samples.ndim, subtype, format=fmt) as f:
        for start in range(0, len(samples), 1 << 15):  # in pieces: one big Vorbis write overflows the stack
            f.write(samples[start : start + (1 << 15)])
    return out.getvalue(), ext


def make_prompt(rng: np.random.Generator, kind: str) -> str | None:
    template = _pick(rng, PROMPTS[kind])
    return template and template.format(
        n=int(rng.integers(3, 40)), a=int(rng.integers(2, 1000)), b=int(rng.integers(2, 1000)),
        word=_pick(rng, WORDS), adj=_pick(rng, ADJECTIVES), lang=_pick(rng, LANGS),
    )  # fmt: skip


def make_row(index: int, kind: str, spec: Spec) -> dict:
    rng = np.random.default_rng([spec.seed, index])  # per row: the same rows whatever the chunking
    row = {"id": f"{index:06d}-{kind}", "image": None, "audio": None, "prompt": make_prompt(rng, kind)}
    if "image" in kind:
        row["image"] = _cell(*make_image(rng, spec.max_megapixels), f"{index:06d}-image", spec.media_dir)
    if "audio" in kind:
        row["audio"] = _cell(*make_audio(rng, spec.audio_seconds), f"{index:06d}-audio", spec.media_dir)
    return row


def _cell(data: bytes, ext: str, stem: str, media_dir: str | None) -> dict:
    name = f"{stem}.{ext}"
    if media_dir is None:
        return {"bytes": data, "path": name}
    Path(media_dir, name).write_bytes(data)
    return {"bytes": None, "path": f"media/{name}"}  # relative to the dataset directory, as HF resolves it


def build_chunk(task: tuple[int, list[str], Spec]) -> pa.Table:
    start, kinds, spec = task
    return pa.Table.from_pylist([make_row(start + i, k, spec) for i, k in enumerate(kinds)], schema=SCHEMA)


class _Sink:
    """Part files of ``per_file`` rows written in row groups of ``per_group`` rows as chunks arrive."""

    def __init__(self, out: Path, per_file: int, per_group: int):
        self.out, self.per_file, self.per_group = out, per_file, per_group
        self.files: list[Path] = []
        self._writer, self._in_file, self._buffer = None, 0, SCHEMA.empty_table()

    def add(self, table: pa.Table) -> None:
        self._buffer = pa.concat_tables([self._buffer, table])
        while self._buffer.num_rows >= min(self.per_group, self.per_file - self._in_file):
            self._flush(min(self.per_group, self.per_file - self._in_file))

    def _flush(self, rows: int) -> None:
        if self._writer is None:
            self.files.append(self.out / f"part-{len(self.files):05d}.parquet")
            self._writer = pq.ParquetWriter(self.files[-1], SCHEMA)
        self._writer.write_table(self._buffer.slice(0, rows), row_group_size=rows)
        self._buffer, self._in_file = self._buffer.slice(rows), self._in_file + rows
        if self._in_file == self.per_file:
            self._writer.close()
            self._writer, self._in_file = None, 0

    def close(self) -> None:
        if self._buffer.num_rows:
            self._flush(self._buffer.num_rows)
        if self._writer is not None:
            self._writer.close()


def _prepare(out: Path, overwrite: bool) -> None:
    """Refuse to mix with an earlier build's files (a directory read would take them in)."""
    old = list(out.glob("part-*.parquet")) + list(out.glob("media/*"))
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds a dataset; pass overwrite=True (--overwrite)")
    for path in old:
        path.unlink()
    if (out / "media").is_dir():
        (out / "media").rmdir()  # empty now; a path build makes it again


def build_dataset(
    out_dir: str | Path, rows: int = 10_000, seed: int = 0, mix: dict[str, float] | str | None = None,
    layout: str = "row-groups", media: str = "embedded", max_megapixels: float = 12.0,
    audio_seconds: tuple[float, float] = (5.0, 60.0), workers: int | None = None, overwrite: bool = False,
) -> BuiltDataset:  # fmt: skip
    if layout not in LAYOUTS or media not in ("embedded", "path") or rows < 1:
        raise ValueError(f"need rows >= 1, layout in {list(LAYOUTS)}, media 'embedded' or 'path'")
    started, out = time.perf_counter(), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _prepare(out, overwrite)
    if media == "path":
        (out / "media").mkdir()
    mix = parse_mix(mix or DEFAULT_MIX)
    kinds, workers = assign_kinds(rows, mix, seed), workers or os.cpu_count() or 1
    spec = Spec(seed, max_megapixels, tuple(audio_seconds), str(out / "media") if media == "path" else None)
    chunk = max(1, min(16, math.ceil(rows / (4 * workers))))  # small chunks: 12 MP rows are slow ones
    tasks = [(s, kinds[s : s + chunk], spec) for s in range(0, rows, chunk)]
    per_file, per_group = LAYOUTS[layout]
    sink = _Sink(out, per_file or (rows if layout == "one-file" else math.ceil(rows / 4)), per_group or rows)
    for table in in_order(build_chunk, tasks, workers):  # chunks in order, bounded in flight
        sink.add(table)
    sink.close()
    written = sink.files + (sorted((out / "media").iterdir()) if media == "path" else [])
    counts = {k: kinds.count(k) for k in KINDS if k in kinds}
    total = sum(p.stat().st_size for p in written)
    return BuiltDataset(out, counts, total, sink.files, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="Directory to write the dataset to.")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", help="KIND=SHARE,... of image, audio, text, image_audio (.4/.3/.2/.1)")
    parser.add_argument("--layout", choices=list(LAYOUTS), default="row-groups")
    parser.add_argument("--media", choices=("embedded", "path"), default="embedded")
    parser.add_argument("--max-megapixels", type=float, default=12.0)
    parser.add_argument("--audio-seconds", default="5,60", help="MIN,MAX length of a clip")
    parser.add_argument("--workers", type=int, help="Processes (default: all cores).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an earlier build in OUT.")
    args = parser.parse_args(argv)
    low, high = (float(x) for x in args.audio_seconds.split(","))
    built = build_dataset(
        args.out, args.rows, args.seed, args.mix, args.layout, args.media, args.max_megapixels, (low, high),
        args.workers, args.overwrite,
    )  # fmt: skip
    print(built.summary() + ("" if HAS_MP3 else " (no MP3 writer in this libsndfile: OGG instead)"))


if __name__ == "__main__":
    main()
