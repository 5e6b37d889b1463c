"""`whole_response`: a read that is a response head seen before and exactly its body;
`KnownResponses`: what one connection sends back for it, and for the same bytes again."""

from __future__ import annotations

from egressd.pop.http_exchange import REPEAT_RESPONSE_BYTES, KnownResponses, whole_response
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


class _CountedHeads(WholeHeads[ResponseHead]):
    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0

    def get(self, data: bytes, setting: object) -> ResponseHead | None:
        self.lookups += 1
        return super().get(data, setting)


def _counted(raw: bytes, method: str = "GET") -> _CountedHeads:
    memo, head = _CountedHeads(), _known((raw, method)).get(raw, method)
    assert head is not None
    memo.put(raw, method, head)
    return memo


def test_the_same_bytes_again_get_the_same_answer_without_a_lookup() -> None:
    memo = _counted(OK)
    responses = KnownResponses(memo)
    first = responses.whole(OK + b"hello", "GET", "egressd", False)
    assert first is not None
    head, close, out, length = first
    assert head.status == 200 and close is False and length == 5
    assert out == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nVia: 1.1 egressd\r\n\r\nhello"
    again = responses.whole(OK + b"hello", "GET", "egressd", False)
    assert again is not None and again[2] is out and again[0] is head
    assert memo.lookups == 1  # the repeat needed no search and no lookup


def test_a_repeat_under_other_terms_is_answered_anew() -> None:
    memo = _counted(OK)
    responses = KnownResponses(memo)
    assert responses.whole(OK + b"hello", "GET", "egressd", False) is not None
    closing = responses.whole(OK + b"hello", "GET", "egressd", True)  # the client closes after
    assert closing is not None and closing[1] is True and b"Connection: close\r\n" in closing[2]
    renamed = responses.whole(OK + b"hello", "GET", "edge", True)  # `via` changed
    assert renamed is not None and b"Via: 1.1 edge\r\n" in renamed[2]
    assert responses.whole(OK + b"hello", "HEAD", "edge", True) is None  # never seen for HEAD
    other = responses.whole(OK + b"world", "GET", "edge", True)  # another body, same head
    assert other is not None and other[2].endswith(b"world")
    assert memo.lookups == 5


def test_a_large_response_is_not_kept_for_a_repeat() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % REPEAT_RESPONSE_BYTES
    data = head + b"x" * REPEAT_RESPONSE_BYTES
    memo = _counted(head)
    responses = KnownResponses(memo)
    for _ in range(2):
        answer = responses.whole(data, "GET", "egressd", False)
        assert answer is not None and answer[3] == REPEAT_RESPONSE_BYTES
    assert memo.lookups == 2
