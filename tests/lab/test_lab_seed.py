"""`egressd lab` as root: the seed's table, row by row, from what the origins observed
(issue 5), real clients in the device's namespace, and nothing left behind by `down`, by a
failed `up` or by an interrupted one. Each test's lab has a unique name."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from egressd.cli.lab_cmd import DEFAULT_TOPOLOGY
from egressd.lab import netns, runner, scenarios

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(300)]

EGRESSD = [sys.executable, "-m", "egressd"]


def leftovers(name: str) -> list[str]:
    """Anything of lab `name` that still exists: namespaces, state, TAPs, processes."""
    found = list(netns.lab_namespaces(name))
    if runner.lab_directory(name).exists():
        found.append(str(runner.lab_directory(name)))
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    stem = netns.tap_names(name, 0)[0][:-2]
    found += [line.split(":")[1].strip() for line in links.splitlines() if stem in line]
    marker = f"{runner.lab_directory(name)}/".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(f"process {pid}")
        except OSError:
            continue
    return found


def lab_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EGRESSD, "lab", *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def lab_name() -> Iterator[str]:
    name = f"t{secrets.token_hex(3)}"
    try:
        result = lab_cli("up", "--name", name)
        assert result.returncode == 0, result.stderr
        assert f"lab {name} is up" in result.stdout
        yield name
    finally:
        runner.down(name)
    assert leftovers(name) == []


@pytest.fixture(scope="module")
def seed_rows(lab_name: str) -> dict[str, dict[str, Any]]:
    result = lab_cli("run", "seed", "--name", lab_name, "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows, result.stderr
    return {row["case"].split(" (")[0]: row for row in rows}


LAS_SHARED = {"198.51.100.10", "198.51.100.11"}
ACME_LAX_IN_LAS = ipaddress.ip_network("2001:db8:100:1::/64")  # acme's LA range, las's sub-range (R9)


def test_ordinary_ipv4_leaves_los_angeles(seed_rows: dict[str, dict[str, Any]]) -> None:
    row = seed_rows["ordinary site, IPv4"]
    assert (row["connected"], row["egress_pop"], row["source"], row["geolocation"]) == (
        "las", "lax", "198.51.100.50", "Los Angeles"), row
    assert row["ok"]


def test_in_network_ipv4_leaves_las_as_the_los_angeles_address(seed_rows: dict[str, dict[str, Any]]) -> None:
    row = seed_rows["in-network site, IPv4"]
    assert row["egress_pop"] == "las", row
    logical, physical = row["source"].split(" (PROXY v2; packets from ")
    assert logical == "198.51.100.50" and physical.rstrip(")") in LAS_SHARED
    assert row["geolocation"] == "Los Angeles" and row["ok"]


@pytest.mark.parametrize("case", ["ordinary site, IPv6", "in-network site, IPv6"])
def test_ipv6_leaves_las_geolocated_to_los_angeles(seed_rows: dict[str, dict[str, Any]], case: str) -> None:
    row = seed_rows[case]
    assert row["egress_pop"] == "las", row
    assert ipaddress.ip_address(row["source"]) in ACME_LAX_IN_LAS
    assert row["geolocation"] == "Los Angeles" and row["ok"]


@pytest.mark.parametrize("case", ["DNS query by the device to its PoP", "name of a proxied flow, resolved by the PoP"])
def test_dns_resolved_by_the_gateway_leaves_from_a_shared_address(seed_rows: dict[str, dict[str, Any]],
                                                                   case: str) -> None:
    """R4, from the lab DNS server's log: the query came from a las shared address over las's link."""
    row = seed_rows[case]
    assert row["source"] in LAS_SHARED and row["egress_pop"] == "las", row
    assert row["geolocation"] == "Las Vegas" and row["ok"], row


def test_the_private_origin_sees_no_dedicated_address(seed_rows: dict[str, dict[str, Any]]) -> None:
    row = seed_rows["private origin over a WAN route"]
    assert row["source"] in LAS_SHARED and row["egress_pop"] == "las" and row["ok"], row


def test_a_free_account_leaves_shared(seed_rows: dict[str, dict[str, Any]]) -> None:
    row = seed_rows["free account globex"]
    assert row["source"] in LAS_SHARED and row["geolocation"] == "Las Vegas" and row["ok"], row


@pytest.mark.parametrize("case", ["acme's branch", "acme's office"])
def test_another_account_cannot_reach_the_private_origins(seed_rows: dict[str, dict[str, Any]], case: str) -> None:
    row = seed_rows[case]
    assert row["source"] == "-" and row["ok"], row
    assert "HTTP 403" in row["note"] and "private route of another account" in row["note"]


def test_the_origin_behind_the_connector_sees_the_connectors_address(seed_rows: dict[str, dict[str, Any]]) -> None:
    """Issue 6: carried to the connector in the office, which connects from its own host."""
    row = seed_rows["private origin behind a tunnel connector"]
    assert row["egress_pop"] == "connector office-1" and row["source"] == "198.51.100.194" and row["ok"], row


def test_losing_one_of_the_connectors_two_links_keeps_the_office_reachable(lab_name: str) -> None:
    """Cut one of the connector's TCP connections to a PoP (ss -K in the office's namespace):
    the next request reaches the office origin at once, through the other link."""
    lab = runner.load(lab_name)
    deadline = time.monotonic() + 20
    while len(attached := runner.connector_pops(lab, "office-1")) < 2:
        assert time.monotonic() < deadline, attached
        time.sleep(0.2)
    victim = attached[0]
    address = lab.plan.pop_address(victim)
    log = lab.directory / "connector-office.log"
    logged = len(log.read_text())
    cut = subprocess.run([*lab.exec_in("p-office", "ss", "-K", "dst", str(address), "dport", "=",
                                       str(lab.plan.tunnel_port))], capture_output=True, text=True, check=False)
    assert str(address) in cut.stdout, cut  # the socket it destroyed
    probe = scenarios.Device(lab, "s-home", "alice-laptop", "lab-alice-secret", "las")
    answer = probe.http("http://198.51.100.194:80/trace")
    assert answer.get("ok") and answer["trace"]["ip"] == "198.51.100.194", (answer, victim)
    assert f"link to PoP {victim} closed" in log.read_text()[logged:]
    deadline = time.monotonic() + 30  # and the connector dials a second PoP again
    while len(runner.connector_pops(lab, "office-1")) < 2:
        assert time.monotonic() < deadline, "the connector did not restore its second link"
        time.sleep(0.2)


def test_udp_follows_proxy_udp(seed_rows: dict[str, dict[str, Any]]) -> None:
    off, on = seed_rows["UDP, proxy.udp off"], seed_rows["UDP, proxy.udp on"]
    assert (off["egress_pop"], off["ok"]) == ("las", True) and off["source"] in LAS_SHARED, off
    assert (on["egress_pop"], on["source"], on["ok"]) == ("lax", "198.51.100.50", True), on


def test_failover_moves_new_flows_to_new_york_within_3_s(seed_rows: dict[str, dict[str, Any]]) -> None:
    row = seed_rows["failover: lax stopped"]
    assert (row["egress_pop"], row["source"], row["geolocation"]) == ("jfk", "198.51.100.60", "New York"), row
    started = float(row["note"].split("started ")[1].split(" s")[0])
    assert started <= 3.0 and row["ok"]


def test_the_lab_is_whole_again_after_the_scenario(lab_name: str, seed_rows: dict[str, dict[str, Any]]) -> None:
    """The scenario restarts the PoP it stopped and restores proxy_udp: a second run is the same."""
    result = lab_cli("status", "--name", lab_name, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads(result.stdout)
    las = status["pops"]["las"]["peers"]
    assert las["lax"]["up"] and las["jfk"]["up"]
    assert las["lax"]["rtt_ms"] < las["jfk"]["rtt_ms"]  # R6's input: Los Angeles is nearer
    network = runner.load(lab_name).api("GET", "/v1/accounts/acme/settings/network")
    assert network["proxy_udp"] is False  # as the topology has it


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_from_the_device_namespace(lab_name: str) -> None:
    """A real curl at the user's site, through the Las Vegas PoP: the origin sees acme's LA address."""
    lab = runner.load(lab_name)
    config = lab.directory / "curl-alice.rc"
    config.touch(mode=0o600)
    config.write_text('proxy-user = "alice-laptop:lab-alice-secret"\n')
    curl = [*lab.exec_in("s-home", "curl"), "-sS", "--max-time", "10", "-K", str(config)]
    http = subprocess.run([*curl, "-x", "http://203.0.113.1:8080", "http://203.0.113.100/trace"],
                          capture_output=True, text=True, check=False)
    trace = dict(line.split("=", 1) for line in http.stdout.splitlines() if "=" in line)
    assert (trace.get("ip"), trace.get("link"), trace.get("city")) == ("198.51.100.50", "lax", "Los Angeles"), http
    # --socks5-hostname: the PoP resolves the lab name with its resolver; IPv6 is tried first (RFC 8305)
    socks = subprocess.run([*curl, "--socks5-hostname", "203.0.113.1:8080", "http://echo.lab.egressd.test/trace"],
                           capture_output=True, text=True, check=False)
    trace = dict(line.split("=", 1) for line in socks.stdout.splitlines() if "=" in line)
    assert trace.get("link") == "las" and ipaddress.ip_address(trace["ip"]) in ACME_LAX_IN_LAS, socks
    # the device has no route of its own to the Internet: only through the PoP
    direct = subprocess.run([*lab.exec_in("s-home", "curl"), "-sS", "--max-time", "3", "http://203.0.113.100/"],
                            capture_output=True, text=True, check=False)
    assert direct.returncode != 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_resolves_with_doh_at_its_pop(lab_name: str) -> None:
    """curl --doh-url at the user's site: its PoP's DoH answers from the lab zone (asked upstream
    from a shared address), then the flow goes through SOCKS5 to the address curl resolved."""
    lab = runner.load(lab_name)
    name = f"doh{secrets.token_hex(3)}.echo.lab.egressd.test"
    credentials = "alice-laptop:lab-alice-secret"
    config = lab.directory / "curl-doh.rc"
    config.touch(mode=0o600)
    config.write_text(f'doh-url = "https://{credentials}@203.0.113.1:8443/dns-query"\n'
                      f'proxy = "socks5://{credentials}@203.0.113.1:8080"\n')
    result = subprocess.run([*lab.exec_in("s-home", "curl"), "-sS", "-4", "--max-time", "10", "-K", str(config),
                             "--cacert", str(lab.pki / "ca.crt"), f"http://{name}/trace"],
                            capture_output=True, text=True, check=False)
    trace = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert (trace.get("ip"), trace.get("link")) == ("198.51.100.50", "lax"), result
    asked = [json.loads(line) for line in lab.dns_log.read_text().splitlines()]
    asked = [entry for entry in asked if entry["name"] == f"{name}."]
    assert asked and {(e["source"], e["link"]) for e in asked} <= {(a, "las") for a in LAS_SHARED}
    flows = [json.loads(line) for line in lab.flow_log("las").read_text().splitlines()]
    assert any(f["protocol"] == "dns" and f["hostname"] == name and f["account"] == "acme" for f in flows)


def test_the_device_client_and_verify_in_the_lab(lab_name: str) -> None:
    """Issue 7 in the lab: enrol through the control plane, `egressd client run` at the user's
    site attaches to the only PoP it reaches (las), curl through the local proxy leaves Los
    Angeles, and `egressd verify` finds both families dedicated (IPv6 by R9, from las)."""
    lab = runner.load(lab_name)
    token = lab.api("POST", "/v1/accounts/acme/enrollment-tokens", {"user": "alice"})["token"]
    state = lab.directory / "client-test"
    site = lab.exec_in("s-home", *EGRESSD)
    pops = [arg for code in ("las", "lax", "jfk") for arg in
            ("--pop", f"{code}={lab.plan.pop_address(code)}:{lab.plan.device_port}")]
    enrolled = subprocess.run([*site, "client", "enroll", "--control", lab.plan.control_url, "--token", token,
                               *pops, "--ca", str(lab.pki / "ca.crt"), "--echo4", "http://203.0.113.100/trace",
                               "--echo6", "http://[2001:db8:ffff::100]/trace", "--state-dir", str(state)],
                              capture_output=True, text=True, check=False, timeout=60)
    assert enrolled.returncode == 0, enrolled.stderr
    assert token not in enrolled.stdout + enrolled.stderr
    log = (lab.directory / "client-test.log").open("wb")
    client = subprocess.Popen([*site, "client", "run", "--state-dir", str(state), "--listen", "127.0.0.1:40001"],
                              stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        trace: dict[str, str] = {}
        while time.monotonic() < deadline and trace.get("link") != "lax":
            curl = subprocess.run([*lab.exec_in("s-home", "curl"), "-sS", "--max-time", "5", "-x",
                                   "http://127.0.0.1:40001", "http://203.0.113.100/trace"],
                                  capture_output=True, text=True, check=False)
            trace = dict(line.split("=", 1) for line in curl.stdout.splitlines() if "=" in line)
            time.sleep(0.2)
        assert (trace.get("ip"), trace.get("link")) == ("198.51.100.50", "lax"), trace
        verify = subprocess.run([*site, "verify", "--state-dir", str(state), "--proxy", "127.0.0.1:40001", "--json"],
                                capture_output=True, text=True, check=False, timeout=60)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        report = json.loads(verify.stdout)
        text = json.dumps(report)
        assert "198.51.100.50" in text and "2001:db8:100:1:" in text, report
    finally:
        client.terminate()
        client.wait(10)
        log.close()


def test_a_failed_up_leaves_nothing(tmp_path: Path) -> None:
    name = f"f{secrets.token_hex(3)}"
    broken = DEFAULT_TOPOLOGY.read_text().replace('ipv4 = "203.0.113.53"', 'ipv4 = "203.0.113.100"')
    topology = tmp_path / "broken.toml"
    topology.write_text(broken)
    try:
        result = lab_cli("up", "--name", name, "--topology", str(topology))
        assert result.returncode == 2 and "egressd lab:" in result.stderr, result
        assert leftovers(name) == []
    finally:
        runner.down(name)


def test_an_interrupted_up_leaves_nothing() -> None:
    name = f"i{secrets.token_hex(3)}"
    process = subprocess.Popen([*EGRESSD, "lab", "up", "--name", name], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(netns.lab_namespaces(name)) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert netns.lab_namespaces(name), "lab up never created its namespaces"
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=60)
        assert process.returncode == 130 and "interrupted" in err, err
        assert leftovers(name) == []
    finally:
        if process.poll() is None:
            process.kill()
        runner.down(name)


FLOWS_SCRIPT = r'''
import asyncio, base64, json, sys
FLOWS = int(sys.argv[1])
AUTH = "Basic " + base64.b64encode(b"alice-laptop:lab-alice-secret").decode()

async def one(gate):
    async with gate:  # at most 32 handshakes at once (the PoP caps unfinished ones per source)
        reader, writer = await asyncio.open_connection("203.0.113.1", 8080)
        writer.write(f"CONNECT 203.0.113.100:80 HTTP/1.1\r\nHost: 203.0.113.100:80\r\n"
                     f"Proxy-Authorization: {AUTH}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer

async def main():
    gate = asyncio.Semaphore(32)
    tunnels = await asyncio.gather(*(one(gate) for _ in range(FLOWS)))
    print("open", flush=True)
    sys.stdin.readline()  # the test counts backbone connections meanwhile
    seen = {}
    for reader, writer in tunnels:  # every tunnel still works, from the Los Angeles address
        writer.write(b"GET /trace HTTP/1.1\r\nHost: echo\r\n\r\n")
    for reader, writer in tunnels:
        await reader.readuntil(b"\r\n\r\n")
        body = (await reader.readuntil(b"link=")) + await reader.readline()
        trace = dict(line.split("=", 1) for line in body.decode().splitlines() if "=" in line)
        key = (trace["ip"], trace["link"])
        seen[str(key)] = seen.get(str(key), 0) + 1
        writer.close()
    print(json.dumps(seen), flush=True)

asyncio.run(main())
'''


def test_1000_concurrent_flows_share_one_backbone_connection(lab_name: str) -> None:
    """Issue 5: the multiplexed backbone carries 1,000 concurrent flows over one TCP
    connection from las to lax; every flow arrives at the origin from lax, from 198.51.100.50."""
    lab = runner.load(lab_name)
    flows = 1000
    process = subprocess.Popen(lab.exec_in("s-home", sys.executable, "-c", FLOWS_SCRIPT, str(flows)),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdin is not None
        assert process.stdout.readline().strip() == "open", process.stderr.read() if process.stderr else ""
        sockets = subprocess.run([*lab.exec_in("las", "ss", "-Htn", "state", "established",
                                               "dst", "203.0.113.2:7443")],
                                 capture_output=True, text=True, check=True).stdout
        health = runner.pop_health(lab, "las") or {}
        process.stdin.write("go\n")
        process.stdin.flush()
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert len(sockets.strip().splitlines()) == 1, sockets
    assert health.get("active_tunnels", 0) >= flows
    assert json.loads(out.strip().splitlines()[-1]) == {str(("198.51.100.50", "lax")): flows}, err


def test_an_interrupted_run_puts_the_lab_back(lab_name: str) -> None:
    """SIGTERM while the failover row has the Los Angeles PoP stopped: the run exits 130,
    lax is started again and the deployment is what it was."""
    lab = runner.load(lab_name)
    before = lab.api("GET", "/v1/accounts/acme/settings/network")
    process = subprocess.Popen([*EGRESSD, "lab", "run", "seed", "--name", lab_name],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while lab.pop_pids("lax") and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        assert not lab.pop_pids("lax"), "the failover row never stopped lax"
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and "interrupted" in err, err
    log = lab.directory / "pop-lax.log"
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    assert lab.pop_pids("lax"), f"lax was not running after the run; its log ends:\n{tail}\nthe run said:\n{err}"
    assert lab.api("GET", "/v1/accounts/acme/settings/network") == before
    status = json.loads(lab_cli("status", "--name", lab_name, "--json").stdout)
    assert all(peer["up"] for pop in status["pops"].values() for peer in pop["peers"].values())
