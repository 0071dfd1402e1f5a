"""Remote media fetched with a policy (actors/media_fetch.py): each failure of a remote item is an error
row with its own stable code, the rest of the batch goes on; retries, caps, redirects, pooled and
concurrent fetches, against a local HTTP server of bad hosts and the S3 test server."""

import time

import pyarrow as pa
import pytest

from actors.media_policy import MediaSource, read_media_path
from actors.preprocess import PreprocessRows
from schemas.rows import ErrorCode, RowError
from tests.helpers import MEDIA, make_config
from tests.media_http_server import MediaHTTPServer

CAT = (MEDIA / "cat.jpg").read_bytes()


@pytest.fixture
def web():
    files = {"/cat.jpg": CAT, **{f"/held/{n}.jpg": CAT for n in range(12)}}
    with MediaHTTPServer(files, slow_s=3.0) as server:
        yield server


def _source(web, **kw):
    kw = {"remote_timeout_s": 1.0, "remote_attempts": 3, **kw}
    return MediaSource(media_root="/nowhere", allow_http=True, allowed_roots=(web.url("/"),), **kw)


def _code(path, source):
    with pytest.raises(RowError) as e:
        read_media_path(path, source, "image")
    return e.value.code


def test_each_http_failure_has_its_own_code(web):
    source = _source(web, max_bytes=1_000_000)
    assert read_media_path(web.url("/cat.jpg"), source, "image") == CAT
    assert _code(web.url("/missing"), source) == ErrorCode.MEDIA_NOT_FOUND
    assert _code(web.url("/denied"), source) == ErrorCode.MEDIA_ACCESS_DENIED
    assert _code(web.url("/slow"), source) == ErrorCode.MEDIA_FETCH_TIMEOUT
    assert _code(web.url("/trickle"), source) == ErrorCode.MEDIA_FETCH_TIMEOUT  # each read is quick
    assert _code(web.url("/reset"), source) == ErrorCode.MEDIA_FETCH_FAILED
    assert _code(web.url("/declared-huge"), source) == ErrorCode.MEDIA_TOO_LARGE
    assert _code(web.url("/endless"), source) == ErrorCode.MEDIA_TOO_LARGE  # cut one byte past the cap
    assert web.requests.count("/missing") == web.requests.count("/denied") == 1  # not retried
    assert web.requests.count("/slow") == web.requests.count("/reset") == 3  # retried, then given up


def test_a_presigned_urls_signature_stays_out_of_its_error_row(web):
    signed = web.url("/missing?X-Amz-Credential=AKIA-SECRET&X-Amz-Signature=SIGNATURE-SECRET&v=1")
    with pytest.raises(RowError) as e:
        read_media_path(signed, _source(web), "image")
    assert e.value.code == ErrorCode.MEDIA_NOT_FOUND and "v=1" in str(e.value)
    assert "SECRET" not in str(e.value)


def test_transient_errors_are_retried_with_backoff(web):
    web.flaky_failures = 2
    assert read_media_path(web.url("/flaky/cat.jpg"), _source(web), "image") == CAT
    assert web.requests.count("/flaky/cat.jpg") == 3
    web.flaky_seen.clear()
    assert _code(web.url("/flaky/cat.jpg"), _source(web, remote_attempts=2)) == ErrorCode.MEDIA_FETCH_FAILED


def test_redirects_stay_inside_the_allowed_hosts(web):
    source = _source(web)
    inside = web.url(f"/redirect?to={web.url('/cat.jpg')}")
    assert read_media_path(inside, source, "image") == CAT
    other_host = web.url(f"/redirect?to={web.url('/cat.jpg', host='localhost')}")
    assert _code(other_host, source) == ErrorCode.MEDIA_PATH_REFUSED
    assert "/cat.jpg" not in web.requests[-1:]  # the other host was never asked
    to_file = web.url("/redirect?to=file:///etc/passwd")
    assert _code(to_file, source) == ErrorCode.MEDIA_PATH_REFUSED


def test_connections_are_reused(web):
    source = _source(web)
    for _ in range(5):
        assert read_media_path(web.url("/cat.jpg"), source, "image") == CAT
    assert web.connections == 1


def test_prefetch_is_concurrent_and_bounded(web):
    source = _source(web, remote_concurrency=4, remote_timeout_s=20)
    web.hold.clear()  # every /held answer waits until the test lets them go
    urls = [(web.url(f"/held/{n}.jpg"), f"{n}.jpg", "image") for n in range(12)]
    source.fetcher.prefetch(urls)
    deadline = time.monotonic() + 10
    while web.in_flight < 4 and time.monotonic() < deadline:
        time.sleep(0.01)  # waiting for the fetches to arrive, not for a duration
    web.hold.set()
    assert [source.fetcher.fetch(u, s, k) for u, s, k in urls] == [CAT] * 12
    assert web.max_in_flight == 4  # four at once: concurrent, and never more than the bound
    assert len(web.requests) == 12  # fetch() took the prefetched downloads


def test_s3_media_codes(s3):
    s3.put("media/cat.jpg", CAT)
    source = MediaSource(
        media_root=s3.url("media"),
        storage=s3.storage,
        remote_timeout_s=1.0,
        remote_attempts=2,
        max_bytes=10**6,
    )
    assert read_media_path("cat.jpg", source, "image") == CAT
    assert _code("nope.jpg", source) == ErrorCode.MEDIA_NOT_FOUND
    assert _code(s3.url("elsewhere/cat.jpg"), source) == ErrorCode.MEDIA_PATH_REFUSED
    # options in a row's s3:// URL: that row's error, not the job's
    assert _code("cat.jpg?versionId=1", source) == ErrorCode.MEDIA_PATH_REFUSED
    small = MediaSource(media_root=s3.url("media"), storage=s3.storage, max_bytes=100)
    assert _code("cat.jpg", small) == ErrorCode.MEDIA_TOO_LARGE
    if s3.server is None:
        return
    s3.server.clear_requests()
    assert _code("cat.jpg", small) == ErrorCode.MEDIA_TOO_LARGE
    assert [m for m, *_ in s3.server.requests] == ["HEAD"]  # refused from its size: the body never sent
    faults = s3.server.faults
    faults.deny(1, "media/")
    assert _code("cat.jpg", source) == ErrorCode.MEDIA_ACCESS_DENIED
    faults.throttle(1, "media/")
    assert read_media_path("cat.jpg", source, "image") == CAT  # one 503, retried
    faults.throttle(10, "media/")
    assert _code("cat.jpg", source) == ErrorCode.MEDIA_FETCH_FAILED
    faults.throttle(0)
    faults.delay_s, faults.prefix = 3.0, "media/"
    assert _code("cat.jpg", source) == ErrorCode.MEDIA_FETCH_TIMEOUT


def test_a_batch_with_bad_remote_media_goes_on(tiny_model, tmp_path, web, s3):
    s3.put("media/cat.jpg", CAT)
    cfg = make_config(
        tiny_model, tmp_path,
        input={"media_root": s3.url("media"), "allow_http": True, "allowed_media_roots": [web.url("/")]},
        media={"remote_timeout_s": 1.0, "remote_attempts": 2},
        storage={"s3_endpoint": s3.endpoint},
    )  # fmt: skip
    rows = {
        "s3": "cat.jpg", "http": web.url("/cat.jpg"), "dead": web.url("/missing"), "slow": web.url("/slow"),
        "huge": web.url("/declared-huge"), "elsewhere": "http://example.invalid/cat.jpg",
        "s3-missing": "gone.jpg",
    }  # fmt: skip
    batch = pa.Table.from_pylist([{"id": k, "image": v, "prompt": None} for k, v in rows.items()])
    out = {r["id"]: r for r in PreprocessRows(cfg)(batch).to_pylist()}
    assert list(out) == list(rows)
    codes = {k: r["error_code"] for k, r in out.items()}
    assert codes == {
        "s3": None, "http": None, "dead": "MEDIA_NOT_FOUND", "slow": "MEDIA_FETCH_TIMEOUT",
        "huge": "MEDIA_TOO_LARGE", "elsewhere": "MEDIA_PATH_REFUSED", "s3-missing": "MEDIA_NOT_FOUND",
    }  # fmt: skip
    assert out["s3"]["images"][0]["uuid"] == out["http"]["images"][0]["uuid"]  # the same bytes
