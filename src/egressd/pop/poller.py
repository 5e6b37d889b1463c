"""An epoll set of the PoP's own for the descriptors of plain handshakes and splice relays.

Why not the event loop's `add_reader`: uvloop gives every descriptor a libuv poll handle,
created with its first interest and dropped with its last. Creating one checks the
descriptor (`epoll_ctl` ADD and DEL) and sets it non-blocking (`ioctl`); dropping one
removes it three times; each change goes through an `io_uring` submission. A tunnel
registers two descriptors and changes one, so ~19 system calls and two Cython handle
objects of every tunnel went to bookkeeping. Here a descriptor costs one `epoll_ctl` to
add, one to change and one to remove; the loop watches this set's own descriptor, and one
`epoll_wait` per wake-up collects the ready descriptors of every tunnel at once.

Theory of operation. Readiness is level-triggered, as with the loop: a callback that
leaves bytes unread is called again on the next turn. The interface is the loop's
(`add_reader(fd, callback, *args)`, `remove_reader(fd)`, the same for writers), so a relay
can run on either. A descriptor removed while a batch of events is being dispatched gets
no further callback from that batch: its number may already belong to a new socket.
Callback errors are reported to the loop's exception handler, like the loop's own.

What it does not know: sockets (it sees descriptor numbers), timers, and who owns what.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable
from typing import Any, Final

_READ: Final = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITE: Final = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
#: Events taken per wake-up; the rest are level-triggered and come on the next turn.
_MAX_EVENTS: Final = 1024

Callback = tuple[Callable[..., object], tuple[Any, ...]]


class _Interest:
    __slots__ = ("mask", "reader", "writer")

    def __init__(self) -> None:
        self.reader: Callback | None = None
        self.writer: Callback | None = None
        self.mask = 0  # what epoll has: EPOLLIN if a reader, EPOLLOUT if a writer


class Poller:
    """Readiness callbacks for many descriptors through one loop registration."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._epoll = select.epoll()
        self._interests: dict[int, _Interest] = {}
        self._removed: set[int] = set()  # during a dispatch: skip their remaining events
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def __len__(self) -> int:
        return len(self._interests)

    def add_reader(self, fd: int, callback: Callable[..., object], *args: Any) -> None:
        self._set(fd, select.EPOLLIN, (callback, args))

    def add_writer(self, fd: int, callback: Callable[..., object], *args: Any) -> None:
        self._set(fd, select.EPOLLOUT, (callback, args))

    def remove_reader(self, fd: int) -> bool:
        return self._set(fd, select.EPOLLIN, None)

    def remove_writer(self, fd: int) -> bool:
        return self._set(fd, select.EPOLLOUT, None)

    def swap_to_reader(self, fd: int, callback: Callable[..., object], *args: Any) -> None:
        """Make `callback` the reader of `fd` and drop its writer, in one `epoll_ctl` (a
        connect's writer handed over to a relay's reader)."""
        interest = self._interests.get(fd)
        if interest is None or interest.writer is None:  # no writer to replace
            self._set(fd, select.EPOLLIN, (callback, args))
            return
        interest.writer = None
        interest.reader = (callback, args)
        if interest.mask != select.EPOLLIN:
            interest.mask = select.EPOLLIN
            self._epoll.modify(fd, select.EPOLLIN)

    def forget(self, fd: int) -> None:
        """Drop every interest in `fd` without telling epoll: only for a descriptor that is
        closed right after and that no other descriptor shares (closing it takes it out of
        the epoll set; a duplicate would keep it in). One `epoll_ctl` less per socket."""
        if self._interests.pop(fd, None) is not None:
            self._removed.add(fd)

    def close(self) -> None:
        self.loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._interests.clear()

    def _set(self, fd: int, bit: int, callback: Callback | None) -> bool:
        """Set (or with None, clear) the reader (`bit` EPOLLIN) or writer (EPOLLOUT) of
        `fd`, and tell epoll if that changes the mask; False if there was nothing to
        clear. One function with no helpers: it runs several times per tunnel."""
        interest = self._interests.get(fd)
        if interest is None:
            if callback is None:
                return False
            interest = _Interest()
        before = interest.mask
        if callback is None:
            if not before & bit:
                return False
            mask = before & ~bit
        else:
            mask = before | bit
        if bit == select.EPOLLIN:
            interest.reader = callback
        else:
            interest.writer = callback
        if mask == before:
            return True
        interest.mask = mask
        epoll = self._epoll
        if not mask:
            del self._interests[fd]
            self._removed.add(fd)
            try:  # noqa: SIM105 (suppress() is three calls: hot path)
                epoll.unregister(fd)
            except OSError:  # already closed: epoll forgot it itself
                pass
            return True
        if before:
            try:
                epoll.modify(fd, mask)
                return True
            except FileNotFoundError:  # closed without removal, number reused: register
                pass
        try:
            epoll.register(fd, mask)
        except FileExistsError:  # registered through a duplicate that is still open
            epoll.modify(fd, mask)
        # Not taken out of `_removed`: events of the batch being dispatched were for the
        # file that had this number before (a spurious EPOLLOUT would look like a connect).
        self._interests[fd] = interest
        return True

    def _dispatch(self) -> None:
        self._removed.clear()
        interests, removed = self._interests, self._removed
        for fd, events in self._epoll.poll(0, _MAX_EVENTS):
            if fd in removed:
                continue
            interest = interests.get(fd)
            if interest is None:
                continue
            # The callbacks are called inline (no helper per event): a tunnel has several.
            callback = interest.reader
            if events & _READ and callback is not None:
                try:
                    callback[0](*callback[1])
                except Exception as exc:
                    self._report(callback, exc)
                if fd in removed:
                    continue
            callback = interest.writer
            if events & _WRITE and callback is not None:
                try:
                    callback[0](*callback[1])
                except Exception as exc:
                    self._report(callback, exc)

    def _report(self, callback: Callback, exc: Exception) -> None:
        """A callback failed: to the loop's exception handler, as the loop does for its own."""
        self.loop.call_exception_handler(
            {"message": f"exception in readiness callback {callback[0]!r}", "exception": exc})
