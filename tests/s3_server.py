"""A small S3-compatible REST server for the tests: the object store the pipeline's tests read and write.

Neither moto nor MinIO could be installed here (README, "Tests"), so the test tier starts this server
instead: in memory, threaded, on a free loopback port, with the S3 REST calls that pyarrow's
S3FileSystem (the AWS C++ SDK) and plain HTTP clients make:

- buckets: CreateBucket (PUT /b), HeadBucket (HEAD /b), ListObjectsV2 (GET /b?list-type=2 with prefix,
  delimiter, max-keys and continuation-token), DeleteObjects (POST /b?delete);
- objects: PutObject (plain, ``aws-chunked`` or HTTP-chunked bodies), CopyObject (PUT with
  ``x-amz-copy-source``), GetObject (with ``Range``), HeadObject, DeleteObject; ``If-None-Match: *`` on a
  put is honoured (412 when the key exists), as S3 does;
- multipart uploads: CreateMultipartUpload (POST ?uploads), UploadPart (PUT ?partNumber&uploadId),
  CompleteMultipartUpload (POST ?uploadId), AbortMultipartUpload (DELETE ?uploadId), ListMultipartUploads
  (GET /b?uploads). An upload's object appears only when it is completed, whole, as on S3.

There is no rename: an object changes name only by a copy and a delete. Requests must carry an
``Authorization`` header naming the server's access key id (403 ``AccessDenied`` otherwise; the
signature itself is not verified), so a client without the credentials a test gives it fails as on S3.

Fault knobs (``S3Server.faults``), each limited to keys starting with a prefix:
- ``list_lag_s``: an object written or deleted less than this long ago is listed as it was before;
- ``throttle(n)``: the next n matching requests get 503 SlowDown;
- ``reset(n)``: the next n matching requests get their connection closed with no answer;
- ``delay_s``: each matching request waits this long before it is answered (a slow store).
Every request is logged in ``S3Server.requests`` (method, path, query) for tests to inspect.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape

ACCESS_KEY = "AKIATESTPHI4MMBATCH"
SECRET_KEY = "test-secret-never-logged-0123456789"
_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"


@dataclass
class _Object:
    data: bytes
    written: float = field(default_factory=time.time)

    @property
    def etag(self) -> str:
        return '"' + hashlib.md5(self.data).hexdigest() + '"'


@dataclass
class Faults:
    """What the server does wrong on purpose; ``prefix`` limits every knob to keys starting with it."""

    prefix: str = ""
    request: str = ""  # only requests whose "METHOD query-keys" contains this, e.g. "PUT partNumber"
    list_lag_s: float = 0.0
    delay_s: float = 0.0
    throttle_left: int = 0
    reset_left: int = 0
    deny_left: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def throttle(self, n: int, prefix: str = "", request: str = "") -> None:
        with self.lock:
            self.throttle_left, self.prefix, self.request = n, prefix, request

    def reset(self, n: int, prefix: str = "", request: str = "") -> None:
        with self.lock:
            self.reset_left, self.prefix, self.request = n, prefix, request

    def deny(self, n: int, prefix: str = "", request: str = "") -> None:
        """The next n matching requests get 403 AccessDenied, as for credentials without access there."""
        with self.lock:
            self.deny_left, self.prefix, self.request = n, prefix, request

    def take(self, kind: str, key: str, request: str = "") -> bool:
        """True when this request (on ``key``; ``request`` is "METHOD query-keys") is one of the next
        ``kind`` faults."""
        if not key.startswith(self.prefix) or self.request not in request:
            return False
        with self.lock:
            left = getattr(self, f"{kind}_left")
            if left <= 0:
                return False
            setattr(self, f"{kind}_left", left - 1)
            return True


class S3Store:
    """Buckets of objects in memory, with the listing view that ``list_lag_s`` delays."""

    def __init__(self):
        self.buckets: dict[str, dict[str, _Object]] = {}
        self.gone: dict[str, dict[str, _Object]] = {}  # deleted objects, still listed while the lag lasts
        self.uploads: dict[str, dict] = {}
        self.lock = threading.RLock()

    def listed(self, bucket: str, lag_s: float, prefix: str) -> dict[str, _Object]:
        cutoff = time.time() - lag_s
        with self.lock:
            live = {k: o for k, o in self.buckets[bucket].items() if k.startswith(prefix)}
            gone = {k: o for k, o in self.gone.get(bucket, {}).items() if k.startswith(prefix)}
        if lag_s <= 0:
            return live
        seen = {k: o for k, o in live.items() if o.written <= cutoff}
        seen.update({k: o for k, o in gone.items() if o.written > cutoff and k not in live})
        return seen


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:  # quiet: tests read S3Server.requests instead
        pass

    # --- plumbing ---------------------------------------------------------------------------------
    def _split(self) -> tuple[str, str, dict[str, str]]:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        path = unquote(parts.path).lstrip("/")
        bucket, _, key = path.partition("/")
        return bucket, key, query

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = self._read_http_chunked()
        else:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        sha = self.headers.get("x-amz-content-sha256", "")
        if "aws-chunked" in self.headers.get("Content-Encoding", "") or sha.startswith("STREAMING-"):
            return _decode_aws_chunked(raw)
        return raw

    def _read_http_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(out)
            out += self.rfile.read(size)
            self.rfile.readline()

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head=False) -> None:
        self.send_response(status)
        headers = {"Content-Length": str(len(body)), **(headers or {})}
        headers.setdefault("x-amz-request-id", uuid.uuid4().hex[:16])
        headers.setdefault("Date", formatdate(usegmt=True))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, head=False) -> None:
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{escape(message)}</Message></Error>"
        ).encode()
        self._send(status, body, {"Content-Type": "application/xml"}, head=head)

    def _xml(self, body: str) -> None:
        data = ('<?xml version="1.0" encoding="UTF-8"?>' + body).encode()
        self._send(200, data, {"Content-Type": "application/xml"})

    def _handle(self, method: str) -> None:
        bucket, key, query = self._split()
        server = self.server.owner
        server.log(method, bucket, key, query, dict(self.headers))
        body = self._body() if method in ("PUT", "POST") else b""
        faults = server.faults
        what = f"{method} {'&'.join(sorted(query))}"
        if faults.take("reset", key, what):
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if faults.delay_s and key.startswith(faults.prefix):
            time.sleep(faults.delay_s)
        if faults.take("throttle", key, what):
            return self._error(503, "SlowDown", "Please reduce your request rate.", head=method == "HEAD")
        if faults.take("deny", key, what) or f"Credential={server.access_key}/" not in self.headers.get(
            "Authorization", ""
        ):
            return self._error(403, "AccessDenied", "Access Denied", head=method == "HEAD")
        if not bucket:
            return self._xml(f'<ListAllMyBucketsResult xmlns="{_XMLNS}"><Buckets/></ListAllMyBucketsResult>')
        store = server.store
        with store.lock:
            exists = bucket in store.buckets
        if not key:
            return self._bucket(method, bucket, query, body, exists)
        if not exists:
            return self._error(404, "NoSuchBucket", f"bucket {bucket} does not exist", head=method == "HEAD")
        return self._object(method, bucket, key, query, body)

    # --- bucket calls ------------------------------------------------------------------------------
    def _bucket(self, method: str, bucket: str, query: dict, body: bytes, exists: bool) -> None:
        store = self.server.owner.store
        if method == "PUT":
            with store.lock:
                store.buckets.setdefault(bucket, {})
            return self._send(200)
        if not exists:
            return self._error(404, "NoSuchBucket", f"bucket {bucket} does not exist", head=method == "HEAD")
        if method == "HEAD":
            return self._send(200, headers={"x-amz-bucket-region": "us-east-1"})
        if method == "GET" and "location" in query:
            return self._xml(f'<LocationConstraint xmlns="{_XMLNS}"/>')
        if method == "GET" and "uploads" in query:
            with store.lock:
                ups = [(u, v) for u, v in store.uploads.items() if v["bucket"] == bucket]
            items = "".join(
                f"<Upload><Key>{escape(v['key'])}</Key><UploadId>{u}</UploadId></Upload>" for u, v in ups
            )
            return self._xml(
                f'<ListMultipartUploadsResult xmlns="{_XMLNS}"><Bucket>{bucket}</Bucket>{items}'
                "<IsTruncated>false</IsTruncated></ListMultipartUploadsResult>"
            )
        if method == "GET":
            return self._list(bucket, query)
        if method == "POST" and "delete" in query:
            keys = [e.text or "" for e in ElementTree.fromstring(body).iter() if e.tag.endswith("Key")]
            for key in keys:
                self.server.owner.delete(bucket, key)
            deleted = "".join(f"<Deleted><Key>{escape(k)}</Key></Deleted>" for k in keys)
            return self._xml(f'<DeleteResult xmlns="{_XMLNS}">{deleted}</DeleteResult>')
        if method == "DELETE":
            with store.lock:
                if store.buckets[bucket]:
                    return self._error(409, "BucketNotEmpty", "The bucket you tried to delete is not empty")
                del store.buckets[bucket]
            return self._send(204)
        return self._error(405, "MethodNotAllowed", f"{method} on a bucket")

    def _list(self, bucket: str, query: dict) -> None:
        server = self.server.owner
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        max_keys = int(query.get("max-keys") or 1000)
        after = query.get("continuation-token") or query.get("start-after") or ""
        lag = server.faults.list_lag_s if prefix.startswith(server.faults.prefix) else 0.0
        objects = server.store.listed(bucket, lag, prefix)
        entries: list[tuple[str, _Object | None]] = []
        seen_prefixes = set()
        for key in sorted(objects):
            if key <= after:
                continue
            rest = key[len(prefix) :]
            if delimiter and delimiter in rest:
                common = prefix + rest.split(delimiter, 1)[0] + delimiter
                if common in seen_prefixes or common <= after:
                    continue
                seen_prefixes.add(common)
                entries.append((common, None))
            else:
                entries.append((key, objects[key]))
        page, truncated = entries[:max_keys], len(entries) > max_keys
        contents = "".join(
            f"<Contents><Key>{escape(k)}</Key><LastModified>{_iso(o.written)}</LastModified>"
            f"<ETag>{escape(o.etag)}</ETag><Size>{len(o.data)}</Size>"
            "<StorageClass>STANDARD</StorageClass></Contents>"
            for k, o in page
            if o is not None
        )
        commons = "".join(
            f"<CommonPrefixes><Prefix>{escape(k)}</Prefix></CommonPrefixes>" for k, o in page if o is None
        )
        token = f"<NextContinuationToken>{escape(page[-1][0])}</NextContinuationToken>" if truncated else ""
        self._xml(
            f'<ListBucketResult xmlns="{_XMLNS}"><Name>{bucket}</Name><Prefix>{escape(prefix)}</Prefix>'
            f"<KeyCount>{len(page)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>"
            f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>{token}{contents}{commons}"
            "</ListBucketResult>"
        )

    # --- object calls ------------------------------------------------------------------------------
    def _object(self, method: str, bucket: str, key: str, query: dict, body: bytes) -> None:
        owner = self.server.owner
        store = owner.store
        if "uploadId" in query:
            return self._multipart(method, bucket, key, query, body)
        if method == "POST" and "uploads" in query:
            upload = uuid.uuid4().hex
            with store.lock:
                store.uploads[upload] = {"bucket": bucket, "key": key, "parts": {}}
            return self._xml(
                f'<InitiateMultipartUploadResult xmlns="{_XMLNS}"><Bucket>{bucket}</Bucket>'
                f"<Key>{escape(key)}</Key><UploadId>{upload}</UploadId></InitiateMultipartUploadResult>"
            )
        if method == "PUT":
            source = self.headers.get("x-amz-copy-source")
            if source:
                src_bucket, _, src_key = unquote(source).lstrip("/").partition("/")
                with store.lock:
                    obj = store.buckets.get(src_bucket, {}).get(src_key)
                if obj is None:
                    return self._error(404, "NoSuchKey", f"copy source {source} does not exist")
                owner.put(bucket, key, obj.data)
                return self._xml(
                    f'<CopyObjectResult xmlns="{_XMLNS}"><ETag>{escape(obj.etag)}</ETag>'
                    f"<LastModified>{_iso(time.time())}</LastModified></CopyObjectResult>"
                )
            if self.headers.get("If-None-Match", "").strip() == "*":
                with store.lock:
                    if key in store.buckets[bucket]:
                        return self._error(412, "PreconditionFailed", "the object already exists")
                    owner.put(bucket, key, body)
            else:
                owner.put(bucket, key, body)
            return self._send(200, headers={"ETag": _Object(body).etag})
        if method == "DELETE":
            owner.delete(bucket, key)
            return self._send(204)
        with store.lock:
            obj = store.buckets[bucket].get(key)
        head = method == "HEAD"
        if obj is None:
            return self._error(404, "NoSuchKey", "The specified key does not exist.", head=head)
        data, status, headers = obj.data, 200, {}
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes="):
            first, _, last = ranged[len("bytes=") :].partition("-")
            if first == "":  # suffix range: the last N bytes
                start, end = max(0, len(data) - int(last)), len(data) - 1
            else:
                start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
            if start >= len(data):
                return self._error(416, "InvalidRange", "The requested range is not satisfiable", head=head)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        headers.update(
            {
                "ETag": obj.etag,
                "Last-Modified": formatdate(obj.written, usegmt=True),
                "Content-Type": "application/octet-stream",
                "Accept-Ranges": "bytes",
            }
        )
        self._send(status, data, headers, head=head)

    def _multipart(self, method: str, bucket: str, key: str, query: dict, body: bytes) -> None:
        store = self.server.owner.store
        upload_id = query["uploadId"]
        with store.lock:
            upload = store.uploads.get(upload_id)
        if upload is None:
            return self._error(404, "NoSuchUpload", "The specified upload does not exist.")
        if method == "PUT":
            with store.lock:
                upload["parts"][int(query["partNumber"])] = body
            return self._send(200, headers={"ETag": _Object(body).etag})
        if method == "POST":
            numbers = [
                int(e.text or 0) for e in ElementTree.fromstring(body).iter() if e.tag.endswith("PartNumber")
            ]
            with store.lock:
                data = b"".join(upload["parts"][n] for n in numbers)
                del store.uploads[upload_id]
            self.server.owner.put(bucket, key, data)
            return self._xml(
                f'<CompleteMultipartUploadResult xmlns="{_XMLNS}"><Bucket>{bucket}</Bucket>'
                f"<Key>{escape(key)}</Key><ETag>{escape(_Object(data).etag)}</ETag>"
                "</CompleteMultipartUploadResult>"
            )
        if method == "DELETE":
            with store.lock:
                store.uploads.pop(upload_id, None)
            return self._send(204)
        return self._error(405, "MethodNotAllowed", f"{method} on an upload")

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_PUT(self):
        self._handle("PUT")

    def do_POST(self):
        self._handle("POST")

    def do_DELETE(self):
        self._handle("DELETE")


def _decode_aws_chunked(raw: bytes) -> bytes:
    """The payload of an ``aws-chunked`` body: ``hex-size[;chunk-signature=...]\\r\\n data \\r\\n`` ...
    ending with a 0-size chunk and optional trailers (checksums)."""
    out, pos = bytearray(), 0
    while pos < len(raw):
        eol = raw.index(b"\r\n", pos)
        size = int(raw[pos:eol].split(b";")[0], 16)
        if size == 0:
            break
        out += raw[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2
    return bytes(out)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: S3Server


class S3Server:
    """``with S3Server() as s3:`` serves on ``s3.endpoint`` (http://127.0.0.1:PORT) until the block ends."""

    def __init__(self, access_key: str = ACCESS_KEY, host: str = "127.0.0.1"):
        self.access_key = access_key
        self.store = S3Store()
        self.faults = Faults()
        self.requests: list[tuple[str, str, str, dict]] = []  # (method, bucket/key, query, headers)
        self._log_lock = threading.Lock()
        self._http = _Server((host, 0), _Handler)
        self._http.owner = self
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> S3Server:
        self._thread = threading.Thread(target=self._http.serve_forever, name="s3-server", daemon=True)
        self._thread.start()
        _wait_until_answering(self._http.server_address[:2])
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self, method: str, bucket: str, key: str, query: dict, headers: dict) -> None:
        with self._log_lock:
            self.requests.append((method, f"{bucket}/{key}", "&".join(sorted(query)), headers))

    def put(self, bucket: str, key: str, data: bytes) -> None:
        with self.store.lock:
            old = self.store.buckets[bucket].get(key)
            if old is not None:  # listed as it was while the lag lasts
                self.store.gone.setdefault(bucket, {})[key] = _Object(old.data, time.time())
            self.store.buckets[bucket][key] = _Object(data)

    def delete(self, bucket: str, key: str) -> None:
        with self.store.lock:
            old = self.store.buckets.get(bucket, {}).pop(key, None)
            if old is not None:
                self.store.gone.setdefault(bucket, {})[key] = _Object(old.data, time.time())

    def age(self, seconds: float) -> None:
        """Make every object seem written ``seconds`` earlier (what a lagging listing already shows)."""
        with self.store.lock:
            for objects in (*self.store.buckets.values(), *self.store.gone.values()):
                for obj in objects.values():
                    obj.written -= seconds

    def create_bucket(self, bucket: str) -> None:
        with self.store.lock:
            self.store.buckets.setdefault(bucket, {})

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        with self.store.lock:
            return sorted(k for k in self.store.buckets.get(bucket, {}) if k.startswith(prefix))

    def get(self, bucket: str, key: str) -> bytes:
        with self.store.lock:
            return self.store.buckets[bucket][key].data

    def clear_requests(self) -> None:
        with self._log_lock:
            self.requests.clear()


def _wait_until_answering(address: tuple[str, int], timeout_s: float = 10.0) -> None:
    """Return once the server answers an HTTP request (any answer), not when a sleep has passed."""
    import http.client

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = http.client.HTTPConnection(*address, timeout=1)
            conn.request("HEAD", "/")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def object_url(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{quote(key)}"


class S3Bucket:
    """One bucket of a test: on the test server or on a real endpoint (``server`` None there)."""

    def __init__(self, endpoint: str, server: S3Server | None, name: str):
        import pyarrow.fs as pafs

        from schemas.job import StorageConfig

        self.endpoint, self.server, self.name = endpoint, server, name
        self.storage = StorageConfig(s3_endpoint=endpoint)
        self.fs = pafs.S3FileSystem(
            endpoint_override=endpoint, region=os.environ.get("AWS_REGION", "us-east-1"),
            allow_bucket_creation=True, allow_bucket_deletion=True,
        )  # fmt: skip
        self.fs.create_dir(name)
        if server is not None:
            server.faults.__init__()  # a test's faults end with it

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"

    def put(self, key: str, data: bytes) -> str:
        with self.fs.open_output_stream(f"{self.name}/{key}") as f:
            f.write(data)
        return self.url(key)

    def keys(self, prefix: str = "") -> list[str]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(f"{self.name}/{prefix}".rstrip("/"), recursive=True,
                                                        allow_not_found=True))  # fmt: skip
        return sorted(i.path[len(self.name) + 1 :] for i in infos if i.type == pafs.FileType.File)

    def clean(self) -> None:
        if self.server is not None:
            self.server.faults.__init__()
        self.fs.delete_dir(self.name)
