"""A real HTTP server on 127.0.0.1 with injectable faults, and its own request log.

Each route is a function ``(handler, nth)`` where ``nth`` counts earlier requests for the same
path, so a route can fail the first times and then succeed. The server records every request
(arrival time on its own clock, path, User-Agent, which TCP connection carried it) and the
most requests it had in flight at once, so tests judge the client by what the server saw.

It speaks HTTP/1.0, one request per connection, unless made with ``keep_alive=True``: then
HTTP/1.1, and a client may send many requests over one connection.

Routes::

    ok(body, headers=None, delay=0)            200 with Content-Length
    failing(statuses, then)                    the first requests get these (status, headers)
    cut_short(body, times=None)                Content-Length promises more than is sent
    drip(body, chunk, pause)                   the body in small chunks with pauses
    held(body, release)                        half the body, then the rest once the test
                                               sets ``release`` (a threading.Event)
    no_length(body)                            no Content-Length, body ended by closing
    redirect(location)                         302
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, routes: dict, *, keep_alive: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes = routes
        self.keep_alive = keep_alive
        self.connections = 0  # accepted so far; each request's log entry names its own
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def requests_for(self, path: str) -> list[dict]:
        with self.lock:
            return [entry for entry in self.log if entry["path"] == path]

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection; a closed socket ends a body
    # As real servers do: otherwise a body written after its headers on a kept-alive
    # connection waits for the client's delayed ACK (about 40 ms a response on Linux).
    disable_nagle_algorithm = True

    def setup(self) -> None:  # once per accepted connection
        super().setup()
        server: FaultServer = self.server
        if server.keep_alive:
            self.protocol_version = "HTTP/1.1"
        with server.lock:
            server.connections += 1
            self.connection_number = server.connections

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server: FaultServer = self.server
        path = self.path.split("?", 1)[0]
        with server.lock:
            nth = sum(1 for entry in server.log if entry["path"] == path)
            server.log.append({"time": time.monotonic(), "path": path,
                               "user_agent": self.headers.get("User-Agent", ""),
                               "connection": self.connection_number})
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            route = server.routes.get(path)
            if route is None:
                self.send_error(404, "no such file")
            else:
                route(self, nth)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up; that is what some tests want
        finally:
            with server.lock:
                server.in_flight -= 1


def _head(handler, status: int, headers: dict | None, length: int | None) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    if length is not None:
        handler.send_header("Content-Length", str(length))
    handler.end_headers()


def ok(body: bytes, headers: dict | None = None, delay: float = 0.0):
    def route(handler, nth):
        if delay:
            time.sleep(delay)
        _head(handler, 200, {"Content-Type": "audio/mpeg", **(headers or {})}, len(body))
        handler.wfile.write(body)
    return route


def failing(statuses: list[tuple[int, dict]], then):
    def route(handler, nth):
        if nth < len(statuses):
            status, headers = statuses[nth]
            message = f"error {status}".encode()
            _head(handler, status, {"Content-Type": "text/plain", **headers}, len(message))
            handler.wfile.write(message)
        else:
            then(handler, nth - len(statuses))
    return route


def cut_short(body: bytes, times: int | None = None):
    def route(handler, nth):
        if times is not None and nth >= times:
            return ok(body)(handler, nth)
        _head(handler, 200, {"Content-Type": "audio/mpeg"}, len(body))
        handler.wfile.write(body[: len(body) // 2])
        handler.wfile.flush()
        handler.close_connection = True
    return route


def drip(body: bytes, chunk: int, pause: float):
    def route(handler, nth):
        _head(handler, 200, {"Content-Type": "audio/mpeg"}, len(body))
        for start in range(0, len(body), chunk):
            handler.wfile.write(body[start : start + chunk])
            handler.wfile.flush()
            time.sleep(pause)
    return route


def held(body: bytes, release: threading.Event, *, seconds: float = 300.0):
    """Keeps a download in flight for as long as the test needs, whatever the load."""
    def route(handler, nth):
        _head(handler, 200, {"Content-Type": "audio/mpeg"}, len(body))
        handler.wfile.write(body[: len(body) // 2])
        handler.wfile.flush()
        release.wait(seconds)
        handler.wfile.write(body[len(body) // 2 :])
    return route


def no_length(body: bytes):
    def route(handler, nth):
        _head(handler, 200, {"Content-Type": "audio/mpeg"}, None)
        handler.wfile.write(body)
    return route


def redirect(location: str):
    def route(handler, nth):
        _head(handler, 302, {"Location": location}, 0)
    return route
