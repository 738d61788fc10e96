"""A minimal Kubernetes API client: GET JSON and read a watch stream (stdlib only).

Only what :mod:`capwatch.attribution.k8s` needs: bearer token (re-read for every request,
since bound service-account tokens rotate, about hourly), the cluster CA, one
connection per request (a list and a watch every few minutes), and a way to
abort a blocked watch read from another thread.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from capwatch.errors import ApiError, K8sConfigError

__all__ = ["ApiClient", "ApiConfig", "ApiError", "K8sConfigError"]

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """Where the API server is and how to authenticate; ``http://`` for test servers."""

    base_url: str
    token_path: str | None = None
    ca_path: str | None = None
    timeout: float = 10.0

    @classmethod
    def in_cluster(
        cls,
        *,
        env: dict[str, str] | None = None,
        sa_dir: str = SERVICE_ACCOUNT_DIR,
    ) -> ApiConfig:
        """The pod's config: KUBERNETES_SERVICE_HOST/PORT, service-account token and CA."""
        env = dict(os.environ) if env is None else env
        host = env.get("KUBERNETES_SERVICE_HOST")
        port = env.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise K8sConfigError("KUBERNETES_SERVICE_HOST/PORT are not set: not in a cluster")
        token, ca = os.path.join(sa_dir, "token"), os.path.join(sa_dir, "ca.crt")
        for path in (token, ca):
            if not os.path.isfile(path):
                raise K8sConfigError(f"service-account file missing: {path}")
        if ":" in host:  # IPv6 service address
            host = f"[{host}]"
        return cls(base_url=f"https://{host}:{port}", token_path=token, ca_path=ca)


class ApiClient:
    """GET requests against one API server; safe to :meth:`abort` from another thread."""

    def __init__(self, config: ApiConfig) -> None:
        self.config = config
        url = urlsplit(config.base_url)
        self._https = url.scheme == "https"
        self._host = url.hostname or "localhost"
        self._port = url.port or (443 if self._https else 80)
        self._prefix = url.path.rstrip("/")
        self._ssl: ssl.SSLContext | None = None
        if self._https:
            self._ssl = ssl.create_default_context(cafile=config.ca_path)
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._aborted = False

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "capwatch"}
        if self.config.token_path:
            with open(self.config.token_path, encoding="utf-8") as f:
                headers["Authorization"] = f"Bearer {f.read().strip()}"
        return headers

    def _open(self, path: str, query: dict[str, str], timeout: float) -> http.client.HTTPResponse:
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._ssl
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        conn.connect()  # connected before it is registered, so abort() always has a socket
        with self._lock:
            if self._aborted:  # abort() came first: never start a blocking read
                conn.close()
                raise ConnectionAbortedError("client closed")
            self._conn = conn
        target = f"{self._prefix}{path}?{urlencode(query)}" if query else f"{self._prefix}{path}"
        conn.request("GET", target, headers=self._headers())
        resp = conn.getresponse()
        if resp.status != 200:
            body = resp.read(4096).decode("utf-8", "replace")
            conn.close()
            raise ApiError(resp.status, _status_message(body))
        return resp

    def get_json(self, path: str, query: dict[str, str]) -> dict[str, Any]:
        """GET ``path`` and decode the JSON object it returns."""
        resp = self._open(path, query, self.config.timeout)
        try:
            data = json.loads(resp.read())
        finally:
            self._close()
        if not isinstance(data, dict):
            raise ValueError("API answer is not a JSON object")
        return data

    def stream(
        self, path: str, query: dict[str, str], read_timeout: float
    ) -> Iterator[dict[str, Any]]:
        """GET a watch and yield its events, one JSON object per line, until the server ends it."""
        resp = self._open(path, query, read_timeout)
        try:
            while True:
                line = resp.readline()
                if not line:
                    return
                if line.strip():
                    event = json.loads(line)
                    if isinstance(event, dict):
                        yield event
        finally:
            self._close()

    def _close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def abort(self) -> None:
        """Unblock a read in progress on another thread; later requests fail at once."""
        with self._lock:
            self._aborted = True
            conn = self._conn
        sock = getattr(conn, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _status_message(body: str) -> str:
    """The ``message`` of a metav1.Status body, or the raw body start."""
    try:
        status = json.loads(body)
    except ValueError:
        return body[:200]
    if isinstance(status, dict) and isinstance(status.get("message"), str):
        return str(status["message"])
    return body[:200]
