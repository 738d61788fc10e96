"""HTTP for `capwatch serve`: /metrics and /healthz, nothing else, bounded.

capwatch runs as a DaemonSet; its port is reachable from every pod that a
NetworkPolicy does not stop. So the endpoint holds the limits itself:

* one asyncio loop on one thread (no thread per connection); at most
  ``max_connections`` open. A new connection over the cap takes the slot of the
  oldest one still sending its request (a slow client cannot hold the door:
  a scraper sends its request at once), or is closed when there is none;
* the request line and headers must arrive whole within ``request_timeout``
  seconds (total, not per read: slowloris) and in ``max_request_bytes``;
  a request body is never read; one request per connection (``Connection:
  close``, as http.server's HTTP/1.0 did);
* GET and HEAD only (405 otherwise), HTTP/1.x only;
* one scrape at a time, computed on a worker thread; requests that arrive while
  it runs wait for it and get the same bytes (single flight);
* a response is written within ``write_timeout`` or the connection is aborted;
* clients that go away mid-request are counted, never a traceback;
* ``/healthz`` answers 503 while the last scrape failed or one has run past
  ``scrape_timeout``, or any health check (a callable returning
  ``(ok, reason)``) says not ok.

The connection outcomes are appended to ``/metrics`` as
``capwatch_http_connections_total{outcome}``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from capwatch.errors import CapwatchError
from capwatch.listen import Listen, listen_type, parse_listen

__all__ = [
    "HTTP_METRIC_NAMES",
    "OUTCOMES",
    "HealthCheck",
    "Limits",
    "Listen",
    "MetricsServer",
    "listen_type",
    "parse_listen",
]

_log = structlog.get_logger("capwatch.sinks.server")


#: A health fact: ``(ok, reason)``. Cheap: /healthz calls it per request.
HealthCheck = Callable[[], tuple[bool, str]]

#: The endpoint's own metrics, appended to every /metrics body.
HTTP_METRIC_NAMES = ("capwatch_http_connections_total", "capwatch_http_connections_open")

#: How a connection ended (the ``outcome`` label of capwatch_http_connections_total).
OUTCOMES = (
    "served",  # a response written (any status the routing chose: 200, 404, 503)
    "timeout",  # the request did not arrive whole in time (408)
    "too_large",  # request line + headers over the limit (431)
    "bad_request",  # not an HTTP/1.x request line (400)
    "method_not_allowed",  # not GET/HEAD (405)
    "evicted",  # closed while sending its request, for a newer connection
    "refused",  # over the cap with nothing to evict: closed at once
    "reset",  # the client went away (reset, EOF mid-request, stopped reading)
    "scrape_failed",  # /metrics answered 500
)

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Limits:
    max_connections: int = 64
    request_timeout: float = 5.0  # whole request line + headers
    write_timeout: float = 10.0  # whole response
    scrape_timeout: float = 30.0  # a /metrics request waits this long for its scrape
    max_request_bytes: int = 8192  # request line + headers
    # The kernel's accept queue, and how many connections one loop turn accepts:
    # small, so that a connect flood waits in the kernel rather than evicting,
    # in one burst, a scraper accepted a moment earlier (bench/endpoint.py:
    # 128 let 28 of 925 flood requests be reset, 16 none).
    accept_backlog: int = 16


def _bind(listen: Listen, backlog: int) -> socket.socket:
    family, host = listen.family, listen.host
    if family == socket.AF_UNSPEC:
        info = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM)[0]
        family, host = info[0], str(info[4][0])
    # A socket of this family for this server only: no class attribute changed.
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, listen.port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class _Conn:
    __slots__ = ("reading", "refused_as", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.reading = True  # still sending its request: may be evicted
        # the outcome of a request refused (408, 431, 400, 405), known before the
        # reply is written: it stands even if the client resets meanwhile
        self.refused_as: str | None = None


class MetricsServer:
    """GET/HEAD /metrics and /healthz on one asyncio thread; 404 elsewhere.

    ``render`` builds the /metrics body (on a worker thread, one at a time);
    ``health`` is one check or several, all must be ok for /healthz to be 200.
    The socket is bound in the constructor (fail before any kernel work).
    """

    def __init__(
        self,
        render: Callable[[], bytes],
        health: HealthCheck | Sequence[HealthCheck],
        listen: Listen,
        limits: Limits | None = None,
    ) -> None:
        self.render = render
        self.checks: list[HealthCheck] = [health] if callable(health) else list(health)
        self.limits = limits or Limits()
        try:
            self._sock = _bind(listen, self.limits.accept_backlog)
        except OSError as exc:
            raise CapwatchError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        self.port: int = self._sock.getsockname()[1]
        self.outcomes: Counter[str] = Counter(dict.fromkeys(OUTCOMES, 0))
        self.scrapes = 0  # scrapes computed
        self.scrape_waiters = 0  # /metrics requests served by a scrape another started
        self.scrape_error: str | None = None  # the last scrape's failure, None if it worked
        self._conns: OrderedDict[int, _Conn] = OrderedDict()  # oldest first
        self._inflight: asyncio.Future[bytes] | None = None
        self._scrape_started: float | None = None  # monotonic, while one runs
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capwatch-scrape")
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capwatch-http", daemon=True)
        self._server: asyncio.AbstractServer | None = None

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._started.wait(10)

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        elif not self._thread.ident:  # never started
            self._loop.close()
        self._sock.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(
            asyncio.start_server(
                self._handle,
                sock=self._sock,
                limit=self.limits.max_request_bytes,
                backlog=self.limits.accept_backlog,
            )
        )
        self._started.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for c in list(self._conns.values()):
                c.writer.transport.abort()
            tasks = asyncio.all_tasks(loop)
            for t in tasks:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            if self._inflight is not None:
                # A scrape still running: let it finish (bounded) so that its
                # completion does not land on a closed loop, and so that the
                # caller closes the kernel maps only after it.
                loop.run_until_complete(asyncio.wait([self._inflight], timeout=5))
            loop.close()

    # -- health ----------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        """All checks, then the last scrape: the first failing reason, or the first ok one."""
        reasons = []
        for check in self.checks:
            ok, why = check()
            if not ok:
                return False, why
            reasons.append(why)
        if self.scrape_error is not None:
            return False, f"last scrape failed: {self.scrape_error}"
        started = self._scrape_started
        if started is not None and time.monotonic() - started > self.limits.scrape_timeout:
            return False, f"scrape running for {time.monotonic() - started:.0f}s"
        return True, reasons[0] if reasons else "ok"

    # -- connections -----------------------------------------------------------

    def _admit(self, key: int, conn: _Conn) -> bool:
        if len(self._conns) >= self.limits.max_connections:
            # The oldest connection still sending its request. (A grace period
            # before eviction was tried: a reconnecting slowloris then keeps the
            # table full of young connections and scrapers are refused.)
            victim = next((k for k, c in self._conns.items() if c.reading), None)
            if victim is None:
                return False
            self._conns.pop(victim).writer.transport.abort()  # counted by its handler
        self._conns[key] = conn
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        key = id(writer)
        conn = _Conn(writer)
        if not self._admit(key, conn):
            self.outcomes["refused"] += 1
            writer.transport.abort()
            return
        # drain() returns once every byte is with the kernel: nothing is left in
        # user space when the connection is closed, and a reader too slow to take
        # the reply within write_timeout is cut off.
        writer.transport.set_write_buffer_limits(high=0)
        outcome: str | None = None
        try:
            outcome = await self._serve(reader, writer, conn)
            self.outcomes[outcome] += 1
            conn.reading = True  # lingering: a newer connection may take the slot
            await self._linger(reader, writer)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass  # went away, or stopped reading our reply
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except Exception as exc:  # a bug: one line, never a traceback per request
            _log.warning(
                "http_handler_error", error=" ".join(f"{type(exc).__name__}: {exc}".split())
            )
        finally:
            if not writer.is_closing():
                writer.transport.abort()
            gone = self._conns.pop(key, None) is None
            if outcome is None:
                self.outcomes[conn.refused_as or ("evicted" if gone else "reset")] += 1

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then discard what the client still sends (a body never read)
        for a moment: closing with unread input would reset the connection and
        could destroy the reply before the client reads it."""
        if writer.can_write_eof():
            writer.write_eof()
        deadline = time.monotonic() + 1.0
        discarded = 0
        while discarded < 1 << 20:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                chunk = await asyncio.wait_for(reader.read(8192), left)
            except TimeoutError:
                return
            if not chunk:
                break
            discarded += len(chunk)
        writer.close()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn
    ) -> str:
        lim = self.limits
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), lim.request_timeout)
        except TimeoutError:
            conn.refused_as = "timeout"
            await self._reply(writer, 408, b"request timeout\n", head_only=False)
            return "timeout"
        except (asyncio.LimitOverrunError, ValueError):
            conn.refused_as = "too_large"
            await self._reply(writer, 431, b"request too large\n", head_only=False)
            return "too_large"
        conn.reading = False
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            conn.refused_as = "bad_request"
            await self._reply(writer, 400, b"bad request\n", head_only=False)
            return "bad_request"
        method, target, _version = parts
        if method not in ("GET", "HEAD"):
            conn.refused_as = "method_not_allowed"
            await self._reply(
                writer, 405, b"only GET and HEAD\n", head_only=False, extra=b"Allow: GET, HEAD\r\n"
            )
            return "method_not_allowed"
        head_only = method == "HEAD"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            try:
                body = await asyncio.wait_for(self._scrape(), lim.scrape_timeout)
            except Exception:  # logged once by _render; a timeout shows in /healthz
                await self._reply(writer, 500, b"scrape failed\n", head_only=head_only)
                return "scrape_failed"
            await self._reply(writer, 200, body, head_only=head_only, ctype=CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            ok, why = self.health()
            await self._reply(
                writer, 200 if ok else 503, (why + "\n").encode(), head_only=head_only
            )
        else:
            await self._reply(
                writer, 404, b"not found: try /metrics or /healthz\n", head_only=head_only
            )
        return "served"

    async def _reply(
        self,
        writer: asyncio.StreamWriter,
        code: int,
        body: bytes,
        *,
        head_only: bool,
        ctype: str = "text/plain; charset=utf-8",
        extra: bytes = b"",
    ) -> None:
        writer.write(
            f"HTTP/1.1 {code} {_REASONS[code]}\r\nServer: capwatch\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n".encode()
            + extra
            + b"\r\n"
        )
        if not head_only:
            writer.write(body)
        await asyncio.wait_for(writer.drain(), self.limits.write_timeout)

    # -- the scrape ------------------------------------------------------------

    async def _scrape(self) -> bytes:
        fut = self._inflight
        if fut is None:
            self._scrape_started = time.monotonic()
            fut = self._inflight = self._loop.run_in_executor(self._executor, self._render)
            fut.add_done_callback(self._scrape_done)
        else:
            self.scrape_waiters += 1
        return await asyncio.shield(fut)

    def _render(self) -> bytes:
        try:
            body = self.render()
        except Exception as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            if self.scrape_error is None:
                _log.warning("scrape_failed", error=reason)  # once per failing spell
            self.scrape_error = reason
            raise
        if self.scrape_error is not None:
            _log.info("scrape_recovered", after=self.scrape_error)
        self.scrape_error = None
        self.scrapes += 1
        return body + self._own_metrics()

    def _scrape_done(self, fut: asyncio.Future[bytes]) -> None:
        self._inflight = None
        self._scrape_started = None
        if not fut.cancelled():
            fut.exception()  # retrieved: no "exception was never retrieved" at exit

    def _own_metrics(self) -> bytes:
        lines = [
            "# HELP capwatch_http_connections_total HTTP connections to the metrics"
            " endpoint, by how they ended.\n",
            "# TYPE capwatch_http_connections_total counter\n",
        ]
        lines += [
            f'capwatch_http_connections_total{{outcome="{o}"}} {self.outcomes[o]}\n'
            for o in OUTCOMES
        ]
        lines += [
            "# HELP capwatch_http_connections_open Open connections to the metrics endpoint.\n",
            "# TYPE capwatch_http_connections_open gauge\n",
            f"capwatch_http_connections_open {len(self._conns)}\n",
        ]
        return "".join(lines).encode()
