"""HTTP for `capwatch serve`: /metrics and /healthz, nothing else."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

from capwatch.errors import CapwatchError, UsageError

__all__ = ["MetricsServer", "parse_listen"]


def parse_listen(text: str) -> tuple[str, int]:
    """'127.0.0.1:9649', '[::1]:9649', '0.0.0.0:80' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen {text!r}: expected HOST:PORT with a port from 0 to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise UsageError(f"--listen {text!r}: give the address too (e.g. 127.0.0.1:{port})")
    return host, int(port)


class MetricsServer:
    """A small threaded HTTP server: GET /metrics, GET /healthz; 404 otherwise."""

    def __init__(
        self,
        render: Callable[[], bytes],
        health: Callable[[], tuple[bool, str]],
        host: str,
        port: int,
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            server_version = "capwatch"
            sys_version = ""

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, render(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok, why = health()
                    self._send(200 if ok else 503, (why + "\n").encode(), "text/plain")
                else:
                    self._send(404, b"not found: try /metrics or /healthz\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every second would flood the log

        try:
            ThreadingHTTPServer.address_family = (
                __import__("socket").AF_INET6 if ":" in host else __import__("socket").AF_INET
            )
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise CapwatchError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="capwatch-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        # shutdown() waits for serve_forever() to notice: only if it ever ran.
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()
