"""Operating a PoP: health, metrics and PAC endpoints; `egressd serve` and `egressd pop` as
real processes (workers, SIGHUP reload, SIGTERM drain)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from egressd.echo.server import EchoServer

from .helpers import (
    IO_TIMEOUT,
    by_client_port,
    close_writer,
    credentials,
    curl,
    http_connect,
    http_get,
    open_tcp,
    pop_plain,
    pop_tls,
    read_all,
    read_flows,
    read_response,
    settle,
    tcp_server,
    wait_flow,
)
from .processes import (
    DEVICE,
    NEW_SECRET,
    SECRET,
    EgressdProcess,
    Start,
    clean_env,
    deployment,
    output_file,
    start_pop,
    wait_healthy,
    write_atomically,
)


async def local_get(address: tuple[str, int], path: str, *, tls_ca: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET an endpoint of the PoP itself (origin-form) with curl."""
    scheme = "https" if tls_ca else "http"
    args = ["--cacert", tls_ca] if tls_ca else []
    result = await curl(*args, f"{scheme}://localhost:{address[1]}{path}" if tls_ca
                        else f"http://{address[0]}:{address[1]}{path}")
    assert result.status is not None, result
    return result.status, result.headers, result.body


# --- endpoints of an in-process PoP ---------------------------------------------------


async def test_health_answers_json(serve: dict[str, Any]) -> None:
    status, headers, body = await local_get(pop_plain(serve), "/health")
    assert status == 200 and headers["content-type"] == "application/json"
    health = json.loads(body)
    assert health["pop"] == "las" and health["status"] == "ok"
    assert health["snapshot_version"] >= 1 and health["active_tunnels"] == 0


async def test_metrics_count_flows_by_rule(serve: dict[str, Any]) -> None:
    result = await curl("-K", serve["accounts"]["acme"]["curlrc"], "-x", serve["pops"]["las"]["http_proxy"],
                        serve["echo"]["http"])
    assert result.body == b"127.0.2.100\n"
    await wait_flow(serve["flow_log"], lambda flow: flow["account"] == "acme")
    status, headers, body = await local_get(pop_plain(serve), "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    lines = [line for line in body.decode().splitlines() if line.startswith("egressd_flows_total{")]
    assert any('pop="las"' in line and 'rule="R6"' in line and 'egress="dedicated"' in line
               and 'outcome="ok"' in line and line.endswith(" 1.0") for line in lines), lines
    # The connect histogram, added up per loop turn (pop/flow_metrics.py), counts it too.
    counts = [line for line in body.decode().splitlines()
              if line.startswith("egressd_upstream_connect_seconds_count{") and 'pop="las"' in line]
    assert counts and sum(float(line.rsplit(" ", 1)[1]) for line in counts) >= 1, counts


async def test_metrics_count_auth_failures_and_protocol_errors(serve: dict[str, Any]) -> None:
    await http_get(pop_plain(serve), serve["echo"]["http"], None)
    reader, writer = await open_tcp(pop_plain(serve))
    writer.write(b"GET http://127.0.9.1/ HTTP/1.1\nHost: a\n\n")
    await read_all(reader)
    await close_writer(writer)
    _status, _headers, body = await local_get(pop_plain(serve), "/metrics")
    text = body.decode()
    assert 'egressd_auth_failures_total{listener="http",pop="las"} 1.0' in text
    assert 'egressd_protocol_errors_total{listener="http",pop="las"} 1.0' in text


async def test_pac_file_names_the_listener(serve: dict[str, Any]) -> None:
    host, port = pop_plain(serve)
    status, headers, body = await local_get((host, port), "/pac/acme.pac")
    assert status == 200
    assert headers["content-type"] == "application/x-ns-proxy-autoconfig"
    # Exactly this proxy, with no "; DIRECT" fallback: dedicated egress fails closed.
    assert f'return "PROXY {host}:{port}";' in body.decode()
    assert "FindProxyForURL" in body.decode()


async def test_pac_file_on_the_tls_listener_names_an_https_proxy(serve: dict[str, Any]) -> None:
    host, port = pop_tls(serve)
    status, _headers, body = await local_get((host, port), "/pac/globex.pac", tls_ca=serve["ca_cert"])
    assert status == 200
    assert f'"HTTPS {host}:{port}"' in body.decode()


async def test_pac_file_of_unknown_account_is_404(serve: dict[str, Any]) -> None:
    status, _headers, _body = await local_get(pop_plain(serve), "/pac/initech.pac")
    assert status == 404


async def test_unknown_local_path_is_404_and_not_proxied(serve: dict[str, Any]) -> None:
    status, _headers, body = await local_get(pop_plain(serve), "/")
    assert status == 404 and b"egressd PoP" in body
    assert read_flows(serve["flow_log"]) == []


async def test_local_endpoints_on_one_keep_alive_connection(serve: dict[str, Any]) -> None:
    reader, writer = await open_tcp(pop_plain(serve))
    try:
        for path in ("/health", "/metrics", "/pac/acme.pac", "/nope"):
            writer.write(f"GET {path} HTTP/1.1\r\nHost: pop\r\n\r\n".encode())
            response = await read_response(reader)
            assert response.status == (404 if path == "/nope" else 200)
    finally:
        await close_writer(writer)


# --- `egressd serve` as a process ------------------------------------------------------


async def read_first_line(child: EgressdProcess, within: float = 20.0) -> dict[str, Any]:
    assert child.process.stdout is not None
    async with asyncio.timeout(within):
        line = await child.process.stdout.readline()
    assert line, f"egressd serve printed nothing; stderr: {child.stderr()}"
    return json.loads(line)


async def start_serve(egressd_process: Start, state: Path, *args: str) -> tuple[EgressdProcess, dict[str, Any]]:
    child = await egressd_process(["serve", "--state-dir", str(state), "--port-base", "0", "--json", *args],
                                  stdout_pipe=True)
    info = await read_first_line(child)
    for code in info["pops"]:
        await wait_healthy(pop_plain(info, code))
    await child.wait_ready()
    return child, info


async def test_egressd_serve_process_serves_and_stops_on_sigterm(egressd_process: Start, tmp_path: Path) -> None:
    child, info = await start_serve(egressd_process, tmp_path / "state")
    assert set(info["pops"]) == {"las", "lax", "jfk"}
    health = await wait_healthy(pop_plain(info))  # start_serve waited for every PoP's /health
    config = health.pop("config")
    version = health.pop("snapshot_version")
    assert health.pop("tunnels") == []  # no tunnel connector attached (docs/tunnel.md)
    assert health == {"pop": "las", "status": "ok", "active_tunnels": 0}
    # The store's first change (seeding it from the embedded deployment) is version 2.
    assert config["version"] == version >= 2
    assert config["source"] == "control"
    result = await curl("-K", info["accounts"]["acme"]["curlrc"], "-x", info["pops"]["las"]["http_proxy"],
                        info["echo"]["http"])
    assert result.body == b"127.0.2.100\n"
    assert oct(os.stat(tmp_path / "state" / "serve.json").st_mode & 0o777) == "0o600"
    assert oct(os.stat(info["accounts"]["acme"]["curlrc"]).st_mode & 0o777) == "0o600"
    child.signal(signal.SIGTERM)
    started = time.monotonic()
    assert await child.wait(within=10.0) == 0, child.stderr()
    assert time.monotonic() - started < 3.0  # nothing in flight: no need to wait for --grace
    assert "Traceback" not in child.stderr()


async def test_egressd_serve_json_line_is_serve_json_without_secrets(
    egressd_process: Start, tmp_path: Path,
) -> None:
    child, info = await start_serve(egressd_process, tmp_path / "state")
    written = json.loads((tmp_path / "state" / "serve.json").read_text())
    child.signal(signal.SIGTERM)
    assert await child.wait(within=10.0) == 0
    for account in written["accounts"].values():
        assert len(account["password"]) >= 16
        account["password"] = "***"  # the printed line masks the secrets; the file has them
    assert written == info


SPY = """
import builtins, signal, sys
real_print = builtins.print
def spy(*args, **kwargs):
    handled = signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
    real_print(*args, **kwargs)
    sys.stderr.write(f"E2E-SIGTERM-HANDLED-AT-READY-LINE={handled}\\n")
    sys.stderr.flush()
builtins.print = spy
from egressd.cli import main
sys.argv = ["egressd", *sys.argv[1:]]
main()
"""


async def test_egressd_serve_handles_sigterm_once_it_prints_the_ready_line(tmp_path: Path) -> None:
    """Deterministic form of the race: at the moment the line is printed, is SIGTERM handled?"""
    stderr_path = tmp_path / "stderr"
    stderr = output_file(stderr_path)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SPY, "serve", "--state-dir", str(tmp_path / "state"),
            "--port-base", "0", "--json", stdout=asyncio.subprocess.PIPE, stderr=stderr,
            stdin=asyncio.subprocess.DEVNULL, env=clean_env())
    finally:
        os.close(stderr)
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20.0):
            json.loads(await process.stdout.readline())
        assert await settle(lambda: "HANDLED-AT-READY-LINE=" in stderr_path.read_text(), 5.0)
        info = json.loads((tmp_path / "state" / "serve.json").read_text())
        await wait_healthy(pop_plain(info))
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10.0):
            await process.wait()
    assert "E2E-SIGTERM-HANDLED-AT-READY-LINE=True" in stderr_path.read_text()


async def test_egressd_serve_keeps_its_secrets_across_restarts(egressd_process: Start, tmp_path: Path) -> None:
    """The device secrets are created once and kept: a restart does not lock devices out."""
    child, first = await start_serve(egressd_process, tmp_path / "state")
    child.signal(signal.SIGTERM)
    assert await child.wait(within=10.0) == 0
    child, second = await start_serve(egressd_process, tmp_path / "state")
    try:
        assert credentials(second, "acme") == credentials(first, "acme")
        assert second["pops"]["las"]["http_proxy"] != "" and second["ca_cert"] == first["ca_cert"]
    finally:
        child.signal(signal.SIGTERM)
        assert await child.wait(within=10.0) == 0


# --- `egressd pop` as a process -----------------------------------------------------------

@pytest.fixture
async def echo_on_loopback() -> Any:
    echo = EchoServer()
    await echo.start("127.0.0.1", http_port=0, udp_port=None)
    try:
        yield f"http://127.0.0.1:{echo.http_port}/"
    finally:
        await echo.close()


async def test_pop_workers_serve_flows_from_the_shared_address(
    egressd_process: Start, tmp_path: Path, echo_on_loopback: str,
) -> None:
    pop = await start_pop(egressd_process, tmp_path, workers=2)
    assert len(pop.child.workers()) == 2
    pids: set[str] = set()
    served = 0
    for _ in range(200):  # until both workers have served (SO_REUSEPORT spreads connections)
        response, _port = await http_get(pop.address, echo_on_loopback, (DEVICE, SECRET))
        assert response.status == 200 and response.body == b"127.0.0.2\n"
        served += 1
        await settle(lambda count=served: len(read_flows(pop.flow_log)) >= count)
        pids = {flow["flow_id"].split("-")[1] for flow in read_flows(pop.flow_log)}
        if len(pids) == 2 and served >= 4:
            break
    assert len(pids) == 2
    flows = read_flows(pop.flow_log)
    assert len(flows) == served
    assert all(flow["source"].startswith("127.0.0.2:") and flow["rule"] == "R1" for flow in flows)
    # The metrics of every worker are aggregated, whichever worker answers; the other
    # worker's figures within its flush delay (pop/flow_metrics.py).
    totals: list[float] = []
    for _ in range(40):
        _status, _headers, body = await local_get(pop.address, "/metrics")
        totals = [float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                  if line.startswith("egressd_flows_total{")]
        if sum(totals) == served:
            break
        await asyncio.sleep(0.1)
    assert sum(totals) == served
    pop.child.signal(signal.SIGTERM)
    assert await pop.child.wait(within=10.0) == 0


async def test_pop_reload_on_sighup(
    egressd_process: Start, tmp_path: Path, echo_on_loopback: str,
) -> None:
    pop = await start_pop(egressd_process, tmp_path, workers=2)
    # A broken file: reported, and the last good configuration keeps serving.
    write_atomically(pop.deployment_path, "[[data_centers]\nthis is not TOML\n")
    pop.child.signal(signal.SIGHUP)
    await pop.log_count("failed, keeping snapshot 1", 2)
    response, _ = await http_get(pop.address, echo_on_loopback, (DEVICE, SECRET))
    assert response.status == 200 and response.body == b"127.0.0.2\n"
    # A valid change: the device's new secret works and the old one no longer does.
    write_atomically(pop.deployment_path, deployment(NEW_SECRET))
    pop.child.signal(signal.SIGHUP)
    await pop.log_count("snapshot 2", 2)
    for _ in range(8):  # whichever worker takes the connection
        response, _ = await http_get(pop.address, echo_on_loopback, (DEVICE, SECRET))
        assert response.status == 407
        response, _ = await http_get(pop.address, echo_on_loopback, (DEVICE, NEW_SECRET))
        assert response.status == 200 and response.body == b"127.0.0.2\n"
    health = await wait_healthy(pop.address)
    assert health["snapshot_version"] == 2
    assert (health["config"]["version"], health["config"]["source"]) == (2, "file")
    pop.child.signal(signal.SIGTERM)
    assert await pop.child.wait(within=10.0) == 0


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def refuses_connections(address: tuple[str, int]) -> bool:
    try:
        _reader, writer = await open_tcp(address)
    except (ConnectionRefusedError, ConnectionResetError):
        # Reset: the listener closed with this connection still in its accept queue.
        return True
    await close_writer(writer)
    return False


@pytest.mark.parametrize("workers", [1, 2])
async def test_pop_sigterm_lets_an_open_tunnel_finish(
    egressd_process: Start, tmp_path: Path, workers: int,
) -> None:
    pop = await start_pop(egressd_process, tmp_path, "--grace", "20", workers=workers)
    async with tcp_server("127.0.0.1", echo_handler) as origin:
        response, reader, writer = await http_connect(pop.address, f"{origin[0]}:{origin[1]}",
                                                      (DEVICE, SECRET))
        assert response.status == 200
        try:
            writer.write(b"before")
            async with asyncio.timeout(IO_TIMEOUT):
                assert await reader.readexactly(6) == b"before"
            pop.child.signal(signal.SIGTERM)
            deadline = time.monotonic() + IO_TIMEOUT
            while not await refuses_connections(pop.address):  # draining: no new clients
                assert time.monotonic() < deadline, "the PoP still accepts after SIGTERM"
                await asyncio.sleep(0.05)
            assert pop.child.process.returncode is None  # it waits for the tunnel
            writer.write(b"during the drain")
            async with asyncio.timeout(IO_TIMEOUT):
                assert await reader.readexactly(16) == b"during the drain"
            writer.write_eof()
            assert await read_all(reader) == b""
        finally:
            await close_writer(writer)
        closed = time.monotonic()
        assert await pop.child.wait(within=10.0) == 0, pop.child.stderr()
        assert time.monotonic() - closed < 5.0  # long before --grace 20
    flow = await wait_flow(pop.flow_log, by_client_port(int(writer.get_extra_info("sockname")[1])))
    assert flow["outcome"] == "ok" and flow["closed_by"] == "client"
    assert flow["bytes_up"] == flow["bytes_down"] == 22


async def test_pop_sigterm_ends_tunnels_still_open_after_the_grace(
    egressd_process: Start, tmp_path: Path,
) -> None:
    pop = await start_pop(egressd_process, tmp_path, "--grace", "1")
    async with tcp_server("127.0.0.1", echo_handler) as origin:
        response, reader, writer = await http_connect(pop.address, f"{origin[0]}:{origin[1]}",
                                                      (DEVICE, SECRET))
        assert response.status == 200
        try:
            signalled = time.monotonic()
            pop.child.signal(signal.SIGTERM)
            assert await read_all(reader) == b""  # the PoP ends the tunnel after the grace
            assert await pop.child.wait(within=10.0) == 0, pop.child.stderr()
            assert 0.9 <= time.monotonic() - signalled < 6.0
        finally:
            await close_writer(writer)
    flow = await wait_flow(pop.flow_log, lambda flow: flow["outcome"] == "ok")
    assert flow["closed_by"] == "shutdown"


async def test_pop_exit_status_reports_a_worker_killed_by_a_signal(
    egressd_process: Start, tmp_path: Path,
) -> None:
    pop = await start_pop(egressd_process, tmp_path, workers=2)
    workers = pop.child.workers()
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)  # a worker of the pop this test started
    await settle(lambda: len(pop.child.workers()) == 1, 5.0)
    pop.child.signal(signal.SIGTERM)
    assert await pop.child.wait(within=10.0) != 0


async def test_egressd_serve_sigterm_stops_every_pop_accepting_at_once(
    egressd_process: Start, tmp_path: Path,
) -> None:
    child, info = await start_serve(egressd_process, tmp_path / "state", "--grace", "10")
    echo = info["echo"]["http"].split("://", 1)[1].rstrip("/")
    with_secrets = json.loads((tmp_path / "state" / "serve.json").read_text())  # the line masks them
    response, _reader, writer = await http_connect(pop_plain(info, "las"), echo,
                                                   credentials(with_secrets, "acme"))
    assert response.status == 200
    try:
        child.signal(signal.SIGTERM)
        deadline = time.monotonic() + IO_TIMEOUT
        while not await refuses_connections(pop_plain(info, "las")):
            assert time.monotonic() < deadline, "las still accepts after SIGTERM"
            await asyncio.sleep(0.05)
        # las is draining (its tunnel is open, for up to 10 s): the other PoPs must not accept.
        assert await refuses_connections(pop_plain(info, "jfk"))
    finally:
        await close_writer(writer)
    assert await child.wait(within=10.0) == 0


async def test_pipelined_requests_after_a_local_request_and_a_407_are_all_answered(
    serve: dict[str, Any],
) -> None:
    """Requests queued behind /health and behind a 407 are answered, not dropped."""
    reader, writer = await open_tcp(pop_plain(serve))
    try:
        writer.write(
            b"GET /health HTTP/1.1\r\nHost: pop\r\n\r\n"
            b"GET http://127.0.9.1/ HTTP/1.1\r\nHost: 127.0.9.1\r\n\r\n"  # no credentials
            b"GET /health HTTP/1.1\r\nHost: pop\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        statuses = [(await read_response(reader)).status for _ in range(3)]
    finally:
        await close_writer(writer)
    assert statuses == [200, 407, 200]


def test_pop_on_a_port_in_use_exits_2_with_a_clear_message() -> None:
    import socket
    import subprocess

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)  # a listener of another program: the PoP cannot have the port
    port = taken.getsockname()[1]
    deployment = Path(__file__).resolve().parents[2] / "benchmarks" / "deployment.toml"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "egressd", "pop", "-d", str(deployment), "--pop", "bench",
             "--listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    finally:
        taken.close()
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr
