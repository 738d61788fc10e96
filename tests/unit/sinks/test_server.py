"""The metrics endpoint on a real loopback socket: limits, methods, shared scrapes, health."""

from __future__ import annotations

import http.server
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capwatch.errors import CapwatchError, UsageError
from capwatch.sinks.server import HTTP_METRIC_NAMES, Limits, Listen, MetricsServer, parse_listen


def _ok() -> tuple[bool, str]:
    return True, "ok: attached via test"


@pytest.fixture
def serve() -> Iterator[Callable[..., MetricsServer]]:
    servers: list[MetricsServer] = []

    def make(
        render: Callable[[], bytes] = lambda: b"capwatch_up 1\n",
        health: object = _ok,
        **limits: float,
    ) -> MetricsServer:
        s = MetricsServer(
            render,
            health,  # type: ignore[arg-type]
            parse_listen("127.0.0.1:0"),
            Limits(**limits),  # type: ignore[arg-type]
        )
        s.start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def get(
    s: MetricsServer, path: str, method: str = "GET", data: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{s.port}{path}", method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def counted(s: MetricsServer, outcome: str) -> int:
    """The outcome's count once the server has booked it (it may answer first)."""
    deadline = time.monotonic() + 5
    while not s.outcomes[outcome] and time.monotonic() < deadline:
        time.sleep(0.01)
    return s.outcomes[outcome]


def raw(s: MetricsServer, request: bytes, *, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
        c.sendall(request)
        if not read:
            return b""
        chunks = []
        while chunk := c.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


class TestParseListen:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("127.0.0.1:9649", Listen("127.0.0.1", 9649, socket.AF_INET)),
            ("0.0.0.0:80", Listen("0.0.0.0", 80, socket.AF_INET)),
            ("[::1]:9649", Listen("::1", 9649, socket.AF_INET6)),
            ("[::]:0", Listen("::", 0, socket.AF_INET6)),
            ("localhost:9649", Listen("localhost", 9649, socket.AF_UNSPEC)),
            ("node-1.example:1", Listen("node-1.example", 1, socket.AF_UNSPEC)),
        ],
    )
    def test_good(self, text: str, expected: Listen) -> None:
        """IPv4, bracketed IPv6 and host names give a typed address with its family."""
        assert expected == parse_listen(text)

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("nope", "expected HOST:PORT"),
            ("1.2.3.4:99999", "expected HOST:PORT"),
            (":9649", "give the address too"),
            ("::1:9649", "in brackets"),
            ("[nope]:9649", "not an IPv6 address"),
            ("300.1.1.1:9649", "not an IPv4 address"),
            ("bad_host!:9649", "not an address or host name"),
        ],
    )
    def test_bad(self, text: str, message: str) -> None:
        """Anything else is a usage error that names the problem."""
        with pytest.raises(UsageError, match=message):
            parse_listen(text)

    def test_str_round_trips(self) -> None:
        """str() gives back what --listen accepts (brackets for IPv6)."""
        for text in ("127.0.0.1:9649", "[::1]:9649", "localhost:1"):
            assert text == str(parse_listen(text))


class TestRouting:
    def test_metrics_and_healthz(self, serve: Callable[..., MetricsServer]) -> None:
        """GET /metrics is the rendered text plus the endpoint's own counters; /healthz says ok."""
        s = serve()
        code, headers, body = get(s, "/metrics")
        assert 200 == code
        assert body.startswith(b"capwatch_up 1\n")
        assert {"capwatch_http_connections_total", "capwatch_http_connections_open"} == {
            ln.split(b"{")[0].split(b" ")[0].decode()
            for ln in body.splitlines()[1:]
            if not ln.startswith(b"#")
        }
        assert set(HTTP_METRIC_NAMES) == {
            "capwatch_http_connections_total",
            "capwatch_http_connections_open",
        }
        assert "close" == headers["Connection"]
        assert (200, b"ok: attached via test\n") == get(s, "/healthz")[::2]
        assert 404 == get(s, "/nope")[0]

    def test_head_has_no_body(self, serve: Callable[..., MetricsServer]) -> None:
        """HEAD answers the headers of GET, Content-Length included, and no body."""
        s = serve()
        reply = raw(s, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"" == body
        assert int(get(s, "/metrics")[1]["Content-Length"]) > 0

    @pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "TRACE"])
    def test_other_methods_405(self, serve: Callable[..., MetricsServer], method: str) -> None:
        """Anything but GET and HEAD is 405 with Allow, and the body is never read."""
        s = serve()
        code, headers, _ = get(s, "/metrics", method=method, data=b"x" * 100_000)
        assert 405 == code
        assert "GET, HEAD" == headers["Allow"]
        assert 1 == counted(s, "method_not_allowed")

    def test_not_http(self, serve: Callable[..., MetricsServer]) -> None:
        """A request line that is not HTTP/1.x gets 400."""
        s = serve()
        assert raw(s, b"GET /metrics SPDY/3\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert raw(s, b"hello\r\n\r\n").startswith(b"HTTP/1.1 400 ")

    def test_headers_bounded(self, serve: Callable[..., MetricsServer]) -> None:
        """Request line and headers past max_request_bytes get 431, not buffered."""
        s = serve(max_request_bytes=4096)
        headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(100))
        reply = raw(s, b"GET /metrics HTTP/1.1\r\n" + headers + b"\r\n")
        assert reply.startswith(b"HTTP/1.1 431 ")
        assert 1 == counted(s, "too_large")


class TestAnyRequest:
    @settings(
        max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(st.binary(max_size=200))
    def test_any_bytes_get_a_status_line(
        self, serve: Callable[..., MetricsServer], capfd: pytest.CaptureFixture[str], junk: bytes
    ) -> None:
        """Whatever the request line and headers, the reply is a status line (never a
        handler error, never silence)."""
        s = serve()
        reply = raw(s, junk.replace(b"\r\n\r\n", b"") + b"\r\n\r\n")
        assert re.match(rb"HTTP/1\.1 (200|400|404|405|431) ", reply), reply[:100]
        out, err = capfd.readouterr()
        assert "http_handler_error" not in out + err


class TestSlowClients:
    def test_slowloris_cut_at_request_timeout(self, serve: Callable[..., MetricsServer]) -> None:
        """A client trickling a byte every 0.1 s is answered 408 and closed after the
        whole-request timeout (a per-read timeout would keep it forever)."""
        s = serve(request_timeout=1.0)
        c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        c.setblocking(False)
        t0 = time.monotonic()
        got = b""
        for b in (b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 100)[:60]:
            try:
                c.send(bytes([b]))
            except OSError:
                break
            time.sleep(0.1)
            try:
                got += c.recv(4096)
            except BlockingIOError:
                continue
            if got:
                break
        c.close()
        assert got.startswith(b"HTTP/1.1 408 "), got
        assert time.monotonic() - t0 < 5.0  # cut long before the 6 s the trickle needs
        assert 1 == counted(s, "timeout")

    def test_slow_clients_do_not_block_a_scrape(self, serve: Callable[..., MetricsServer]) -> None:
        """With the connection cap held by slow clients, a real scrape still gets
        through (it takes the slot of the oldest one still sending)."""
        s = serve(max_connections=8, request_timeout=30.0)
        slow = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(20)]
        for c in slow:
            c.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        try:
            for _ in range(3):
                code, _, body = get(s, "/metrics")
                assert 200 == code
            assert b"capwatch_up 1" in body
            open_now = [
                ln for ln in body.splitlines() if ln.startswith(b"capwatch_http_connections_open ")
            ]
            assert 1 == len(open_now)
            assert int(open_now[0].split()[1]) <= 8
            assert s.outcomes["evicted"] >= 12
        finally:
            for c in slow:
                c.close()


class TestSharedScrape:
    def test_concurrent_requests_share_one_scrape(
        self, serve: Callable[..., MetricsServer]
    ) -> None:
        """Requests that arrive while a scrape runs get its result: 8 at once, at most 2 renders."""
        renders = []
        gate = threading.Event()

        def render() -> bytes:
            renders.append(1)
            gate.wait(5)
            return b"capwatch_up %d\n" % len(renders)

        s = serve(render=render)
        results: list[bytes] = []
        threads = [
            threading.Thread(target=lambda: results.append(get(s, "/metrics")[2])) for _ in range(8)
        ]
        for t in threads:
            t.start()
        time.sleep(0.5)  # all eight are waiting on the first render
        gate.set()
        for t in threads:
            t.join(10)
        assert 8 == len(results)
        assert 1 == len(renders)
        assert {b"capwatch_up 1"} == {r.splitlines()[0] for r in results}
        assert 7 == s.scrape_waiters


class TestHealth:
    def test_failed_scrape_fails_healthz_until_one_works(
        self, serve: Callable[..., MetricsServer]
    ) -> None:
        """A scrape that raises: /metrics 500, /healthz 503 with the reason; recovered after a good one."""
        fail = [True]

        def render() -> bytes:
            if fail[0]:
                raise UnicodeEncodeError("utf-8", "ev\udcffil", 2, 3, "surrogates not allowed")
            return b"capwatch_up 1\n"

        s = serve(render=render)
        assert 200 == get(s, "/healthz")[0]
        assert 500 == get(s, "/metrics")[0]
        code, _, body = get(s, "/healthz")
        assert 503 == code
        assert body.startswith(b"last scrape failed: UnicodeEncodeError")
        fail[0] = False
        assert 200 == get(s, "/metrics")[0]
        assert 200 == get(s, "/healthz")[0]

    def test_stuck_scrape_fails_healthz(self, serve: Callable[..., MetricsServer]) -> None:
        """A scrape stuck past scrape_timeout: /metrics 500 at the timeout, /healthz 503 meanwhile."""
        release = threading.Event()

        def render() -> bytes:
            release.wait(10)
            return b"capwatch_up 1\n"

        s = serve(render=render, scrape_timeout=0.5)
        try:
            assert 500 == get(s, "/metrics")[0]
            code, _, body = get(s, "/healthz")
            assert 503 == code
            assert body.startswith(b"scrape running for ")
        finally:
            release.set()
        deadline = time.monotonic() + 10
        while get(s, "/healthz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 200 == get(s, "/metrics")[0]

    def test_every_check_must_pass(self, serve: Callable[..., MetricsServer]) -> None:
        """/healthz is 503 with the first failing check's reason (e.g. the count-map read)."""
        state = {"map": (True, "count map read ok")}
        s = serve(health=[_ok, lambda: state["map"]])
        assert (200, b"ok: attached via test\n") == get(s, "/healthz")[::2]
        state["map"] = (False, "count map read failed: EPERM")
        assert (503, b"count map read failed: EPERM\n") == get(s, "/healthz")[::2]


class TestResets:
    def test_reset_mid_reply_is_counted_quietly(
        self, serve: Callable[..., MetricsServer], capfd: pytest.CaptureFixture[str]
    ) -> None:
        """A client that resets while a big reply is written: counted, no traceback."""
        s = serve(render=lambda: b"# " + b"x" * (8 << 20) + b"\n")
        for _ in range(3):
            c = socket.create_connection(("127.0.0.1", s.port))
            c.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            c.recv(1)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()  # RST
        deadline = time.monotonic() + 10
        while s.outcomes["reset"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 3 == s.outcomes["reset"]
        assert 200 == get(s, "/healthz")[0]
        out, err = capfd.readouterr()
        assert "Traceback" not in out + err
        assert "Error" not in out + err


class TestBind:
    def test_host_name_resolves_when_binding(self) -> None:
        """--listen localhost:0 binds what the name resolves to, and serves."""
        s = MetricsServer(lambda: b"capwatch_up 1\n", _ok, parse_listen("localhost:0"))
        s.start()
        try:
            host = socket.getaddrinfo("localhost", s.port, type=socket.SOCK_STREAM)[0][4][0]
            with urllib.request.urlopen(
                f"http://{'[' + host + ']' if ':' in host else host}:{s.port}/healthz", timeout=10
            ) as r:
                assert 200 == r.status
        finally:
            s.close()

    def test_port_in_use_is_one_line(self) -> None:
        """A port in use: CapwatchError naming the address once."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            with pytest.raises(CapwatchError) as exc:
                MetricsServer(lambda: b"", _ok, parse_listen(f"127.0.0.1:{port}"))
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" == str(exc.value)


class TestNoProcessWideState:
    def test_ipv6_server_leaves_http_server_alone(
        self, serve: Callable[..., MetricsServer]
    ) -> None:
        """Listening on IPv6 changes no class attribute of the standard library."""
        try:
            s = MetricsServer(lambda: b"", _ok, parse_listen("[::1]:0"))
        except CapwatchError as exc:  # a host without IPv6 loopback
            pytest.skip(f"no IPv6 loopback: {exc}")
        try:
            assert socket.AF_INET == http.server.ThreadingHTTPServer.address_family
            assert socket.AF_INET == http.server.HTTPServer.address_family
        finally:
            s.close()
