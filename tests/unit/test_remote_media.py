"""Remote media fetched with a policy (actors/media/fetch.py): each failure of a remote item is an error
row with its own stable code, the rest of the batch goes on; retries, caps, redirects, pooled and
concurrent fetches, against a local HTTP server of bad hosts and the S3 test server."""

import logging
import time
from urllib.parse import urlencode

import pyarrow as pa
import pytest

from actors.media.policy import MediaSource, read_media_path
from actors.preprocess import PreprocessRows
from schemas.redact import redact
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


# --- what of a URL is shown: error rows, messages and logs hold no secret (schemas/redact.py) ------------

# The strings: a presigned S3 URL, an Azure SAS (sig is its secret), a signed GCS URL, a token.
SIGNED = "X-Amz-Signature=AMZSECRET&sig=SASSECRET&token=TOKSECRET&X-Goog-Signature=GOOGSECRET"
READABLE = "se=2024-01-01T00:00:00Z&sp=r&v=1"  # expiry, permissions, a version: kept as they are


def _message(path, source):
    with pytest.raises(RowError) as e:
        read_media_path(path, source, "image")
    return e.value.message


def _assert_redacted(text: str):
    assert "SECRET" not in text and "PASSWORD" not in text, text
    assert "***" in text, text


def test_no_secret_of_a_url_reaches_an_error_row(web):
    source = _source(web)
    refused = _message(f"https://user:PASSWORD@elsewhere.example/a.png?{SIGNED}&{READABLE}", source)
    _assert_redacted(refused)
    assert READABLE in refused and "elsewhere.example/a.png" in refused  # still says which URL
    _assert_redacted(_message(f"ftp://h/a.png?{SIGNED}", source))  # a refused protocol
    target = web.url(f"/cat.jpg?{SIGNED}", host="localhost")  # a redirect outside the allowed hosts
    redirected = _message(web.url("/redirect?" + urlencode({"to": target})), source)
    _assert_redacted(redirected)
    assert "(redirected to http://localhost" in redirected
    _assert_redacted(_message(web.url(f"/missing?{SIGNED}&{READABLE}"), source))  # a fetch failure
    _assert_redacted(_message(web.url(f"/slow?{SIGNED}"), _source(web, remote_attempts=1)))


def test_redaction_hides_credentials_and_keeps_the_rest_readable():
    assert redact(f"https://a.blob.core.windows.net/c/x.png?sv=2022-11-02&{READABLE}&sig=SASSECRET%3D") == (
        f"https://a.blob.core.windows.net/c/x.png?sv=2022-11-02&{READABLE}&sig=***"
    )
    shown = redact(
        "gs://b/x?X-Goog-Credential=svc%40p%2F20240101&X-Goog-Date=20240101T000000Z&X-Goog-SignedHeaders=host"
        "&X-Amz-Security-Token=T&AWSAccessKeyId=AKIA&access_token=T&api_key=K&apikey=K&password=P&secret=S"
        "&s=0123456789abcdef0123456789abcdef&monkey=1#id_token=T"
    )
    assert shown == (
        "gs://b/x?X-Goog-Credential=***&X-Goog-Date=20240101T000000Z&X-Goog-SignedHeaders=host"
        "&X-Amz-Security-Token=***&AWSAccessKeyId=***&access_token=***&api_key=***&apikey=***&password=***"
        "&secret=***&s=***&monkey=1#id_token=***"  # a long opaque value of an unknown name is hidden too
    )
    assert redact("s3://AKIA:p@ss@bucket/key=2024/x.parquet") == "s3://***@bucket/key=2024/x.parquet"
    assert redact("https://h/x?next=%3Fsig%3DSECRET") == "https://h/x?next=***"  # a URL in a URL
    assert redact(redact(f"https://h/x?{SIGNED}")) == redact(f"https://h/x?{SIGNED}")
    long_path = "a" * 1_000_000 + "://" + "b" * 1_000_000
    started = time.monotonic()
    assert redact(long_path + "?" + "c" * 1_000_000) == long_path + "?" + "c" * 1_000_000
    assert time.monotonic() - started < 5  # a hostile row's path is scanned once, not quadratically


def test_log_lines_of_the_job_are_redacted(capsys):
    from jobs.run import main

    handler = logging.StreamHandler()
    logging.getLogger().addHandler(handler)
    try:
        main(["--help"])  # puts the filter on this process's log handlers
        try:
            raise OSError(f"could not read https://h/x?{SIGNED}")
        except OSError:
            logging.getLogger("phi4mm_batch.test").exception("fetching https://u:PASSWORD@h/y?%s", SIGNED)
    finally:
        logging.getLogger().removeHandler(handler)
    err = capsys.readouterr().err
    assert "fetching https://***@h/y?" in err and "could not read" in err
    _assert_redacted(err)
