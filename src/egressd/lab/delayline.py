"""A userspace delay line: the lab's stand-in for `tc netem`, which this kernel lacks.

Each link is a pair of TAP devices; every Ethernet frame read from one is written to the
other `delay` later, in order, both ways. One process serves all the delayed links of a
lab. It creates the TAPs under temporary names in its own namespace and prints `ready`;
`egressd lab up` then moves each TAP into its namespace under its final name (a TAP stays
attached to its file descriptor across namespaces). The TAPs vanish when the process ends,
so a killed lab leaves no interface behind.

Run: ``python -m egressd.lab.delayline TAP_A,TAP_B,DELAY_MS [...]``
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import os
import signal
import struct
import sys
from dataclasses import dataclass, field

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
FRAME_MAX = 65536
QUEUE_FRAMES = 4096  # like a router's buffer: past it, frames are dropped (tail drop)
READ_BATCH = 64


def open_tap(name: str) -> int:
    if len(name.encode()) > 15:
        raise ValueError(f"interface name {name!r} is longer than 15 bytes")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


@dataclass
class Direction:
    """Frames from `source` waiting to be written to `target` at their due time."""

    source: int
    target: int
    delay: float
    queue: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    timer: asyncio.TimerHandle | None = None
    dropped: int = 0

    def readable(self, loop: asyncio.AbstractEventLoop) -> None:
        due = loop.time() + self.delay
        for _ in range(READ_BATCH):
            try:
                frame = os.read(self.source, FRAME_MAX)
            except BlockingIOError:
                break
            if len(self.queue) >= QUEUE_FRAMES:
                self.dropped += 1
                continue
            self.queue.append((due, frame))
        if self.queue and self.timer is None:
            self.timer = loop.call_at(self.queue[0][0], self.flush, loop)

    def flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        now = loop.time()
        queue = self.queue
        while queue and queue[0][0] <= now:
            _, frame = queue.popleft()
            try:
                os.write(self.target, frame)
            except (BlockingIOError, OSError):
                self.dropped += 1  # the far end is down or full: a lossy link, not an error
        if queue:
            self.timer = loop.call_at(queue[0][0], self.flush, loop)


def parse_link(text: str) -> tuple[str, str, float]:
    try:
        a, b, delay = text.split(",")
        return a, b, float(delay) / 1000.0
    except ValueError:
        raise SystemExit(f"delayline: bad link {text!r}: expected TAP_A,TAP_B,DELAY_MS") from None


async def serve(links: list[tuple[str, str, float]]) -> None:
    loop = asyncio.get_running_loop()
    fds: list[int] = []
    try:
        for a, b, delay in links:
            fd_a, fd_b = open_tap(a), open_tap(b)
            fds += [fd_a, fd_b]
            for direction in (Direction(fd_a, fd_b, delay), Direction(fd_b, fd_a, delay)):
                loop.add_reader(direction.source, direction.readable, loop)
        print("ready", flush=True)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    asyncio.run(serve([parse_link(arg) for arg in argv]))


if __name__ == "__main__":
    main(sys.argv[1:])
