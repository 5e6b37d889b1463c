"""Runs inside a test namespace: many concurrent upstream connections from ONE source address.

Started by test_capacity.py as `ip netns exec NS python capacity_driver.py ...`. Servers and
clients are separate processes (a process may hold at most 20,000 descriptors here). Every
client connection is made by `egressd.pop.upstream.connect_tcp`, the PoP's only door to the
network, so this measures R15 as the PoP does it. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import multiprocessing as mp
import resource
import socket
import time
from multiprocessing.synchronize import Event

from egressd.pop.upstream import SocketOptions, UpstreamError, connect_tcp

PORT = 80


def serve(address: str, ready: Event, done: Event, counts: mp.Queue[tuple[str, int]]) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind((address, PORT))
    listener.listen(65535)
    listener.settimeout(0.2)
    ready.set()
    held = []
    while not done.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:  # out of descriptors: the others take the rest
            time.sleep(0.01)
            continue
        held.append(conn)
    counts.put(("server", len(held)))


def connect_many(source: str, destination: str, count: int, deadline: float, hold: Event,
                 counts: mp.Queue[tuple[str, int]]) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)

    async def run() -> int:
        options = SocketOptions()
        src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
        held: list[socket.socket] = []
        gate = asyncio.Semaphore(256)

        async def one() -> None:
            async with gate:
                if time.monotonic() > deadline:
                    return
                with contextlib.suppress(UpstreamError):
                    held.append(await connect_tcp(src, dst, PORT, options, 10.0))

        await asyncio.gather(*(one() for _ in range(count)))
        counts.put((f"client:{destination}", len(held)))
        # Keep every connection open until all are counted (a process Event, not asyncio's).
        await asyncio.to_thread(hold.wait, 120)
        for sock in held:
            sock.close()
        return len(held)

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", required=True)
    parser.add_argument("--destination", action="append", required=True)
    parser.add_argument("--per-destination", type=int, required=True)
    parser.add_argument("--processes-per-destination", type=int, default=4)
    parser.add_argument("--servers-per-destination", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args()
    context = mp.get_context("fork")
    counts: mp.Queue[tuple[str, int]] = context.Queue()
    done, hold = context.Event(), context.Event()
    servers = []
    for destination in args.destination:
        for _ in range(args.servers_per_destination):
            ready = context.Event()
            process = context.Process(target=serve, args=(destination, ready, done, counts))
            process.start()
            ready.wait(10)
            servers.append(process)
    deadline = time.monotonic() + args.seconds
    share = args.per_destination // args.processes_per_destination
    clients = [
        context.Process(target=connect_many, args=(args.source, destination, share, deadline, hold, counts))
        for destination in args.destination for _ in range(args.processes_per_destination)
    ]
    started = time.monotonic()
    for process in clients:
        process.start()
    per_destination: dict[str, int] = {}
    for _ in clients:
        kind, number = counts.get(timeout=args.seconds + 30)
        per_destination[kind] = per_destination.get(kind, 0) + number
    elapsed = time.monotonic() - started
    hold.set()
    for process in clients:
        process.join(30)
    done.set()
    accepted = 0
    for _ in servers:
        accepted += counts.get(timeout=30)[1]
    for process in servers:
        process.join(10)
    print(json.dumps({"concurrent": per_destination, "accepted": accepted,
                      "seconds": round(elapsed, 1)}), flush=True)


if __name__ == "__main__":
    main()
