"""Remote media fetched with a policy: time limits, bounded retries, a size cap while streaming, redirects
kept inside the trust boundary, connections reused, and fetches run ahead of the rows that need them.

``actors.media.policy`` decides whether a row may reach a URL; this module reads it:

- ``s3://`` through ``pyarrow.fs.S3FileSystem`` (``schemas.storage``: the job's endpoint and region,
  credentials from the AWS SDK's usual chain), with ``media.remote_timeout_s`` as the request's timeout and
  ``media.remote_attempts`` as the SDK's retry attempts (throttling, 5xx, resets; exponential backoff);
- ``http(s)://`` through one ``urllib3.PoolManager`` per CPU actor (kept-alive connections), with the
  same time limit per attempt (connect, each read and the whole body), the same attempts for 429, 5xx,
  resets and time-outs, and redirects followed by hand: each hop must pass the policy again, so a
  redirect to a host outside ``input.allowed_media_roots`` is ``MEDIA_PATH_REFUSED``;
- other protocols (``gs://``, ``az://``...) through their fsspec backends, bounded by the row's time limit.

Bytes are capped while they stream (``media.max_media_bytes``: a declared size over it is refused before
the body is read, and a body is cut one byte past it). Every failure is a ``RowError`` with a stable code:
``MEDIA_NOT_FOUND`` (404, no such key), ``MEDIA_ACCESS_DENIED`` (401/403), ``MEDIA_FETCH_TIMEOUT`` (every
attempt timed out), ``MEDIA_FETCH_FAILED`` (throttled, 5xx or reset on every attempt, or another refusal
by the server), ``MEDIA_TOO_LARGE``, ``MEDIA_PATH_REFUSED``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import urljoin

from actors.media.limits import check_media_size
from schemas.job import StorageConfig
from schemas.redact import redact
from schemas.rows import ErrorCode, RowError

TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})
MAX_REDIRECTS = 5
_CHUNK = 256 * 1024


class _Transient(Exception):
    """One attempt failed in a way worth another: ``timed_out`` tells a time-out from the rest."""

    def __init__(self, what: str, timed_out: bool = False):
        super().__init__(what)
        self.timed_out = timed_out


class RemoteFetcher:
    """Reads allowed remote URLs (see the module docstring). ``check_url(url, shown, kind)`` is the
    trust boundary's URL check (it raises ``MEDIA_PATH_REFUSED``), applied to every redirect."""

    def __init__(
        self,
        max_bytes: int,
        timeout_s: float = 30.0,
        attempts: int = 3,
        concurrency: int = 8,
        storage: StorageConfig | None = None,
        check_url: Callable[[str, str, str], str] | None = None,
        backoff_s: float = 0.2,
    ):
        self.max_bytes, self.timeout_s, self.attempts = max_bytes, timeout_s, attempts
        self.backoff_s = backoff_s
        base = storage or StorageConfig()
        self.storage = base.model_copy(
            update={"request_timeout_s": timeout_s, "connect_timeout_s": timeout_s, "max_attempts": attempts}
        )
        self.check_url = check_url
        self.concurrency = concurrency
        self._pool = None  # urllib3.PoolManager, made on first use
        self._executor: ThreadPoolExecutor | None = None
        self._ahead: dict[tuple[str, str], Future] = {}
        self._lock = threading.Lock()

    # --- ahead of the rows -------------------------------------------------------------------------
    def prefetch(self, items: Iterable[tuple[str, str, str]]) -> int:
        """Start fetching ``(url, shown, kind)`` items, at most ``concurrency`` at once; ``fetch`` of the
        same item then waits for that download instead of starting its own. Returns how many started."""
        started = 0
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="media-fetch")
            for url, shown, kind in items:
                if (url, kind) not in self._ahead:
                    self._ahead[(url, kind)] = self._executor.submit(self._fetch, url, shown, kind)
                    started += 1
        return started

    def forget(self) -> None:
        """Drop fetched items no row asked for (their rows failed before their media were read)."""
        with self._lock:
            ahead, self._ahead = self._ahead, {}
        for future in ahead.values():
            future.cancel()

    def fetch(self, url: str, shown: str, kind: str) -> bytes:
        """The bytes of ``url`` (already allowed by the policy), or a ``RowError``."""
        with self._lock:
            future = self._ahead.pop((url, kind), None)
        if future is not None and not future.cancelled():
            return future.result()  # the row's time limit bounds this wait
        return self._fetch(url, shown, kind)

    # --- one item ---------------------------------------------------------------------------------
    def _fetch(self, url: str, shown: str, kind: str) -> bytes:
        shown = redact(shown)  # a presigned URL's signature stays out of error rows and logs
        scheme = url.split("://", 1)[0].lower()
        if scheme == "s3":
            return self._fetch_s3(url, shown, kind)
        if scheme in ("http", "https"):
            return self._with_retries(lambda: self._http_once(url, shown, kind), shown, kind)
        return self._fetch_fsspec(url, shown, kind)

    def _with_retries(self, attempt: Callable[[], bytes], shown: str, kind: str) -> bytes:
        last: _Transient | None = None
        for n in range(self.attempts):
            if n:
                time.sleep(self.backoff_s * 2 ** (n - 1) * (1 + random.random()))  # jittered, exponential
            try:
                return attempt()
            except _Transient as e:
                last = e
        assert last is not None
        return _raise_exhausted(kind, shown, last, self.attempts, self.timeout_s)

    def _fetch_s3(self, url: str, shown: str, kind: str) -> bytes:
        from schemas.errors import JobError
        from schemas.storage import filesystem_for

        try:
            fs, path = filesystem_for(url, self.storage)  # the SDK retries transient errors itself
        except JobError as e:  # options or user info in the URL: the job's URIs may not have them either
            raise RowError(
                ErrorCode.MEDIA_PATH_REFUSED,
                f"{kind} URL {shown!r} holds '?' options or user info, which s3:// URLs may not. Try the "
                "object's plain s3://bucket/key URL (credentials come from the job's AWS settings).",
            ) from e
        try:
            with fs.open_input_file(path) as f:  # a HEAD: the size before any byte of the body
                size = f.size()
                _check_size(size, self.max_bytes, kind, shown)
                data = f.read(size + 1)  # one ranged GET; a grown object still stops at the cap
        except RowError:
            raise
        except FileNotFoundError as e:
            raise _not_found(kind, shown, "no such object") from e
        except OSError as e:
            text = str(e)
            if "ACCESS_DENIED" in text or "HTTP status 403" in text or "HTTP status 401" in text:
                raise _denied(kind, shown) from e
            if "NO_SUCH_KEY" in text or "HTTP status 404" in text:
                raise _not_found(kind, shown, "no such object") from e
            timed_out = "curlCode: 28" in text or "Timeout" in text
            return _raise_exhausted(
                kind, shown, _Transient(_short(text), timed_out), self.attempts, self.timeout_s
            )
        _check_size(len(data), self.max_bytes, kind, shown, exact=False)
        return data

    def _http_once(self, url: str, shown: str, kind: str) -> bytes:
        import urllib3

        pool = self._http_pool()
        deadline = time.monotonic() + self.timeout_s
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = pool.request(
                    "GET", url, preload_content=False, redirect=False, retries=False,
                    timeout=urllib3.Timeout(connect=self.timeout_s, read=self.timeout_s),
                )  # fmt: skip
            except urllib3.exceptions.TimeoutError as e:
                raise _Transient(f"timed out ({type(e).__name__})", timed_out=True) from e
            except urllib3.exceptions.HTTPError as e:  # refused, reset, DNS, TLS
                raise _Transient(_short(str(e))) from e
            try:
                status = response.status
                if status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                    target = urljoin(url, response.headers["Location"])
                    if self.check_url is None:
                        raise _refused_redirect(kind, shown, target)
                    url = self.check_url(target, f"{shown} (redirected to {target})", kind)
                    response.drain_conn()
                    response.release_conn()
                    continue
                if status in (404, 410):
                    raise _not_found(kind, shown, f"HTTP {status}")
                if status in (401, 403):
                    raise _denied(kind, shown, f"HTTP {status}")
                if status in TRANSIENT_HTTP:
                    raise _Transient(f"HTTP {status}")
                if status != 200:
                    raise RowError(
                        ErrorCode.MEDIA_FETCH_FAILED,
                        f"{kind} URL {shown!r} answered HTTP {status}. Try checking the URL, or store the "
                        "bytes in the column.",
                    )
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit():
                    _check_size(int(declared), self.max_bytes, kind, shown)
                data = self._read_body(response, deadline, kind, shown)
            except BaseException:
                response.close()  # not drained: a capped or stalled body is dropped with its connection
                raise
            response.release_conn()  # read to its end: the connection goes back to the pool
            return data
        raise RowError(
            ErrorCode.MEDIA_PATH_REFUSED,
            f"{kind} URL {shown!r} redirected more than {MAX_REDIRECTS} times. Try the final URL.",
        )

    def _read_body(self, response, deadline: float, kind: str, shown: str) -> bytes:
        import urllib3

        data = bytearray()
        try:
            while chunk := response.read1(_CHUNK):  # what has come: a trickle still meets the deadline
                data += chunk
                _check_size(len(data), self.max_bytes, kind, shown, exact=False)
                if time.monotonic() > deadline:  # a trickle of bytes never times out a single read
                    raise _Transient("the body took too long", timed_out=True)
        except urllib3.exceptions.TimeoutError as e:
            raise _Transient("timed out reading", timed_out=True) from e
        except urllib3.exceptions.HTTPError as e:  # reset mid-body, short body
            raise _Transient(_short(str(e))) from e
        return bytes(data)

    def _http_pool(self):
        import urllib3

        with self._lock:
            if self._pool is None:
                # One pool per actor: connections to a host are kept alive and reused across rows.
                self._pool = urllib3.PoolManager(num_pools=32, maxsize=self.concurrency, block=False)
            return self._pool

    def _fetch_fsspec(self, url: str, shown: str, kind: str) -> bytes:
        try:
            import fsspec

            fs, inner = fsspec.core.url_to_fs(url)
            info = fs.info(inner)
            if info.get("type") != "file":
                raise RowError(
                    ErrorCode.MEDIA_PATH_REFUSED,
                    f"{kind} path {shown!r} is a {info.get('type') or 'non-file'}, not a file. Try a file's URL.",
                )
            if isinstance(info.get("size"), int):
                _check_size(info["size"], self.max_bytes, kind, shown)
            with fs.open(inner, "rb") as f:
                data = f.read(self.max_bytes + 1)
        except RowError:
            raise
        except ImportError as e:  # the protocol's fsspec backend (gcsfs, adlfs) is not installed
            raise RowError(
                ErrorCode.MEDIA_FETCH_FAILED,
                f"{kind} path {shown!r} needs an fsspec backend that is not installed ({e}). Try installing it.",
            ) from e
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise _not_found(kind, shown, type(e).__name__) from e
        except PermissionError as e:
            raise _denied(kind, shown) from e
        except (OSError, ValueError) as e:
            raise RowError(
                ErrorCode.MEDIA_FETCH_FAILED, f"{kind} path {shown!r} could not be read: {_short(str(e))}."
            ) from e
        _check_size(len(data), self.max_bytes, kind, shown, exact=False)
        return data


def _check_size(size: int, max_bytes: int, kind: str, shown: str, exact: bool = True) -> None:
    check_media_size(size, max_bytes, kind, repr(shown), exact=exact)


def _short(text: str) -> str:
    return " ".join(text.split())[:300]


def _not_found(kind: str, shown: str, why: str) -> RowError:
    return RowError(
        ErrorCode.MEDIA_NOT_FOUND,
        f"{kind} URL {shown!r} does not exist ({why}). Check the path, or store the bytes in the column.",
    )


def _denied(kind: str, shown: str, why: str = "access denied") -> RowError:
    return RowError(
        ErrorCode.MEDIA_ACCESS_DENIED,
        f"{kind} URL {shown!r} was refused by its server ({why}). Try giving the job's credentials read "
        "access there, or store the bytes in the column.",
    )


def _refused_redirect(kind: str, shown: str, target: str) -> RowError:
    return RowError(
        ErrorCode.MEDIA_PATH_REFUSED,
        f"{kind} URL {shown!r} redirects to {target!r}, and redirects are not followed here.",
    )


def _raise_exhausted(kind: str, shown: str, last: _Transient, attempts: int, timeout_s: float):
    if last.timed_out:
        raise RowError(
            ErrorCode.MEDIA_FETCH_TIMEOUT,
            f"{kind} URL {shown!r} timed out ({attempts} attempts of at most {timeout_s:g} s: {last}). Try "
            "raising media.remote_timeout_s or media.remote_attempts, or a closer copy of the data.",
        )
    raise RowError(
        ErrorCode.MEDIA_FETCH_FAILED,
        f"{kind} URL {shown!r} failed {attempts} attempts ({last}); the store was throttling, failing or "
        "resetting connections. Try raising media.remote_attempts, or run the rows with this code again "
        "later into another output (resume skips every row already in the output, error rows included).",
    )
