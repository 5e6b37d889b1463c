"""R15: one egress address holds 60,000+ concurrent connections to one destination, and far
more across destinations, because upstream sockets are bound with IP_BIND_ADDRESS_NO_PORT
(the port is chosen per 4-tuple at connect time, never reserved at bind time).

Runs in a namespace of its own, where the ephemeral port range is widened to 1024-65535.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from egressd.model.addresses import parse_address
from egressd.pop.upstream import IP_BIND_ADDRESS_NO_PORT, SocketOptions, make_tcp_socket

DRIVER = Path(__file__).with_name("capacity_driver.py")


def test_upstream_sockets_are_bound_without_a_port() -> None:
    sock = make_tcp_socket(parse_address("127.0.0.1"), SocketOptions())
    try:
        assert sock.getsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT) == 1
        assert sock.getsockname() == ("127.0.0.1", 0)  # no port reserved at bind time
    finally:
        sock.close()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def namespace() -> object:
    name = f"egd-cap-{uuid.uuid4().hex[:8]}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        for address in ("203.0.113.10/32", "198.51.100.1/32", "198.51.100.2/32"):
            _ip("-n", name, "address", "add", address, "dev", "lo")
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-q", "-w",
                        "net.ipv4.ip_local_port_range=1024 65535"], check=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=30)


@pytest.mark.root
@pytest.mark.slow
def test_r15_one_source_address_holds_60000_connections_to_one_destination_and_more_across(
    namespace: str,
) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, str(DRIVER),
         "--source", "203.0.113.10", "--destination", "198.51.100.1", "--destination", "198.51.100.2",
         "--per-destination", "60000", "--processes-per-destination", "4",
         "--servers-per-destination", "4", "--seconds", "240"],
        capture_output=True, text=True, timeout=420, env=env, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    concurrent = report["concurrent"]
    assert concurrent["client:198.51.100.1"] >= 60_000, report
    assert concurrent["client:198.51.100.2"] >= 60_000, report
    # 120,000 concurrent connections from one address: impossible if bind() reserved ports.
    assert sum(concurrent.values()) >= 120_000, report
