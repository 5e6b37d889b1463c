"""The floor: the least work a Python proxy can do per tunnel and per forwarded request.

Not egressd and not a product: a reference that `benchmarks/proxy.py --floor` measures in
the same run as egressd and the peers, to separate what Python itself costs from what
egressd's own code costs. Per CONNECT tunnel it does one epoll dispatch per event, one
`recv` of the head, a split of the request line, a socket bound to the source address
with IP_BIND_ADDRESS_NO_PORT, a non-blocking connect, the 200, a `splice` relay and two
closes. Per forwarded request it takes the authority from the request line, keeps one
upstream connection per client connection and copies a Content-Length response back.
No authentication, no header validation, no decision, no log, no timeouts.

    python benchmarks/floor_proxy.py --listen 127.0.0.1:18201 --source 127.0.0.2 --workers 2
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
from collections.abc import Callable

IP_BIND_ADDRESS_NO_PORT = 24
OK = b"HTTP/1.1 200 Connection Established\r\n\r\n"
Handler = Callable[[int], None]


def receive(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionError:
        return b""


class Floor:
    def __init__(self, listener: socket.socket, source: str) -> None:
        self.listener = listener
        self.source = source
        self.epoll = select.epoll()
        self.handlers: dict[int, Handler] = {}
        self.pipe_r, self.pipe_w = os.pipe()

    def watch(self, sock: socket.socket, handler: Handler, events: int = select.EPOLLIN) -> None:
        self.handlers[sock.fileno()] = handler
        self.epoll.register(sock.fileno(), events)

    def forget(self, sock: socket.socket) -> None:
        self.epoll.unregister(sock.fileno())
        del self.handlers[sock.fileno()]

    def upstream(self, authority: bytes) -> socket.socket:
        host, _, port = authority.rpartition(b":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((self.source, 0))
        sock.connect_ex((host.decode(), int(port)))
        return sock

    def move(self, src: socket.socket, dst: socket.socket) -> int:
        """Splice what `src` has to `dst`; waits for `dst` when it is full (a floor for
        rates, not a fair bulk relay)."""
        moved = os.splice(src.fileno(), self.pipe_w, 1 << 20, flags=os.SPLICE_F_NONBLOCK)
        left = moved
        while left:
            try:
                left -= os.splice(self.pipe_r, dst.fileno(), left, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                select.select([], [dst], [])
        return moved

    def client(self, sock: socket.socket) -> Handler:
        def on_first(fd: int) -> None:
            head = receive(sock)
            if head.startswith(b"CONNECT "):
                self.forget(sock)
                self.tunnel(sock, head.split(b" ", 2)[1])
            elif head:
                self.handlers[fd] = self.forwarder(sock, head)
            else:
                self.forget(sock)
                sock.close()
        return on_first

    def tunnel(self, client: socket.socket, authority: bytes) -> None:
        upstream = self.upstream(authority)
        ended = [0]

        def on_readable(fd: int) -> None:
            src, dst = (client, upstream) if fd == client.fileno() else (upstream, client)
            if self.move(src, dst):
                return
            self.forget(src)
            ended[0] += 1
            if ended[0] == 2:
                client.close()
                upstream.close()
            else:
                dst.shutdown(socket.SHUT_WR)

        def on_connected(fd: int) -> None:
            client.send(OK)
            self.handlers[fd] = on_readable
            self.epoll.modify(fd, select.EPOLLIN)
            self.watch(client, on_readable)

        self.watch(upstream, on_connected, select.EPOLLOUT)

    def forwarder(self, client: socket.socket, first: bytes) -> Handler:
        state: dict[str, object] = {"up": None, "authority": b"", "buf": b"", "close": False}

        def on_request(head: bytes) -> None:
            line, _, rest = head.partition(b"\r\n")
            method, target, version = line.split(b" ")
            slash = target.index(b"/", 7)
            authority = target[7:slash]
            up = state["up"]
            if up is None or authority != state["authority"]:
                if isinstance(up, socket.socket):
                    self.forget(up)
                    up.close()
                up = self.upstream(authority)
                up.setblocking(True)  # the connect is in progress; the send waits for it
                state["up"], state["authority"] = up, authority
                self.watch(up, on_response)
            assert isinstance(up, socket.socket)
            state["close"] = b"Connection: close" in rest
            up.sendall(b"%s %s %s\r\n%s" % (method, target[slash:], version, rest))

        def on_response(fd: int) -> None:
            up = state["up"]
            assert isinstance(up, socket.socket) and isinstance(state["buf"], bytes)
            data = state["buf"] + up.recv(65536)
            end = data.find(b"\r\n\r\n")
            start = data.find(b"Content-Length:", 0, end)
            size = int(data[start + 15:data.index(b"\r\n", start)]) if start >= 0 else 0
            if end < 0 or len(data) < end + 4 + size:
                state["buf"] = data
                return
            state["buf"] = b""
            client.sendall(data)
            if state["close"]:
                self.forget(up)
                up.close()
                self.forget(client)
                client.close()

        def on_client(fd: int) -> None:
            head = receive(client)
            if head:
                on_request(head)
                return
            self.forget(client)
            client.close()
            up = state["up"]
            if isinstance(up, socket.socket):
                self.forget(up)
                up.close()

        on_request(first)
        return on_client

    def run(self) -> None:
        listener = self.listener
        self.epoll.register(listener.fileno(), select.EPOLLIN)
        handlers = self.handlers
        while True:
            for fd, _ in self.epoll.poll():
                if fd != listener.fileno():
                    handler = handlers.get(fd)
                    if handler is not None:
                        handler(fd)
                    continue
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    self.watch(sock, self.client(sock))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:18201", help="HOST:PORT")
    parser.add_argument("--source", default="127.0.0.2", help="source address upstream")
    parser.add_argument("--workers", type=int, default=2, help="processes (SO_REUSEPORT)")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            listener.bind((host, int(port)))
            listener.listen(4096)
            listener.setblocking(False)
            Floor(listener, args.source).run()
        children.append(pid)
    signal.signal(signal.SIGTERM, lambda *_: [os.kill(pid, signal.SIGTERM) for pid in children])
    for pid in children:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
