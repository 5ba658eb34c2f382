"""A real HTTP server on 127.0.0.1 for the data tests: serves bytes the tests generate, counts requests,
and injects failures (HTTP errors, a connection reset or a close mid-body, a slow body, no Range)."""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    body: bytes
    # consumed one per request: an HTTP status (404, 500, ...), "reset" (RST after half the body),
    # "truncate" (clean close after half the body), "slow" (the body in chunks with pauses), "ok"
    faults: list[str | int] = field(default_factory=list)
    ranges: bool = True  # honour Range requests
    slow_s: float = 0.05  # pause between the chunks of a slow body


@dataclass
class Hit:
    path: str
    range: str | None
    status: int
    fault: str | int | None


class Server:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server._serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # type: ignore[method-assign]  # resets

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path.lstrip('/')}"

    def add(self, path: str, body: bytes, *faults: str | int, ranges: bool = True, slow_s: float = 0.05) -> str:
        self.routes["/" + path.lstrip("/")] = Route(body, list(faults), ranges, slow_s)
        return self.url(path)

    def requests(self, path: str | None = None) -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if path is None or h.path == "/" + path.lstrip("/")]

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        route = self.routes.get(h.path)
        fault: str | int | None = None
        with self._lock:
            if route is not None and route.faults:
                fault = route.faults.pop(0)
        rng = h.headers.get("Range")

        def hit(status: int) -> None:
            with self._lock:
                self.hits.append(Hit(h.path, rng, status, fault))

        if route is None:
            hit(404)
            h.send_error(404)
            return
        if isinstance(fault, int):
            hit(fault)
            h.send_error(fault)
            return
        body, status, start = route.body, 200, 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and route.ranges:
            start = int(m.group(1))
            if start >= len(body):
                hit(416)
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(body)}")
                h.end_headers()
                return
            status = 206
        hit(status)
        h.send_response(status)
        h.send_header("Content-Length", str(len(body) - start))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        h.end_headers()
        rest = body[start:]
        if fault in ("reset", "truncate"):
            h.wfile.write(rest[: len(rest) // 2])
            h.wfile.flush()
            if fault == "reset":  # SO_LINGER 0: close() sends RST instead of FIN
                h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
            h.close_connection = True
            return
        if fault == "slow":
            step = max(len(rest) // 5, 1)
            for i in range(0, len(rest), step):
                h.wfile.write(rest[i : i + step])
                h.wfile.flush()
                time.sleep(route.slow_s)
            return
        h.wfile.write(rest)


@contextmanager
def serve() -> Iterator[Server]:
    server = Server()
    thread = threading.Thread(target=server.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        thread.join(timeout=5)
