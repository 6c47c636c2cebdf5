"""HTTP/1.1 over httptools on a plain asyncio.Protocol: framing, limits, response order.

No ASGI layer: for a small model the HTTP path decides throughput; measured while
planning on the target CPU, a lean httptools/uvloop server reached about 7.5k req/s where
the same app under an ASGI server managed 3.4k. Routing lives
in serving.app; this module only turns bytes into Requests and Responses back into bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable, Iterable
from http import HTTPStatus
from time import monotonic
from typing import Any

import httptools

log = logging.getLogger("serving")

_REASONS = {s.value: s.phrase for s in HTTPStatus}


class _HeadTooLarge(Exception):
    """Raised inside a parser callback to stop reading an oversized request head."""


class Request:
    __slots__ = ("method", "path", "query", "headers", "body", "keep_alive", "_conn", "_answer")

    def __init__(
        self, conn: HttpConnection, method: str, url: bytes, headers: dict[str, str], body: bytes
    ) -> None:
        parsed = httptools.parse_url(url)
        self.method = method
        self.path = parsed.path.decode("latin-1")
        self.query = (parsed.query or b"").decode("latin-1")
        self.headers = headers
        self.body = body
        self.keep_alive = conn.parser.should_keep_alive()
        self._conn = conn
        self._answer: list[Any] | None = None

    def respond(
        self,
        status: int,
        parts: list[Any],
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer once; later calls are ignored so every request gets exactly one response."""
        if self._answer is not None:
            return
        size = sum(len(p) for p in parts)  # parts are bytes or byte-cast memoryviews
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        close = "" if self.keep_alive else "Connection: close\r\n"
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {size}\r\n{extra}{close}\r\n"
        )
        answer = [head.encode("latin-1"), *parts]
        # One buffer for small answers: uvloop's writelines costs a syscall per part,
        # while copying a large tensor would cost more than the extra syscall.
        self._answer = [b"".join(answer)] if size < 65536 else answer
        self._conn.flush()

    def respond_json(
        self, status: int, payload: Any, headers: dict[str, str] | None = None
    ) -> None:
        self.respond(status, [json.dumps(payload).encode()], headers=headers)

    def error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.respond_json(status, {"error": message}, headers)


Handler = Callable[[Request], None]


class HttpConnection(asyncio.Protocol):
    """One client connection; pipelined requests are answered in the order they came."""

    def __init__(
        self,
        handler: Handler,
        max_body: int,
        connections: set[HttpConnection],
        max_head: int = 64 * 1024,
    ) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self._handler = handler
        self._max_body = max_body
        self._max_head = max_head
        self._connections = connections
        self.last_active = monotonic()  # last byte from the client or answer to it
        self._head_bytes = 0  # request line and complete headers of the request being read
        self._head_chunks = 0  # bytes read while its head stayed open (a header never ending)
        self._head_open = False  # a request has begun and its headers are not complete
        self._in_message = False  # a request has begun and is not complete
        self._transport: asyncio.Transport | None = None
        self._answers: deque[Request] = deque()
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._too_large = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self.last_active = monotonic()
        head_was_open = self._head_open
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._reject(431, f"request line and headers exceed {self._max_head} bytes")
            else:
                self._reject(400, f"malformed HTTP request: {exc}")
        else:
            # httptools buffers a header until it is complete, so a header that never ends
            # is only seen here: a chunk read wholly inside an open head is all head bytes.
            # Counted apart from _head_bytes: adding both would count complete headers twice.
            if head_was_open and self._head_open:
                self._head_chunks += len(data)
                if self._head_chunks > self._max_head:
                    self._reject(431, f"request line and headers exceed {self._max_head} bytes")

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self._max_head:
            raise _HeadTooLarge

    def expire(self, now: float, timeout_s: float) -> bool:
        """Close the connection if its client went quiet while owed nothing; True if closed.

        A request whose head or body stalls is answered 408 first; a request the server
        still owes an answer is never cut (its own queue timeout covers it).
        """
        if self._answers or now - self.last_active < timeout_s or self._transport is None:
            return False
        if self._in_message:
            self._reject(408, f"request not completed within {timeout_s:g} s of silence")
        else:
            self._transport.close()
        return True

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._in_message = self._head_open = True
        self._head_bytes = self._head_chunks = 0
        self._url = b""
        self._headers = {}
        self._body = []
        self._size = 0
        self._too_large = False

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._head_open = False
        length = self._headers.get("content-length", "0")
        if length.isdigit() and int(length) > self._max_body:
            self._too_large = True
        elif self._headers.get("expect", "").lower() == "100-continue" and self._transport:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max_body:
            self._too_large = True
        if not self._too_large:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        method = self.parser.get_method().decode("latin-1")
        request = Request(self, method, self._url, self._headers, body)
        self._answers.append(request)
        if self._too_large:
            # Read to the end before answering: closing on unread data makes the kernel send
            # a reset that can destroy the 413 before the client reads it.
            request.keep_alive = False
            request.error(413, f"request body exceeds the limit of {self._max_body} bytes")
            return
        try:
            self._handler(request)
        except Exception:  # a bug in one route must cost one 500, not the connection
            log.exception("unhandled error answering %s %s", method, request.path)
            request.error(500, "internal server error")

    # responses
    def flush(self) -> None:
        while self._answers and self._answers[0]._answer is not None:
            request = self._answers.popleft()
            if self._transport is None or self._transport.is_closing():
                continue
            self._transport.writelines(request._answer)
            self.last_active = monotonic()
            if not request.keep_alive:
                self._transport.close()

    def _reject(self, status: int, message: str) -> None:
        if self._transport is None:
            return
        body = json.dumps({"error": message}).encode()
        self._transport.write(
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        self._transport.close()


def expire_idle(connections: Iterable[HttpConnection], timeout_s: float) -> int:
    """Close every connection whose client has been silent for ``timeout_s`` while owed nothing."""
    now = monotonic()
    return sum(connection.expire(now, timeout_s) for connection in list(connections))
