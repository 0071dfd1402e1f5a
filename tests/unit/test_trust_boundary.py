"""Rows are untrusted: what a media path may reach, how much is read and decoded, and how long a row may
take (actors.media.policy, actors.media.decode, actors.row_timer.RowTimer). No network: URL rules are tested on
the decision function, remote reads on fsspec's in-memory file system."""

import io
import os
import struct
import threading
import time
import zlib

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
from PIL import Image

from actors.attempts import LocalAttemptLedger
from actors.media.decode import decode_audio, decode_image, load_bytes
from actors.media.limits import image_bytes_per_pixel
from actors.media.policy import (
    DEFAULT_REMOTE_PROTOCOLS,
    MediaSource,
    _bounded_read,
    read_media_path,
    resolve_media_path,
)
from actors.preprocess import PreprocessRows
from actors.row_timer import RowTimer
from jobs.run import format_summary
from schemas.job import InputConfig, MediaConfig
from schemas.rows import MEDIA_STRUCT, ErrorCode, RowError
from tests.helpers import MEDIA, make_config

CAT = (MEDIA / "cat.jpg").read_bytes()
REFUSED, NOT_FOUND = ErrorCode.MEDIA_PATH_REFUSED, ErrorCode.MEDIA_NOT_FOUND


def _error(fn, *args, **kwargs) -> RowError:
    with pytest.raises(RowError) as e:
        fn(*args, **kwargs)
    return e.value


def _read(path: str, source: MediaSource) -> RowError:
    return _error(read_media_path, path, source, "image")


@pytest.fixture
def root(tmp_path):
    """tmp/root holds cat.jpg; tmp/outside holds secret.jpg, next to the root and reachable by `..`."""
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "root" / "cat.jpg").write_bytes(CAT)
    (tmp_path / "outside" / "secret.jpg").write_bytes(CAT)
    return tmp_path / "root"


# --- what a path may reach -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "simplecache::http://host/x.png",
        "filecache::s3://bucket/data/x.png",
        "zip://x.png::file:///etc/passwd",
        "s3://bucket/data/x.png::s3://bucket/data/y.png",
        "cat.jpg::x",
    ],
)
def test_chained_urls_are_always_refused(path):
    source = MediaSource(media_root="s3://bucket/data", allow_http=True, allowed_roots=("http://host/",))
    e = _error(resolve_media_path, path, source, "image")
    assert e.code == REFUSED and "'::'" in e.message and "Try" in e.message


@pytest.mark.parametrize(
    "path", ["ftp://host/x.png", "sftp://host/x.png", "memory://x.png", "hdfs://nn/x.png", "github://o:r@/x"]
)
def test_protocols_outside_the_allow_list_are_refused(path):
    e = _error(resolve_media_path, path, MediaSource(media_root="/data"), "image")
    assert e.code == REFUSED and "remote_protocols" in e.message


def test_http_needs_allow_http_and_an_allowed_prefix():
    url = "https://host/media/x.png"
    off = MediaSource(media_root="/data", allowed_roots=("https://host/media/",))
    e = _error(resolve_media_path, url, off, "image")
    assert e.code == REFUSED and "allow_http" in e.message
    on_elsewhere = MediaSource(media_root="/data", allow_http=True)
    assert _error(resolve_media_path, url, on_elsewhere, "image").code == REFUSED
    on = MediaSource(media_root="/data", allow_http=True, allowed_roots=("https://host/media",))
    assert resolve_media_path(url, on, "image").location == url  # decided, nothing fetched
    for sneaky in ("https://host/media-x/y.png", "https://host/media@evil/x.png", "https://host/media/../a"):
        assert _error(resolve_media_path, sneaky, on, "image").code == REFUSED, sneaky


def test_s3_urls_pass_the_protocol_check_under_their_root():
    source = MediaSource(media_root="s3://bucket/data", allowed_roots=("gs://other/shared/",))
    for url in ("s3://bucket/data/x.jpg", "S3://bucket/data/sub/y.jpg", "gs://other/shared/z.wav"):
        target = resolve_media_path(url, source, "image")
        assert not target.is_local and target.location.lower() == url.lower()
    relative = resolve_media_path("sub/x.jpg", source, "image")
    assert relative.location == "s3://bucket/data/sub/x.jpg" and not relative.is_local
    for url in ("s3://bucket/other/x.jpg", "s3://bucket/data-2/x.jpg", "s3://bucket/data/%2e%2e/x.jpg"):
        assert _error(resolve_media_path, url, source, "image").code == REFUSED, url
    assert _error(resolve_media_path, "../x.jpg", source, "image").code == REFUSED


def test_paths_under_the_root_and_allowed_roots_are_read(root, tmp_path):
    source = MediaSource(media_root=str(root))
    assert read_media_path("cat.jpg", source, "image") == CAT
    assert read_media_path("./sub/../cat.jpg", source, "image") == CAT  # stays inside: fine
    assert read_media_path(str(root / "cat.jpg"), source, "image") == CAT
    assert read_media_path(f"file://{root}/cat.jpg", source, "image") == CAT
    extra = MediaSource(media_root=str(root), allowed_roots=(str(tmp_path / "outside"),))
    assert read_media_path(str(tmp_path / "outside" / "secret.jpg"), extra, "image") == CAT
    (root / "inner-link.jpg").symlink_to(root / "cat.jpg")
    assert read_media_path("inner-link.jpg", source, "image") == CAT
    assert _read("missing.jpg", source).code == NOT_FOUND  # allowed, absent: still MEDIA_NOT_FOUND


def test_absolute_paths_outside_the_root_are_refused(root, tmp_path):
    source = MediaSource(media_root=str(root))
    for path in (str(tmp_path / "outside" / "secret.jpg"), "/etc/passwd", f"file://{tmp_path}/outside/secret.jpg",
                 "file://otherhost/etc/passwd", str(root) + "-sibling/x.jpg"):  # fmt: skip
        e = _read(path, source)
        assert e.code == REFUSED and "allowed_media_roots" in e.message and "Try" in e.message, path


def test_a_refused_absolute_path_names_the_setting_that_allows_its_directory(root, tmp_path):
    """A Hugging Face datasets export of local files holds absolute paths: the refusal says which line of
    config allows them, made from the path's text alone (the same whether the file exists or not)."""
    source = MediaSource(media_root=str(root))
    outside = tmp_path / "outside"
    allow = f"Try input.allowed_media_roots: [{str(outside)!r}]"
    for path in (str(outside / "secret.jpg"), str(outside / "absent.jpg"), f"file://{outside}/secret.jpg"):
        e = _read(path, source)
        assert e.code == REFUSED and allow in e.message, e.message
        told = e.message.replace(repr(path), "").replace(repr(str(outside)), "")
        assert str(tmp_path) not in told  # the row's path and its directory: nothing more is told
    allowed = MediaSource(media_root=str(root), allowed_roots=(str(outside),))  # what the message says
    assert read_media_path(str(outside / "secret.jpg"), allowed, "image") == CAT
    (root / "link.jpg").symlink_to(outside / "secret.jpg")
    for path in (str(root / "link.jpg"), "../outside/secret.jpg", "/top-level.jpg"):
        # a link out of an allowed directory, a relative escape, a file at the top: no directory to name
        message = _read(path, source).message
        assert "input.allowed_media_roots: [" not in message and "allowed_media_roots" in message, message


@pytest.mark.parametrize(
    "path", ["../outside/secret.jpg", "sub/../../outside/secret.jpg", "..", "../../../etc/passwd"]
)
def test_dotdot_escapes_are_refused(root, path):
    assert _read(path, MediaSource(media_root=str(root))).code == REFUSED


def test_a_symlink_out_of_the_root_is_refused(root, tmp_path):
    (root / "link.jpg").symlink_to(tmp_path / "outside" / "secret.jpg")
    (root / "dirlink").symlink_to(tmp_path / "outside")
    source = MediaSource(media_root=str(root))
    assert _read("link.jpg", source).code == REFUSED
    assert _read("dirlink/secret.jpg", source).code == REFUSED
    into_allowed = MediaSource(media_root=str(root), allowed_roots=(str(tmp_path / "outside"),))
    assert read_media_path("link.jpg", into_allowed, "image") == CAT  # its target is inside an allowed root


def test_no_existence_oracle_for_refused_paths(root, tmp_path):
    """A refused path gets the same code and words whether or not the file exists."""
    source = MediaSource(media_root=str(root))
    (root / "dangling.jpg").symlink_to(tmp_path / "outside" / "later.jpg")
    paths = [str(tmp_path / "outside" / "later.jpg"), "../outside/later.jpg", "dangling.jpg"]
    before = [(e.code, e.message) for e in (_read(p, source) for p in paths)]
    (tmp_path / "outside" / "later.jpg").write_bytes(CAT)
    after = [(e.code, e.message) for e in (_read(p, source) for p in paths)]
    assert before == after and {code for code, _ in before} == {REFUSED}


def _within(seconds: float, fn, *args):
    """fn(*args) in a thread; fails the test (instead of hanging it) when it does not return in time."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # handed to the test
            box["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still blocked after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_a_fifo_is_refused_without_blocking(root):
    os.mkfifo(root / "pipe.wav")
    e = _within(5, _read, "pipe.wav", MediaSource(media_root=str(root)))
    assert e.code == REFUSED and "FIFO" in e.message


def test_character_devices_and_directories_are_refused(root):
    assert _read("/dev/zero", MediaSource(media_root=str(root))).code == REFUSED  # outside the root
    dev = MediaSource(media_root=str(root), allowed_roots=("/dev",))  # even where the config allows it
    e = _within(5, _read, "/dev/zero", dev)
    assert e.code == REFUSED and "character device" in e.message
    (root / "album").mkdir()
    for path in ("album", ".", str(root)):
        e = _read(path, MediaSource(media_root=str(root)))
        assert e.code == REFUSED and "directory" in e.message, path


def test_unreadable_path_text_is_refused(root):
    source = MediaSource(media_root=str(root))
    for path in ("cat.jpg\x00.png", "\ud800.jpg"):
        assert _read(path, source).code == REFUSED


# --- how much is read and decoded ------------------------------------------------------------------


def test_byte_cap_on_files_and_embedded_bytes(root):
    (root / "big.bin").write_bytes(b"\0" * 10_000)
    with open(root / "sparse.bin", "wb") as f:
        f.truncate(2**40)  # 1 TiB, sparse: refused from its size, never read
    small = MediaSource(media_root=str(root), max_bytes=1000)
    for path in ("big.bin", "sparse.bin"):
        e = _within(5, _read, path, small)
        assert e.code == ErrorCode.MEDIA_TOO_LARGE and "max_media_bytes" in e.message and "Try" in e.message
    assert _error(load_bytes, b"\0" * 1001, small, "image").code == ErrorCode.MEDIA_TOO_LARGE
    assert (
        _error(load_bytes, {"bytes": b"\0" * 1001, "path": "x"}, small, "audio").code
        == ErrorCode.MEDIA_TOO_LARGE
    )
    assert load_bytes(b"\0" * 1000, small, "image")[0] == b"\0" * 1000


def test_an_endless_stream_is_read_only_up_to_the_cap():
    class Endless:  # a file whose size says nothing (/proc, a pipe swapped in): reads never run dry
        asked: list[int] = []

        def read(self, n):
            self.asked.append(n)
            return b"\0" * n

    endless = Endless()
    assert _error(_bounded_read, endless, 1000, "audio", "'x'").code == ErrorCode.MEDIA_TOO_LARGE
    assert endless.asked == [1001]


def test_remote_reads_check_type_and_size(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/data/cat.jpg", CAT)
    fs.pipe("/bucket/data/album/a.jpg", CAT)
    source = MediaSource(media_root="memory://bucket/data", remote_protocols=("memory",))
    try:
        assert read_media_path("cat.jpg", source, "image") == CAT
        assert read_media_path("memory://bucket/data/cat.jpg", source, "image") == CAT
        assert _read("album", source).code == REFUSED
        assert _read("nope.jpg", source).code == NOT_FOUND
        capped = MediaSource(media_root="memory://bucket/data", remote_protocols=("memory",), max_bytes=100)
        assert _read("cat.jpg", capped).code == ErrorCode.MEDIA_TOO_LARGE
    finally:
        fs.rm("/bucket", recursive=True)


def _flac(rate: int, channels: int, seconds: float) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros((int(rate * seconds), channels), np.float32), rate, format="FLAC")
    return buf.getvalue()


def test_high_rate_multichannel_audio_is_refused_from_its_header(monkeypatch):
    data = _flac(192_000, 8, 0.5)  # silence compresses to almost nothing, yet decodes to 768,000 samples
    assert len(data) < 50_000
    decoded = []
    monkeypatch.setattr(sf.SoundFile, "read", lambda *a, **k: decoded.append(1))
    e = _error(decode_audio, data, "hires.flac", 0.025, 600, max_samples=500_000)
    assert e.code == ErrorCode.AUDIO_TOO_LARGE and "max_audio_samples" in e.message and "Try" in e.message
    assert decoded == []  # refused before a single sample was decoded
    monkeypatch.undo()
    assert decode_audio(data, "hires.flac", 0.025, 600, max_samples=768_000).source_rate == 192_000
    # the 2.9 MB FLAC, 1747 s at 192 kHz x 8 channels, against the default cap
    assert 1747 * 192_000 * 8 > MediaConfig().max_audio_samples >= 1800 * 48_000 * 2


def test_audio_arrays_count_against_the_sample_cap():
    from actors.media.decode import load_audio

    e = _error(load_audio, [0.0] * 20_000, MediaSource(), 16_000, 0.025, 600, max_samples=16_000)
    assert e.code == ErrorCode.AUDIO_TOO_LARGE


def _png16_rgba(width: int, height: int) -> bytes:
    """A 16-bit RGBA PNG (Pillow writes only 8-bit RGBA, so it is assembled here)."""
    raw = b"".join(b"\x00" + b"\x12\x34" * 4 * width for _ in range(height))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_sixteen_bit_rgba_counts_eight_bytes_per_pixel():
    data = _png16_rgba(64, 64)
    assert image_bytes_per_pixel(Image.open(io.BytesIO(data))) == 8
    e = _error(decode_image, data, "deep.png", 10**8, max_bytes=64 * 64 * 8 - 1)
    assert e.code == ErrorCode.IMAGE_TOO_LARGE and "max_image_bytes" in e.message and "Try" in e.message
    assert decode_image(data, "deep.png", 10**8, max_bytes=64 * 64 * 8).width == 64
    buf = io.BytesIO()
    Image.new("RGBA", (64, 64)).save(buf, format="PNG")  # the same picture at 8 bits fits the cap
    assert decode_image(buf.getvalue(), "rgba8.png", 10**8, max_bytes=64 * 64 * 4).width == 64


# --- the CPU stage: error rows, neighbours unharmed, the time limit --------------------------------

SCHEMA = pa.schema([("id", pa.string()), ("image", MEDIA_STRUCT), ("prompt", pa.string())])


def _path_row(row_id: str, path: str) -> dict:
    return {"id": row_id, "image": {"bytes": None, "path": path}, "prompt": None}


def test_refused_rows_are_error_rows_and_neighbours_succeed(tiny_model, tmp_path, root):
    os.mkfifo(root / "pipe.jpg")
    cfg = make_config(tiny_model, tmp_path, input={"media_root": str(root)}, media={"max_media_bytes": 10**6})
    rows = [_path_row("ok", "cat.jpg"), _path_row("fifo", "pipe.jpg"), _path_row("escape", "../outside/secret.jpg"),
            _path_row("chained", "simplecache::http://h/x.jpg"), _path_row("ftp", "ftp://h/x.jpg"),
            _path_row("device", "/dev/zero"), _path_row("ok-too", str(root / "cat.jpg"))]  # fmt: skip
    rows.append(_path_row("allowed-extra", str(tmp_path / "outside" / "secret.jpg")))
    out = _within(60, PreprocessRows(cfg), pa.Table.from_pylist(rows, schema=SCHEMA)).to_pylist()
    codes = {r["id"]: r["error_code"] for r in out}
    assert codes == {"ok": None, "fifo": "MEDIA_PATH_REFUSED", "escape": "MEDIA_PATH_REFUSED",
                     "chained": "MEDIA_PATH_REFUSED", "ftp": "MEDIA_PATH_REFUSED", "device": "MEDIA_PATH_REFUSED",
                     "ok-too": None, "allowed-extra": "MEDIA_PATH_REFUSED"}  # fmt: skip
    extra = {"media_root": str(root), "allowed_media_roots": [str(tmp_path / "outside")]}
    (row,) = PreprocessRows(make_config(tiny_model, tmp_path, input=extra))(
        pa.Table.from_pylist(rows[-1:], schema=SCHEMA)
    ).to_pylist()
    assert row["status"] == "ok" and row["num_images"] == 1


def test_a_row_past_the_time_limit_times_out_and_its_batch_goes_on(tiny_model, tmp_path, monkeypatch):
    import actors.preprocess as mod

    release = threading.Event()
    real_decode = mod.decode_image

    def slow_decode(data, where, *args, **kwargs):  # stands in for a decode that takes minutes
        if where == "slow.jpg":
            release.wait(30)
        return real_decode(data, where, *args, **kwargs)

    monkeypatch.setattr(mod, "decode_image", slow_decode)
    cfg = make_config(tiny_model, tmp_path, media={"preprocess_timeout_s": 0.5})
    rows = [{"id": name, "image": {"bytes": CAT, "path": f"{name}.jpg"}, "prompt": None}
            for name in ("before", "slow", "after")]  # fmt: skip
    ledger = LocalAttemptLedger()
    stage = PreprocessRows(cfg, ledger=ledger)
    started = time.monotonic()
    try:
        out = stage(pa.Table.from_pylist(rows, schema=SCHEMA)).to_pylist()
        # what the run summary's cpu_actors gets: the slow row's thread abandoned and still running
        reported = ledger.actor_stats()["preprocess"][stage.actor_key]
    finally:
        release.set()
    assert time.monotonic() - started < 10
    assert {k: reported[k] for k in ("rows", "timed_out", "abandoned", "abandoned_running")} == {
        "rows": 3, "timed_out": 1, "abandoned": 1, "abandoned_running": 1,
    }  # fmt: skip
    _join_row_threads()
    assert stage.report()["abandoned_running"] == 0 and stage.report()["abandoned"] == 1
    assert [(r["id"], r["error_code"]) for r in out] == [
        ("before", None),
        ("slow", "PREPROCESS_TIMEOUT"),
        ("after", None),
    ]
    slow = out[1]
    assert "media.preprocess_timeout_s (0.5 s)" in slow["error_message"] and "Try" in slow["error_message"]
    assert slow["images"] is None and slow["prompt"] is None


def test_abandoned_rows_are_bounded():
    """With max_abandoned stuck rows still running, a new row waits one limit for a slot, then fails;
    later rows fail at once until a stuck row ends; then rows run again."""
    release = threading.Event()

    def prepare(row):
        if row["stuck"]:
            release.wait(30)
        return {"id": row["id"], "status": "ok"}

    timer = RowTimer(limit_s=0.2, max_abandoned=1)
    try:
        assert timer.run(prepare, {"id": "a", "stuck": True}, "a")["error_code"] == "PREPROCESS_TIMEOUT"
        started = time.monotonic()
        waited = timer.run(prepare, {"id": "b", "stuck": False}, "b")
        assert waited["error_code"] == "PREPROCESS_TIMEOUT" and "not started" in waited["error_message"]
        assert 0.15 < time.monotonic() - started < 2
        started = time.monotonic()
        assert timer.run(prepare, {"id": "c", "stuck": False}, "c")["error_code"] == "PREPROCESS_TIMEOUT"
        assert time.monotonic() - started < 0.1  # saturated: no second wait
    finally:
        release.set()
    _join_row_threads()  # the stuck row has ended: its slot is free again
    assert timer.run(prepare, {"id": "d", "stuck": False}, "d") == {"id": "d", "status": "ok"}
    assert timer.stats() == {"timed_out": 3, "abandoned": 1, "abandoned_running": 0}


def _join_row_threads() -> None:
    """Wait for every abandoned row thread to end (they are released by then)."""
    for thread in threading.enumerate():
        if thread.name == "preprocess-row":
            thread.join(10)
            assert not thread.is_alive()


def test_the_summary_reports_rows_past_the_time_limit():
    summary = {
        "run_id": "r", "model": "m", "input": "in", "output": "out", "rows_written": 10,
        "rows_skipped_already_done": 0, "status": {"ok": 7, "error": 3},
        "error_codes": {"PREPROCESS_TIMEOUT": 3}, "prompt_tokens": 1, "completion_tokens": 1,
        "wall_s": 1.0, "rows_per_s": 10.0,
        "audit": {"ok": True, "input_rows": 10, "output_rows": 10, "missing_ids": 0, "duplicate_ids": 0},
        "cpu_actors": {
            "h:1": {"batches": 1, "rows": 6, "busy_s": 1.0, "timed_out": 2, "abandoned": 1, "abandoned_running": 1},
            "h:2": {"batches": 1, "rows": 4, "busy_s": 1.0, "timed_out": 1, "abandoned": 1, "abandoned_running": 0},
        },
    }  # fmt: skip
    text = format_summary(summary)
    assert (
        "row time limit   3 rows timed out, 2 of them left running in abandoned threads "
        "(1 still running at their actor's last batch)"
    ) in text
    for actor in summary["cpu_actors"].values():
        actor.update(timed_out=0, abandoned=0, abandoned_running=0)
    assert "row time limit" not in format_summary(summary)  # nothing to say when no row timed out


# --- the config ------------------------------------------------------------------------------------


def test_config_fields_defaults_and_errors():
    cfg = InputConfig(path="/data/in.parquet")
    assert tuple(cfg.remote_protocols) == DEFAULT_REMOTE_PROTOCOLS and cfg.allowed_media_roots == []
    media = MediaConfig()
    assert media.max_media_bytes == 64 * 2**20 and media.preprocess_timeout_s == 60
    assert media.max_audio_samples == 1800 * 48_000 * 2 and media.max_image_bytes == 80_000_000 * 4
    ok = InputConfig(
        path="x", allow_http=True, allowed_media_roots=["/srv/media", "https://host/m/", "s3://b/p"]
    )
    assert ok.allowed_media_roots[1] == "https://host/m/"
    for bad in (
        {"allowed_media_roots": ["media/extra"]},  # relative: the YAML's directory is not known here
        {"allowed_media_roots": ["https://host/m/"]},  # http without allow_http
        {"allowed_media_roots": ["ftp://host/"]},
        {"allowed_media_roots": ["simplecache::s3://b/"]},
        {"remote_protocols": ["https"]},
        {"remote_protocols": ["file"]},
        {"remote_protocols": ["s3://"]},
    ):
        with pytest.raises(ValueError, match="Try"):
            InputConfig(path="x", **bad)
