"""`egressd client` end to end: real `egressd serve` PoPs with device links, the client as a
real process, curl and httpx through its local proxy, the echo checking the source."""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
from pathlib import Path
from typing import Any

import httpx

from egressd.mux import MuxClient, MuxError, StreamRefused
from egressd.protocols.masque import PROTOCOL_TCP, basic_authorization, target_path

from .conftest import Enroll, Spawn, cli, start_client

# R6: the dedicated location nearest (by backbone RTT) to the PoP the device attached to.
ACME_SOURCE = {"las": "127.0.2.100", "lax": "127.0.2.100", "jfk": "127.0.3.100"}
GLOBEX_SOURCE = {"las": {"127.0.1.1", "127.0.1.2"}, "lax": {"127.0.2.1"}, "jfk": {"127.0.3.1"}}


async def curl(*args: str) -> tuple[int, str]:
    binary = shutil.which("curl")
    assert binary is not None, "curl is needed"
    process = await asyncio.create_subprocess_exec(
        binary, "-q", "-sS", "--max-time", "15", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    return process.returncode or 0, (out or err).decode(errors="replace")


def flows(serve: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(serve["flow_log"]).read_text().splitlines() if line]


async def test_enroll_keeps_the_credential_in_a_private_file(serve: dict[str, Any], tmp_path: Path) -> None:
    from .conftest import enrollment_token

    token = await enrollment_token(serve, "acme", "alice")
    state = tmp_path / "device"
    result = await cli("client", "enroll", "--control", serve["control"]["url"], "--token", token,
                       "--state-dir", str(state), "--serve-json",
                       str(Path(serve["flow_log"]).parent / "serve.json"))
    assert result.code == 0, result.err
    device = json.loads((state / "device.json").read_text())
    assert stat.S_IMODE((state / "device.json").stat().st_mode) == 0o600
    assert device["secret"] and device["secret"] not in result.out + result.err
    assert device["account_id"] == "acme" and [p["code"] for p in device["pops"]] == ["las", "lax", "jfk"]
    assert f"enrolled device {device['device_id']} of account acme" in result.out
    # The token is single use: a second enrollment is refused with the reason, exit 1.
    again = await cli("client", "enroll", "--control", serve["control"]["url"], "--token", token,
                      "--state-dir", str(tmp_path / "other"))
    assert again.code == 1 and "already used" in again.err


async def test_curl_and_httpx_reach_the_echo_from_the_expected_address(
        serve: dict[str, Any], enroll: Enroll, spawn: Spawn) -> None:
    acme, globex = await enroll("acme"), await enroll("globex")
    _child, status = await start_client(spawn, acme)
    _other, globex_status = await start_client(spawn, globex)
    proxy = f"http://{status['listen']}"
    expected = ACME_SOURCE[status["connected_pop"]]
    echo, named = serve["echo"]["http"], serve["echo"]["name"]
    # curl: absolute-form, CONNECT tunnel (-p) and SOCKS5 with the name resolved by the PoP.
    assert await curl("-x", proxy, echo) == (0, f"{expected}\n")
    assert await curl("-p", "-x", proxy, named) == (0, f"{expected}\n")
    assert await curl("--socks5-hostname", status["listen"], named) == (0, f"{expected}\n")
    # A Python HTTP client configured with the proxy.
    async with httpx.AsyncClient(proxy=proxy, timeout=10) as client:
        for _ in range(3):  # several flows, one device link
            response = await client.get(f"{echo}trace")
            assert response.status_code == 200
            assert f"ip={expected}\n" in response.text
    globex_code, globex_body = await curl("-x", f"http://{globex_status['listen']}", echo)
    assert globex_code == 0 and globex_body.strip() in GLOBEX_SOURCE[globex_status["connected_pop"]]
    # Every flow went through the PoP's decision and flow log, as the device.
    device_id = json.loads((acme / "device.json").read_text())["device_id"]
    mine = [flow for flow in flows(serve) if flow.get("device") == device_id]
    assert len(mine) >= 6 and all(flow["connected_pop"] == status["connected_pop"] for flow in mine)
    # ... over one TLS connection to the PoP (each flow a stream of it).
    stack = serve["stack"]
    assert stack.device_links[status["connected_pop"]].server.connections_accepted <= 2


async def test_pac_file_and_status(serve: dict[str, Any], enroll: Enroll, spawn: Spawn) -> None:
    state = await enroll("acme")
    _child, status = await start_client(spawn, state)
    host, port = status["listen"].split(":")
    code, pac = await curl(f"http://{status['listen']}/proxy.pac")
    assert code == 0 and f'return "PROXY {host}:{port}; SOCKS5 {host}:{port}";' in pac
    assert "DIRECT" in pac and "FindProxyForURL" in pac
    await curl("-x", f"http://{status['listen']}", serve["echo"]["http"])
    result = await cli("client", "status", "--state-dir", str(state))
    assert result.code == 0, result.err
    connected = status["connected_pop"]
    assert f"connected PoP: {connected} (" in result.out
    assert "dedicated egress: active (active in Los Angeles, New York)" in result.out
    assert "location lax    lax   Los Angeles      127.0.2.100" in result.out
    egress = "jfk" if connected == "jfk" else "lax"
    assert f"current flows leave from: {egress} (" in result.out
    as_json = json.loads((await cli("client", "status", "--state-dir", str(state), "--json")).out)
    assert as_json["running"] and as_json["client"]["connected_pop"] == connected


async def test_status_when_the_client_is_not_running(serve: dict[str, Any], enroll: Enroll) -> None:
    state = await enroll("globex")
    result = await cli("client", "status", "--state-dir", str(state))
    assert result.code == 1 and "client: not running (egressd client run)" in result.out
    missing = await cli("client", "status", "--state-dir", str(state / "nothing"))
    assert missing.code == 2 and "enroll first" in missing.err


async def test_device_link_refuses_flows_without_the_device_credential(
        serve: dict[str, Any], enroll: Enroll) -> None:
    """R13: nothing is proxied for an unauthenticated device, on the multiplexed link too."""
    from egressd.client.attach import client_tls_context

    host, _, port = serve["pops"]["las"]["device_link"].removeprefix("https://").rpartition(":")
    path = target_path(PROTOCOL_TCP, "127.0.9.1", int(serve["echo"]["http"].rsplit(":", 1)[1].strip("/")))
    async with MuxClient(host, int(port), client_tls_context(serve["ca_cert"]),
                         server_hostname=host) as link:
        for headers, reason in (({":path": path}, "device credentials required"),
                                ({":path": path, "proxy-authorization": basic_authorization(
                                    "acme-laptop", "wrong")}, "wrong device credentials")):
            try:
                await link.open(headers, protocol=PROTOCOL_TCP)
            except StreamRefused as refused:
                assert (refused.status, refused.reason) == (407, reason)
            else:
                raise AssertionError("a flow without the right credential was carried")
        secret = serve["accounts"]["acme"]["password"]
        good = {":path": path, "proxy-authorization": basic_authorization("acme-laptop", secret)}
        for bad, reason in (("/.well-known/masque/tcp/x y/80/", "is neither an address nor"),
                            ("/.well-known/masque/udp/x/80/", "is not a connect-tcp target"),
                            ("/.well-known/masque/tcp/x/99999/", "out of range")):
            try:
                await link.open({**good, ":path": bad}, protocol=PROTOCOL_TCP)
            except StreamRefused as refused:
                assert refused.status == 400 and reason in refused.reason
            else:
                raise AssertionError(f"{bad} was carried")
        stream = await link.open(good, protocol=PROTOCOL_TCP)
        assert stream.response_headers["egressd-connected-pop"] == "las"
        assert stream.response_headers["egressd-egress-pop"] == "lax"
        await stream.write(b"GET / HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
        body = b""
        while data := await stream.read():
            body += data
        stream.release()
        assert body.endswith(b"\r\n\r\n127.0.2.100\n")
    failed = [flow for flow in flows(serve) if flow.get("outcome") == "auth-failed"]
    assert failed and "wrong" not in json.dumps(failed).replace("wrong credentials", "")


async def test_wrong_secret_gets_a_clear_refusal_through_the_local_proxy(
        serve: dict[str, Any], enroll: Enroll, spawn: Spawn) -> None:
    state = await enroll("acme")
    device = json.loads((state / "device.json").read_text())
    device["secret"] = "not-the-secret"
    (state / "device.json").write_text(json.dumps(device))
    _child, status = await start_client(spawn, state)
    code, body = await curl("-x", f"http://{status['listen']}", serve["echo"]["http"])
    assert code == 0 and "wrong device credentials" in body
    assert "not-the-secret" not in json.dumps(flows(serve))


async def test_bad_input_to_the_local_proxy_gets_an_answer_not_a_crash(
        serve: dict[str, Any], enroll: Enroll, spawn: Spawn) -> None:
    child, status = await start_client(spawn, await enroll("acme"))
    host, port = status["listen"].split(":")
    for request, expected in ((b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"HTTP/1.1 400"),
                              (b"\x05\x01\x80", b"\x05\xff"),  # no method we speak
                              (b"\x05\x01\x00\x05\x09", b"\x05\x00\x05\x07"),  # bad command
                              (b"BREW coffee HTTP/1.1\r\n\r\n", b"HTTP/1.1 4"),
                              (b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 404"),
                              (b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 403")):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        async with asyncio.timeout(10):
            answer = await reader.read(200)
        writer.close()
        assert answer.startswith(expected), (request, answer)
    # An application that logs in to SOCKS5 anyway is let in (the link holds the credential).
    assert await curl("-x", f"socks5h://app:pw@{status['listen']}", serve["echo"]["name"]) == (
        0, f"{ACME_SOURCE[status['connected_pop']]}\n")
    # Still serving.
    assert await curl("-x", f"http://{status['listen']}", serve["echo"]["http"]) == (
        0, f"{ACME_SOURCE[status['connected_pop']]}\n")
    assert child.process.returncode is None


async def test_run_with_no_reachable_pop_says_so(serve: dict[str, Any], tmp_path: Path) -> None:
    from .conftest import enrollment_token

    token = await enrollment_token(serve, "globex", "carol")
    state = tmp_path / "lonely"
    enrolled = await cli("client", "enroll", "--control", serve["control"]["url"], "--token", token,
                         "--state-dir", str(state), "--pop=las=127.0.0.1:9", "--pop=lax=127.0.0.1:9",
                         "--pop=jfk=127.0.0.1:9")
    assert enrolled.code == 0, enrolled.err
    result = await cli("client", "run", "--state-dir", str(state), "--listen", "127.0.0.1:0")
    assert result.code == 3
    assert "no PoP answered: las (127.0.0.1:9): cannot connect to 127.0.0.1:9" in result.err


async def test_a_draining_pop_hands_the_client_to_another(
        serve: dict[str, Any], enroll: Enroll, spawn: Spawn) -> None:
    _child, status = await start_client(spawn, await enroll("globex"))
    first = status["connected_pop"]
    serve["stack"].device_links[first].stop_accepting()  # new flows get 503 there
    code, body = await curl("-x", f"http://{status['listen']}", serve["echo"]["http"])
    assert code == 0 and body.strip() in set().union(
        *(sources for pop, sources in GLOBEX_SOURCE.items() if pop != first)), body
    moved = json.loads((await curl(f"http://{status['listen']}/status"))[1])
    assert moved["connected_pop"] != first
    assert moved["switches"][-1]["reason"] == f"{first} is draining"


async def test_an_idle_flow_over_the_device_link_is_closed(tmp_path: Path) -> None:
    """The PoP's --idle-timeout holds for device-link flows as for its other tunnels."""
    from egressd.client.attach import client_tls_context
    from egressd.pop.runtime import PopOptions
    from egressd.serve import ServeSettings, ServeStack

    stack = ServeStack(ServeSettings(state_dir=tmp_path / "idle", port_base=0,
                                     options=PopOptions(idle_timeout=0.5)))
    info = await stack.start()
    try:
        host, _, port = info["pops"]["las"]["device_link"].removeprefix("https://").rpartition(":")
        echo_port = int(info["echo"]["http"].rsplit(":", 1)[1].strip("/"))
        login = basic_authorization("globex-laptop", info["accounts"]["globex"]["password"])
        async with MuxClient(host, int(port), client_tls_context(info["ca_cert"]),
                             server_hostname=host) as link:
            stream = await link.open({":path": target_path(PROTOCOL_TCP, "127.0.9.1", echo_port),
                                      "proxy-authorization": login}, protocol=PROTOCOL_TCP)
            started = asyncio.get_running_loop().time()
            try:
                async with asyncio.timeout(5):
                    assert await stream.read() == b""  # nothing sent: the PoP ends it
            except MuxError:
                pass  # reset: also an end
            assert asyncio.get_running_loop().time() - started < 3
            stream.release()
        record = next(flow for flow in flows(info) if flow.get("device") == "globex-laptop")
        assert record["closed_by"] == "idle-timeout"
    finally:
        await stack.close()


async def test_debug_logs_hold_no_secret(serve: dict[str, Any], enroll: Enroll, spawn: Spawn) -> None:
    """hpack logs decoded headers at DEBUG: the device link's credential must not reach them."""
    import base64

    state = await enroll("acme")
    child, status = await start_client(spawn, state, "--log-level", "debug")
    assert await curl("-x", f"http://{status['listen']}", serve["echo"]["http"]) == (
        0, f"{ACME_SOURCE[status['connected_pop']]}\n")
    device = json.loads((state / "device.json").read_text())
    login = base64.b64encode(f"{device['device_id']}:{device['secret']}".encode()).decode()
    logs = child.stderr()
    assert "attached to" in logs
    assert device["secret"] not in logs and login not in logs
