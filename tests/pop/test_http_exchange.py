"""`whole_response`: a read that is a response head seen before and exactly its body."""

from __future__ import annotations

from egressd.pop.http_exchange import whole_response
from egressd.protocols.http1 import ResponseHead, ResponseHeadReader
from egressd.protocols.memo import WholeHeads

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
EMPTY = b"HTTP/1.1 204 No Content\r\n\r\n"


def _known(*heads: tuple[bytes, str]) -> WholeHeads[ResponseHead]:
    memo: WholeHeads[ResponseHead] = WholeHeads()
    for raw, method in heads:
        reader = ResponseHeadReader(method)
        reader.feed(raw)
        head = reader.next_head()
        assert head is not None
        memo.put(raw, method, head)
    return memo


def test_a_known_head_and_exactly_its_body_is_whole() -> None:
    memo = _known((OK, "GET"), (EMPTY, "GET"))
    found = whole_response(memo, OK + b"hello", "GET")
    assert found is not None and found[0].status == 200 and found[1] == len(OK)
    found = whole_response(memo, EMPTY, "GET")
    assert found is not None and found[0].status == 204 and found[1] == len(EMPTY)


def test_anything_else_takes_the_reader() -> None:
    memo = _known((OK, "GET"), (EMPTY, "GET"))
    assert whole_response(memo, OK + b"hell", "GET") is None  # body cut short
    assert whole_response(memo, OK + b"hello!", "GET") is None  # bytes past the response
    assert whole_response(memo, EMPTY + b"x", "GET") is None  # bytes after a bodiless one
    assert whole_response(memo, OK + b"hello", "HEAD") is None  # seen for another method
    assert whole_response(memo, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: y\r\n\r\nhello", "GET") is None
    assert whole_response(memo, OK[:-2], "GET") is None  # no end of head
