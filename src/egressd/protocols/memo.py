"""Memos for the codecs (HTTP/1.1, and SOCKS5's messages): a device repeats itself.

Parsing and rewriting a head are pure functions of its bytes, and heads repeat: a device
sends the same CONNECT to the same host again and again, and the same request on a
keep-alive connection; an origin's response heads differ in little but Date. So heads up
to `MEMO_HEAD_BYTES` are parsed once and their results (frozen: safe to share) reused; a
head that fails is parsed again each time (exceptions are not remembered). The memos are
bounded, in entries and in bytes per entry: a client sending distinct heads only churns
them.
"""

from __future__ import annotations

from typing import Final, Generic, TypeVar

MEMO_HEAD_BYTES: Final = 2048
MEMO_ENTRIES: Final = 512

HeadT = TypeVar("HeadT")


class RewriteMemo:
    """Rewritten heads by the identity of the parsed head they came from (a memoized parse
    returns the same object for the same bytes). Each entry keeps its head alive, so an
    identity cannot be reused while it is a key."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[int, tuple[object, str, bool, bytes]] = {}

    def get(self, head: object, via: str, flag: bool) -> bytes | None:
        entry = self._entries.get(id(head))
        if entry is not None and entry[0] is head and entry[1] == via and entry[2] is flag:
            return entry[3]
        return None

    def put(self, head: object, via: str, flag: bool, out: bytes) -> bytes:
        if len(out) > MEMO_HEAD_BYTES:  # a large head is not kept alive for a memo
            return out
        if len(self._entries) >= MEMO_ENTRIES:
            self._entries.clear()
        self._entries[id(head)] = (head, via, flag, out)
        return out


class WholeHeads(Generic[HeadT]):
    """Heads (or any parse result) by the exact bytes that were all a fresh reader was
    given to produce them, and the reader's `setting` (its limits, the request method for
    a response, a SOCKS5 server's state). The reader's verdict on the same bytes under the
    same setting cannot differ, so a message that repeats, as devices' and origins' do,
    needs no reader. Only results read without error are put here."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[bytes, tuple[object, HeadT]] = {}

    def get(self, data: bytes, setting: object) -> HeadT | None:
        entry = self._entries.get(data)
        if entry is not None and (entry[0] is setting or entry[0] == setting):
            return entry[1]
        return None

    def put(self, data: bytes, setting: object, head: HeadT) -> None:
        if len(data) > MEMO_HEAD_BYTES:
            return
        if len(self._entries) >= MEMO_ENTRIES:
            self._entries.clear()
        self._entries[data] = (setting, head)

    def __len__(self) -> int:
        return len(self._entries)
