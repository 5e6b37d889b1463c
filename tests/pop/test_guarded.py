"""A bug in a handler costs one connection, never the PoP: `guarded` closes and logs."""

from __future__ import annotations

import socket

import pytest

from egressd.pop.client_io import guarded


async def _buggy() -> bool:
    raise RuntimeError("a bug")


async def _handed_off() -> bool:
    return True


async def test_a_failing_handler_closes_its_connection_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    ours, peer = socket.socketpair()
    try:
        await guarded(_buggy(), ours.close, ("127.0.0.1", 1))
        assert ours.fileno() == -1  # closed
        assert peer.recv(1) == b""  # the client sees the close
        assert "unexpected error serving 127.0.0.1:1" in caplog.text
    finally:
        ours.close()
        peer.close()


async def test_a_handed_off_connection_is_left_open() -> None:
    ours, peer = socket.socketpair()
    try:
        await guarded(_handed_off(), ours.close, ("127.0.0.1", 1))
        assert ours.fileno() != -1
    finally:
        ours.close()
        peer.close()
