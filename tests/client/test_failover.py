"""A dead PoP is left within 3 s: two `egressd pop` processes with device links follow the
control plane of `egressd serve`; the client attaches to one, it is killed (SIGKILL), and
the client moves to the other and the next request succeeds."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import Spawn, cli, client_status, enrollment_token, start_client
from .test_client_e2e import GLOBEX_SOURCE, curl

FAILOVER_WITHIN = 3.0


def reserve_port() -> socket.socket:
    """Hold a port for a child to bind (bound, never listening)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def listening(port: int, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return
    raise AssertionError(f"nothing listens on {port}")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
async def test_a_dead_connected_pop_moves_the_client_within_3_s(
        serve: dict[str, Any], spawn: Spawn, tmp_path: Path, how: signal.Signals) -> None:
    """Killed: its connection resets at once. Frozen (SIGSTOP): it just stops answering,
    which the client notices when a ping goes unanswered for 1.5 s."""
    state_dir = Path(serve["flow_log"]).parent
    holds = {code: (reserve_port(), reserve_port()) for code in ("las", "lax")}
    ports = {code: (plain.getsockname()[1], device.getsockname()[1])
             for code, (plain, device) in holds.items()}
    pops = {}
    for code, (plain, device) in ports.items():
        pops[code] = await spawn(
            "pop", "--control", serve["control"]["url"], "--control-token-file",
            str(state_dir / "pop.token"), "--state-dir", str(tmp_path / f"pop-{code}"),
            "--pop", code, "--listen", f"127.0.0.1:{plain}", "--device-listen",
            f"127.0.0.1:{device}", "--cert", str(state_dir / "pki" / "pop.crt"),
            "--key", str(state_dir / "pki" / "pop.key"), "--flow-log", "off",
            "--host", f"echo.egressd.test={serve['echo']['http'].split('/')[2].split(':')[0]}",
            "--log-level", "warning")
    for _plain, device in ports.values():
        await listening(device)
    for plain_hold, device_hold in holds.values():
        plain_hold.close()
        device_hold.close()

    token = await enrollment_token(serve, "globex", "carol")
    client_state = tmp_path / "client"
    enrolled = await cli("client", "enroll", "--control", serve["control"]["url"], "--token", token,
                         "--state-dir", str(client_state), "--ca", serve["ca_cert"],
                         "--echo4", serve["echo"]["trace"],
                         *[f"--pop={code}=127.0.0.1:{device}" for code, (_, device) in ports.items()],
                         "--pop=jfk=127.0.0.1:9")  # a PoP that never answers
    assert enrolled.code == 0, enrolled.err
    child, status = await start_client(spawn, client_state)
    first = status["connected_pop"]
    assert first in ("las", "lax") and status["rtt_ms"]["jfk"] is None
    proxy = f"http://{status['listen']}"
    deadline = time.monotonic() + 10  # the PoP processes learn of the new device (R14: 2 s)
    while True:
        code, body = await curl("-x", proxy, serve["echo"]["http"])
        if body.strip() in GLOBEX_SOURCE[first] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert code == 0 and body.strip() in GLOBEX_SOURCE[first], body
    # The other PoP knows the device too (straight through its HTTP proxy, as the device).
    other = "lax" if first == "las" else "las"
    device = json.loads(await asyncio.to_thread((client_state / "device.json").read_text))
    login = f"{device['device_id']}:{device['secret']}"
    deadline = time.monotonic() + 10
    while True:
        code, body = await curl("-x", f"http://127.0.0.1:{ports[other][0]}", "-U", login,
                                serve["echo"]["http"])
        if body.strip() in GLOBEX_SOURCE[other] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert body.strip() in GLOBEX_SOURCE[other], body

    pops[first].process.send_signal(how)
    killed_at = time.monotonic()
    while True:
        current = json.loads(await _status_page(status["listen"]))
        if current["connected_pop"] == other:
            break
        assert time.monotonic() - killed_at < FAILOVER_WITHIN + 1, current
        await asyncio.sleep(0.05)
    moved_after = time.monotonic() - killed_at
    assert moved_after <= FAILOVER_WITHIN, f"moved after {moved_after:.2f} s: {child.stderr()}"
    code, body = await curl("-x", proxy, serve["echo"]["http"])
    assert code == 0 and body.strip() in GLOBEX_SOURCE[other], body + child.stderr()
    switch = current["switches"][-1]
    assert switch["from"] == first and switch["to"] == other
    assert switch["reason"].startswith(f"{first} is unreachable")
    await client_status(client_state, child)
    if how == signal.SIGSTOP:
        pops[first].process.send_signal(signal.SIGCONT)


async def _status_page(listen: str) -> str:
    code, body = await curl(f"http://{listen}/status")
    assert code == 0, body
    return body


async def test_device_links_on_a_pop_with_several_workers(
        serve: dict[str, Any], spawn: Spawn, tmp_path: Path) -> None:
    """Every worker of `egressd pop --workers 2` serves the device-link port (SO_REUSEPORT)."""
    state_dir = Path(serve["flow_log"]).parent
    plain_hold, device_hold = reserve_port(), reserve_port()
    plain, device = plain_hold.getsockname()[1], device_hold.getsockname()[1]
    pop = await spawn("pop", "--control", serve["control"]["url"], "--control-token-file",
                      str(state_dir / "pop.token"), "--state-dir", str(tmp_path / "pop"),
                      "--pop", "las", "--listen", f"127.0.0.1:{plain}", "--device-listen",
                      f"127.0.0.1:{device}", "--cert", str(state_dir / "pki" / "pop.crt"),
                      "--key", str(state_dir / "pki" / "pop.key"), "--flow-log", "off",
                      "--workers", "2", "--log-level", "warning")
    await listening(device)
    plain_hold.close()
    device_hold.close()
    token = await enrollment_token(serve, "globex", "carol")
    client_state = tmp_path / "client"
    enrolled = await cli("client", "enroll", "--control", serve["control"]["url"], "--token", token,
                         "--state-dir", str(client_state), "--ca", serve["ca_cert"],
                         f"--pop=las=127.0.0.1:{device}")
    assert enrolled.code == 0, enrolled.err
    _child, status = await start_client(spawn, client_state)
    deadline = time.monotonic() + 5  # the workers learn of the new device (R14)
    while True:
        code, body = await curl("-x", f"http://{status['listen']}", serve["echo"]["http"])
        if body.strip() in GLOBEX_SOURCE["las"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert code == 0 and body.strip() in GLOBEX_SOURCE["las"], body + pop.stderr()
    assert pop.process.returncode is None, pop.stderr()
    assert "cannot listen" not in pop.stderr(), pop.stderr()
