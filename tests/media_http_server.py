"""A local HTTP server that plays the web's bad media hosts for the remote-media tests: dead links,
refusals, slow answers, endless and oversized bodies, flaky 503s, resets and redirects to other hosts.

    with MediaHTTPServer({"/cat.jpg": CAT}) as web: web.url("/cat.jpg")

Paths: any key of ``files`` (200 with Content-Length); ``/missing`` (404); ``/denied`` (403);
``/slow`` (waits ``slow_s`` before answering); ``/trickle`` (a byte every 0.2 s, for ever);
``/endless`` (chunked bytes, no length, for ever); ``/declared-huge`` (claims 10 GiB); ``/flaky/NAME``
(503 the first ``flaky_failures`` times per NAME, then the file NAME); ``/reset`` (connection closed
with no answer); ``/redirect?to=URL`` (302 to URL). It counts connections and the most requests in
flight at once, so tests can tell pooled and concurrent fetches without timing anything.
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from tests.s3_server import _wait_until_answering


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.owner.connections += 1

    def do_GET(self) -> None:
        owner = self.server.owner
        with owner.lock:
            owner.in_flight += 1
            owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
            owner.requests.append(self.path)
        try:
            self._answer(owner)
        finally:
            with owner.lock:
                owner.in_flight -= 1

    def _answer(self, owner: MediaHTTPServer) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        if path in owner.files:
            if path.startswith("/held"):
                owner.hold.wait(10)  # until the test lets them go
            return self._send(200, owner.files[path])
        if path == "/missing":
            return self._send(404, b"not here")
        if path == "/denied":
            return self._send(403, b"no")
        if path == "/slow":
            time.sleep(owner.slow_s)
            return self._send(200, b"late")
        if path == "/declared-huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10 * 2**30))
            self.end_headers()
            return
        if path in ("/endless", "/trickle"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"x" * (65536 if path == "/endless" else 1)
            try:
                while not owner.stopping.is_set():
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    if path == "/trickle":
                        owner.stopping.wait(0.2)
            except OSError:
                pass  # the client hung up: what a capped fetch does
            self.close_connection = True
            return
        if path.startswith("/flaky/"):
            name = "/" + path[len("/flaky/") :]
            with owner.lock:
                seen = owner.flaky_seen.get(name, 0)
                owner.flaky_seen[name] = seen + 1
            if seen < owner.flaky_failures:
                return self._send(503, b"busy")
            return self._send(200, owner.files[name])
        if path == "/reset":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if path == "/redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(parts.query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send(404, b"unknown")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # clients that hang up (time-outs, capped bodies) are what these tests make happen


class MediaHTTPServer:
    def __init__(self, files: dict[str, bytes], slow_s: float = 5.0, flaky_failures: int = 2):
        self.files, self.slow_s, self.flaky_failures = files, slow_s, flaky_failures
        self.lock = threading.Lock()
        self.connections = self.in_flight = self.max_in_flight = 0
        self.requests: list[str] = []
        self.flaky_seen: dict[str, int] = {}
        self.stopping = threading.Event()
        self.hold = threading.Event()
        self.hold.set()
        self._http = _Server(("127.0.0.1", 0), _Handler)
        self._http.owner = self
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._http.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def __enter__(self) -> MediaHTTPServer:
        self._thread.start()
        _wait_until_answering(self._http.server_address[:2])
        self.connections = 0  # the readiness probe's does not count
        self.requests.clear()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.hold.set()
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)
