"""A fault-injecting HTTP proxy in front of the moto S3 server, for the S3 fault tests.

Clients reach it exactly as users reach MinIO: AWS_ENDPOINT_URL points at the proxy, which
forwards each request to moto and, at a set rate, answers instead with one of the faults a real
object store produces:

- `throttle`: 503 SlowDown with S3's XML error body (not forwarded);
- `error`: 500 InternalError (not forwarded);
- `reset`: forwarded, so the operation happens on moto, then the response is cut: the status
  line, the headers and half of the body are sent and the connection is reset (TCP RST). A
  response without a body (PUT, DELETE, HEAD) is dropped whole: the client cannot know that its
  write succeeded, which is the case that makes an exclusive create (If-None-Match) come back
  412 when retried;
- `slow`: forwarded after a short delay (well below the clients' timeouts, so the test stays
  fast; it shuffles the order in which concurrent responses arrive).

Whether request number n of a given (method, key, query, Range) is faulted, and how, is drawn
from a RNG seeded with (seed, method, key and query, Range, n), so the faults depend neither on
how concurrent requests interleave nor on the bucket's name: the same test meets the same faults.

Standard library only (http.server, http.client, sockets); each client connection gets a thread
and its own keep-alive connection to moto.
"""

from __future__ import annotations

import http.client
import http.server
import random
import socket
import socketserver
import struct
import threading
import time
import uuid
from collections import Counter
from urllib.parse import urlsplit

KINDS = ("throttle", "error", "reset", "slow")

# Hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own business, never forwarded; Expect is
# answered by the proxy itself (http.server sends 100 Continue before we read the body).
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "expect", "proxy-connection"}

_ERRORS = {
    "throttle": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "error": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}


def _error_body(code: str, message: str, resource: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<Resource>{resource}</Resource><RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>").encode()


class FaultyS3Proxy:
    """The proxy: `start()` it, point clients at `endpoint`, read what it did in `injected`.

    Args:
        upstream: the moto server's URL, `http://127.0.0.1:PORT`.
        rate: the fraction of requests that meet a fault (0 forwards everything untouched).
        seed: seeds the fault decisions (see the module docstring).
        kinds: the faults to draw from, equally likely.
        slow_seconds: the delay of a `slow` response.
    """

    def __init__(self, upstream: str, rate: float = 0.0, seed: int = 0, kinds: tuple[str, ...] = KINDS,
                 slow_seconds: float = 0.05):
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rate = rate
        self.seed = seed
        self.kinds = tuple(kinds)
        self.slow_seconds = slow_seconds
        self.injected: Counter = Counter()
        self.log: list[tuple[str, str, str]] = []  # (kind, method, path and query) of each fault
        self.requests = 0
        self._seen: Counter = Counter()
        self._scripted: list[tuple[str, str | None, str]] = []
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """The proxy's URL, for AWS_ENDPOINT_URL."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultyS3Proxy:
        """Listen on a free loopback port and serve on a daemon thread; returns self."""
        handler = type("Handler", (_Handler,), {"proxy": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def reset_counts(self) -> None:
        """Forget what was injected so far (the fault decisions go on where they were)."""
        with self._lock:
            self.injected.clear()
            self.log.clear()
            self.requests = 0

    def faults(self) -> int:
        """Faults injected since the last reset_counts(), all kinds together."""
        with self._lock:
            return sum(self.injected.values())

    def inject_once(self, kind: str, method: str | None = None, target_contains: str = "") -> None:
        """Fault the next request whose method is `method` (any when None) and whose path and
        query contain `target_contains` with `kind`, whatever the rate: for tests of one
        particular failure (a lost response to an exclusive create, to a multipart completion)."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {KINDS}")
        with self._lock:
            self._scripted.append((kind, method, target_contains))

    def decide(self, method: str, target: str, byte_range: str) -> str | None:
        """The fault for this request, or None to forward it untouched (and count it)."""
        with self._lock:
            self.requests += 1
            for i, (kind, want_method, part) in enumerate(self._scripted):
                if (want_method is None or want_method == method) and part in target:
                    del self._scripted[i]
                    self.injected[kind] += 1
                    self.log.append((kind, method, target))
                    return kind
            # Without the bucket (tests use a fresh random one each): the same test meets the same faults.
            parts = urlsplit(target)
            signature = f"{method} {parts.path.lstrip('/').partition('/')[2]}?{parts.query} {byte_range}"
            n = self._seen[signature]
            self._seen[signature] += 1
            if self.rate <= 0:
                return None
            rng = random.Random(f"{self.seed}|{signature}|{n}")
            if rng.random() >= self.rate:
                return None
            kind = rng.choice(self.kinds)
            self.injected[kind] += 1
            self.log.append((kind, method, target))
            return kind


def retry_bounds(proxy: FaultyS3Proxy) -> tuple[int, int]:
    """What a count of retried requests (store.s3_retries) must lie between, given what `proxy`
    injected meanwhile: every 503 and 500 is re-sent by botocore (counted); a reset is re-sent by
    botocore or s3fs (counted) or by aiohttp itself when the connection drops (not counted); a
    slow answer is no failure. Only for requests made by instrumented clients in one process."""
    sure = proxy.injected["throttle"] + proxy.injected["error"]
    return sure, sure + proxy.injected["reset"]


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class _Handler(http.server.BaseHTTPRequestHandler):
    """One client connection: keep-alive HTTP/1.1, each request forwarded or faulted."""

    proxy: FaultyS3Proxy
    protocol_version = "HTTP/1.1"
    _upstream: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args) -> None:
        pass  # quiet: the test output is about the clients

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        kind = self.proxy.decide(self.command, self.path, self.headers.get("Range", ""))
        if kind in _ERRORS:
            status, reason, code, message = _ERRORS[kind]
            self._send(status, reason, [("Content-Type", "application/xml")],
                       _error_body(code, message, urlsplit(self.path).path))
            return
        if kind == "slow":
            time.sleep(self.proxy.slow_seconds)
        status, reason, headers, payload = self._forward(body)
        if kind == "reset":
            cut = payload[: len(payload) // 2] if self.command != "HEAD" else b""
            if cut:
                self._send(status, reason, headers, cut, length=len(payload))
            self._reset()
            return
        self._send(status, reason, headers, payload,
                   length=None if self.command == "HEAD" else len(payload))

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in range(2):
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(*self.proxy.upstream, timeout=60)
            try:
                self._upstream.request(self.command, self.path, body=body, headers=headers)
                resp = self._upstream.getresponse()
                payload = resp.read()
                break
            except (ConnectionError, http.client.HTTPException):
                # moto closed the idle keep-alive connection: open a new one, once.
                self._upstream.close()
                self._upstream = None
                if attempt:
                    raise
        out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"]
        if self.command == "HEAD":
            length = resp.getheader("Content-Length")
            if length is not None:
                out.append(("Content-Length", length))
        return resp.status, resp.reason, out, payload

    def _send(self, status: int, reason: str, headers: list[tuple[str, str]], payload: bytes,
              length: int | None = -1) -> None:
        self.send_response_only(status, reason)
        for k, v in headers:
            self.send_header(k, v)
        if length is not None:
            self.send_header("Content-Length", str(len(payload) if length == -1 else length))
        self.end_headers()
        if payload and self.command != "HEAD":  # a HEAD response never has a body, errors included
            self.wfile.write(payload)
        self.wfile.flush()

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), as a dying load balancer would."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # Close now, before socketserver's orderly shutdown could send a FIN first; the
            # reader holds a reference to the socket, so it is closed too.
            self.rfile.close()
            self.connection.close()
        except OSError:
            pass
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None
