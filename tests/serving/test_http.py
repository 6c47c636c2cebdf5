"""HTTP framing in process: what HttpConnection hands its handler for any chunking.

Repeated heads are taken without the parser (serving.http._Head); these tests check that
a repeat yields exactly the request the parser would have made, however the bytes arrive.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from serving.http import HttpConnection, Request


@dataclass(frozen=True)
class Sent:
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    keep_alive: bool

    def wire(self) -> bytes:
        target = self.path + (f"?{self.query}" if self.query else "")
        lines = "".join(f"{name}: {value}\r\n" for name, value in self.headers)
        return f"{self.method} {target} HTTP/1.1\r\n{lines}\r\n".encode() + self.body


class Recorder(HttpConnection):
    """A connection that keeps what its handler got and counts the heads it parsed."""

    def __init__(self) -> None:
        self.got: list[Sent] = []
        self.parsed = 0
        super().__init__(self._record, max_body=1 << 20, connections=set())

    def _record(self, r: Request) -> None:
        headers = tuple(sorted(r.headers.items()))
        self.got.append(Sent(r.method, r.path, r.query, headers, r.body, r.keep_alive))

    def on_message_begin(self) -> None:
        self.parsed += 1
        super().on_message_begin()


def infer(body: bytes, *extra: tuple[str, str]) -> Sent:
    headers = (("host", "x"), ("content-length", str(len(body))), *extra)
    return Sent("POST", "/v2/models/tiny/infer", "", headers, body, True)


def expected(sent: Sent) -> Sent:
    """What the handler should see: header names lower-cased, sorted like Recorder's."""
    headers = tuple(sorted((name.lower(), value) for name, value in sent.headers))
    return Sent(sent.method, sent.path, sent.query, headers, sent.body, sent.keep_alive)


def test_a_repeated_head_is_taken_unparsed_with_its_own_body() -> None:
    connection = Recorder()
    requests = [infer(bytes([i]) * 16) for i in range(4)]
    for request in requests:
        connection.data_received(request.wire())
    assert connection.got == [expected(r) for r in requests]
    assert connection.parsed == 1


def test_heads_whose_parse_does_something_are_parsed_every_time() -> None:
    connection = Recorder()
    continued = infer(b"x" * 8, ("expect", "100-continue"))  # parsing sends 100 Continue
    for _ in range(3):
        connection.data_received(continued.wire())
    assert connection.got == [expected(continued)] * 3
    assert connection.parsed == 3


def test_a_closing_head_is_not_remembered() -> None:
    connection = Recorder()
    closing = Sent("GET", "/v2/health/live", "", (("connection", "close"),), b"", False)
    connection.data_received(closing.wire())
    connection.data_received(closing.wire())  # nothing may follow a close: refused, not taken
    assert connection.got == [expected(closing)]
    assert connection.parsed == 1


def test_a_repeat_split_or_pipelined_goes_through_the_parser() -> None:
    connection = Recorder()
    first, second, third = (infer(bytes([i]) * 32) for i in range(3))
    connection.data_received(first.wire())  # remembered
    wire = second.wire()
    connection.data_received(wire[:-5])  # the same head, its body cut short
    connection.data_received(wire[-5:])
    connection.data_received(third.wire() + first.wire())  # two in one chunk
    assert connection.got == [expected(r) for r in (first, second, third, first)]
    assert connection.parsed == 4


_REQUESTS = st.sampled_from(
    [
        infer(b"a" * 12),
        infer(b"b" * 12),  # same head as the one above, another body
        infer(b"c" * 7),
        infer(b"d" * 12, ("inference-header-content-length", "4")),
        Sent("GET", "/v2/models/tiny", "", (("host", "x"),), b"", True),
        Sent("GET", "/v2/health/ready", "", (("Host", "x"), ("connection", "close")), b"", False),
        Sent("POST", "/v1/classify", "top_k=2", (("Content-Length", "3"),), b"png", True),
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    requests=st.lists(_REQUESTS, min_size=1, max_size=12),
    cuts=st.lists(st.integers(0, 400), max_size=6),
    aligned=st.booleans(),
)
def test_any_chunking_of_any_repeats_gives_what_the_parser_gives(
    requests: list[Sent], cuts: list[int], aligned: bool
) -> None:
    """Chunks along request boundaries (where repeats are taken unparsed) or anywhere."""
    wires = [r.wire() for r in requests]
    stream = b"".join(wires)
    if aligned:
        chunks = wires
    else:
        points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
        chunks = [stream[a:b] for a, b in zip(points, points[1:], strict=False)]
    connection = Recorder()
    for chunk in chunks:
        connection.data_received(chunk)
    closes = [i for i, r in enumerate(requests) if not r.keep_alive]
    answered = requests[: closes[0] + 1] if closes else requests  # nothing follows a close
    assert connection.got == [expected(r) for r in answered]
