"""The operator CLI (`egressd account|ip|settings|policy|device|...`) against a real control
plane: `egressd control serve` in a subprocess on a temporary SQLite store. Most commands
run in-process through typer's CliRunner (fast); the exit-code contract is also checked
through real `python -m egressd` processes.

Every output of every command is checked for secrets: the admin token never appears, and a
device secret or enrollment/API token appears only in the output of the command that made it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from egressd.cli import app

SERVE_TIMEOUT = 20.0


@dataclass
class Control:
    url: str
    token: str
    token_file: Path
    process: subprocess.Popen[str]
    log: list[str]
    secrets: set[str] = field(default_factory=set)
    runner: CliRunner = field(default_factory=CliRunner)

    def env(self) -> dict[str, str]:
        return {"EGRESSD_CONTROL_URL": self.url, "EGRESSD_TOKEN_FILE": str(self.token_file),
                "EGRESSD_TOKEN": "", "COLUMNS": "200"}

    def run(self, *args: str, code: int = 0, reveals: str | None = None) -> tuple[str, str]:
        """`egressd ARGS` in-process; checks the exit code and that no secret leaks.
        `reveals` is the one secret this command may (and must) print."""
        result = self.runner.invoke(app, list(args), env=self.env())
        stdout, stderr = result.stdout, result.stderr
        context = f"egressd {' '.join(args)} -> {result.exit_code}\n{stdout}\n{stderr}"
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(context) from result.exception
        assert result.exit_code == code, context
        self.check_secrets(stdout + stderr, allowed=reveals)
        return stdout, stderr

    def json(self, *args: str, code: int = 0) -> Any:
        stdout, _ = self.run(*args, "--json", code=code)
        return json.loads(stdout)

    def check_secrets(self, text: str, allowed: str | None = None) -> None:
        assert self.token not in text, "the admin token was printed"
        for secret in (self.secrets - {allowed}) if allowed else self.secrets:
            assert secret not in text, "a secret was printed again after its creation"
        if allowed is not None:
            self.secrets.add(allowed)

    def secret(self, value: str) -> str:
        self.secrets.add(value)
        return value


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    state = tmp_path_factory.mktemp("control")
    process = subprocess.Popen(
        [sys.executable, "-m", "egressd", "control", "serve", "--state-dir", str(state),
         "--listen", "127.0.0.1:0", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    log: list[str] = []
    ready = threading.Event()
    found: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            log.append(line)
            match = re.search(r"serving (http://\S+)", line)
            if match:
                found.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(SERVE_TIMEOUT) and found, "control plane did not start:\n" + "".join(log)
        token_file = state / "admin.token"
        token = token_file.read_text().strip()
        yield Control(url=found[0], token=token, token_file=token_file, process=process, log=log)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert token not in "".join(log), "the control plane logged the admin token"


@pytest.fixture(scope="module")
def world(control: Control) -> Control:
    """Three data centers (two in Los Angeles) and a dedicated inventory, made by the CLI."""
    for code, city, region, lat, lon, shared in (
        ("lax", "Los Angeles", "US-CA", "34.05", "-118.24", "198.51.100.20"),
        ("bur", "Los Angeles", "US-CA", "34.2", "-118.36", "198.51.100.25"),
        ("jfk", "New York", "US-NY", "40.71", "-74.01", "198.51.100.30"),
    ):
        control.run("dc", "add", code, "--city", city, "--country", "US", "--region", region,
                    "--lat", lat, "--lon", lon, "--shared-ipv4", shared)
    for address, dc in (("203.0.113.20", "lax"), ("2001:db8:120::/48", "lax"),
                        ("203.0.113.21", "lax"), ("203.0.113.25", "bur"),
                        ("203.0.113.30", "jfk")):
        stdout, _ = control.run("ip", "add", address, "--dc", dc)
        assert f"added {address} (dedicated" in stdout
    control.run("account", "create", "acme", "--name", "Acme Corp", "--plan", "enterprise")
    control.run("account", "create", "globex", "--name", "Globex")
    return control


def python_egressd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "egressd", *args], capture_output=True,
                          text=True, timeout=30, env={**os.environ, **(env or {})})


def status(control: Control, account: str) -> str:
    return str(control.json("account", "show", account)["dedicated"]["status"])


def test_inventory_and_dedicated_status_becomes_active(world: Control) -> None:
    c = world
    inventory = c.json("ip", "list", "--kind", "dedicated", "--free")
    assert {row["address"] for row in inventory} >= {"203.0.113.20", "203.0.113.30"}
    stdout, _ = c.run("dc", "list")
    assert "Los Angeles" in stdout and "jfk" in stdout

    stdout, _ = c.run("ip", "assign", "acme", "203.0.113.20", "--ipv6", "2001:db8:120::/48")
    assert "pending" in stdout and "egressd ip confirm acme lax" in stdout
    assert status(c, "acme") == "needs-second-city"
    confirmed = c.json("ip", "confirm", "acme", "lax")
    assert confirmed["state"] == "active" and confirmed["city"] == "Los Angeles"
    # A second location in the same city is not enough (R2).
    c.run("ip", "assign", "acme", "203.0.113.25", "--confirmed")
    assert status(c, "acme") == "needs-second-city"
    stdout, _ = c.run("ip", "assign", "acme", "203.0.113.30", "--id", "ny", "--confirmed")
    assert "dedicated egress active" in stdout and "New York" in stdout
    account = c.json("account", "show", "acme")
    assert account["dedicated"] == {"status": "active", "cities": ["Los Angeles", "New York"],
                                    "detail": "active in Los Angeles, New York"}
    locations = c.json("ip", "locations", "acme")
    assert [(row["id"], row["state"]) for row in locations] == [
        ("bur", "active"), ("lax", "active"), ("ny", "active")]
    held = {row["address"]: row["assigned_to"] for row in c.json("ip", "list", "--dc", "lax")}
    assert held["203.0.113.20"] == "acme" and held["2001:db8:120::/48"] == "acme"

    stdout, _ = c.run("ip", "release", "acme", "bur")
    assert "released location bur" in stdout and "dedicated egress active" in stdout
    # Held addresses cannot leave the inventory.
    _, stderr = c.run("ip", "remove", "203.0.113.20", code=1)
    assert "release it first" in stderr and "rule R2" in stderr
    stdout, _ = c.run("account", "list")
    assert re.search(r"acme\s+Acme Corp\s+enterprise.*active", stdout)


def test_r2_violation_exits_1_with_the_problem(world: Control) -> None:
    c = world
    stdout, stderr = c.run("ip", "assign", "globex", "203.0.113.21", code=1)
    assert stdout == ""
    first = stderr.splitlines()[0]
    assert first == ("egressd: Invalid value (422): dedicated egress IPs are for enterprise "
                     "accounts only [field plan, rule R2]")
    problem = c.json("ip", "assign", "globex", "203.0.113.21", code=1)
    assert problem["status"] == 422 and problem["rule"] == "R2" and problem["field"] == "plan"
    # Request validation: the per-field errors follow the one line.
    _, stderr = c.run("account", "create", "Not A Slug", code=1)
    assert stderr.startswith("egressd: Invalid request (422)") and "[field id]" in stderr
    _, stderr = c.run("account", "show", "nobody", code=1)
    assert "Not found (404): account 'nobody' does not exist" in stderr


def test_network_settings(world: Control) -> None:
    c = world
    assert c.json("settings", "network", "acme") == {
        "proxy_tcp": True, "proxy_udp": False, "fallback": "closed"}
    stdout, _ = c.run("settings", "network", "acme", "--udp", "on")
    assert re.search(r"UDP \(HTTP/3\) through dedicated IPs\s+on", stdout)
    assert c.json("account", "show", "acme")["network"]["proxy_udp"] is True
    _, stderr = c.run("settings", "network", "acme", "--tcp", "off", "--udp", "on", code=1)
    assert "proxy.udp needs proxy.tcp" in stderr and "rule R3" in stderr
    assert c.json("settings", "network", "acme", "--tcp", "off", "--fallback", "shared") == {
        "proxy_tcp": False, "proxy_udp": False, "fallback": "shared"}
    c.run("settings", "network", "acme", "--tcp", "on", "--udp", "on", "--fallback", "closed")
    _, stderr = c.run("settings", "network", "acme", "--udp", "maybe", code=2)
    assert "expected on or off" in stderr
    deployment = c.json("settings", "deployment", "--quarantine-days", "7")
    assert deployment["quarantine_days"] == 7


def test_policies_add_and_move(world: Control) -> None:
    c = world
    c.run("group", "add", "acme", "finance")
    c.run("user", "add", "acme", "bob", "--group", "finance")
    c.run("policy", "add", "acme", "bank", "--group", "finance", "--dest", "*.bank.example",
          "--port", "443", "--action", "dedicated", "--primary", "ny", "--secondary", "lax",
          "--ipv6", "lax")  # ny has no IPv6 range (R9)
    c.run("policy", "add", "acme", "updates", "--dest", "*.updates.example,*.cdn.example",
          "--action", "shared")
    c.run("policy", "add", "acme", "udp", "--protocol", "udp", "--action", "shared",
          "--position", "0")

    def order() -> list[str]:
        return [row["id"] for row in c.json("policy", "list", "acme")]

    assert order() == ["udp", "bank", "updates"]
    moved = c.json("policy", "move", "acme", "udp", "--last")
    assert [(row["id"], row["position"]) for row in moved] == [
        ("bank", 0), ("updates", 1), ("udp", 2)]
    c.run("policy", "move", "acme", "updates", "--before", "bank")
    assert order() == ["updates", "bank", "udp"]
    c.run("policy", "move", "acme", "udp", "--to", "1")
    assert order() == ["updates", "udp", "bank"]
    stdout, _ = c.run("policy", "list", "acme")
    assert re.search(r"2\s+bank\s+-\s+groups=finance dest=\*\.bank\.example ports=443\s+"
                     r"dedicated ny, else lax; IPv6 lax", stdout), stdout
    c.run("policy", "move", "acme", "udp", code=2)  # where to?
    updated = c.json("policy", "update", "acme", "bank", "--clear", "ports", "--name", "NY bank")
    assert updated["ports"] == [] and updated["name"] == "NY bank" and updated["position"] == 2
    assert updated["ipv6"] == "lax" and updated["groups"] == ["finance"]
    _, stderr = c.run("policy", "add", "acme", "bad", "--action", "dedicated", "--primary",
                      "nowhere", "--secondary", "shared", code=1)
    assert "'nowhere' is not a location of this account" in stderr and "rule R6" in stderr
    c.run("policy", "remove", "acme", "udp")
    assert order() == ["updates", "bank"]

    c.run("route", "add", "acme", "office", "10.20.0.0/16", "*.corp.acme.example",
          "--via", "office-connector")
    route = c.json("route", "update", "acme", "office", "--kind", "wan")
    assert route == {"id": "office", "kind": "wan", "via": "office-connector",
                     "destinations": ["10.20.0.0/16", "*.corp.acme.example"]}
    c.run("origin", "set", "cdn", "203.0.113.128/25", "*.cdn.example")
    assert c.json("origin", "list") == [
        {"name": "cdn", "destinations": ["203.0.113.128/25", "*.cdn.example"]}]


def test_devices_and_tokens_are_shown_once(world: Control, tmp_path: Path) -> None:
    c = world
    c.run("user", "add", "acme", "alice")
    created = c.runner.invoke(app, ["device", "enroll", "acme", "alice", "--json"],
                              env=c.env())
    assert created.exit_code == 0, created.output
    token = json.loads(created.stdout)["token"]
    assert token.startswith("egd_enroll_")
    c.check_secrets(created.stdout + created.stderr, allowed=token)
    result = c.runner.invoke(app, ["device", "enroll", "acme", "alice"], env=c.env())
    second = result.stdout.strip().splitlines()[-1]  # the secret is alone on the last line
    assert result.exit_code == 0 and second.startswith("egd_enroll_") and second != token
    c.check_secrets(result.stdout + result.stderr, allowed=second)
    revoked_id = c.json("device", "tokens", "acme")[-1]["id"]
    c.run("device", "revoke-token", "acme", revoked_id)
    tokens = c.json("device", "tokens", "acme")
    assert [(row["user"], row["status"]) for row in tokens] == [("alice", "unused")]

    # The device enrolls itself with the token, without an admin token.
    enrolled = httpx.post(f"{c.url}/v1/enroll", json={"token": token, "device_name": "laptop"})
    assert enrolled.status_code == 201, enrolled.text
    c.secret(enrolled.json()["secret"])
    devices = c.json("device", "list", "acme", "--user", "alice")
    assert [row["id"] for row in devices] == ["acme-alice-laptop"]
    assert c.json("device", "tokens", "acme")[0]["status"] == "used"

    # A device made directly: the password is printed once, on its own line.
    result = c.runner.invoke(app, ["device", "add", "acme", "alice", "--id", "alice-phone"],
                             env=c.env())
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip().splitlines()[-1]
    assert len(secret) >= 24
    c.check_secrets(result.stdout, allowed=secret)
    stdout, _ = c.run("device", "list", "acme")
    assert "alice-phone" in stdout and "acme-alice-laptop" in stdout
    c.run("device", "remove", "acme", "alice-phone")

    # API tokens: shown by `create` only; a token file is 0600.
    result = c.runner.invoke(app, ["token", "create", "--name", "ci", "--account", "acme"],
                             env=c.env())
    assert result.exit_code == 0, result.output
    api_token = result.stdout.strip().splitlines()[-1]
    assert api_token.startswith("egd_")
    c.check_secrets(result.stdout, allowed=api_token)
    stdout, _ = c.run("token", "list")
    assert re.search(r"ci\s+account\s+acme", stdout)
    # The account token reaches its own account only.
    scoped = c.runner.invoke(app, ["account", "list", "--json", "--token", api_token],
                             env=c.env())
    assert [row["id"] for row in json.loads(scoped.stdout)] == ["acme"]
    c.check_secrets(scoped.stdout + scoped.stderr)
    written = c.json("token", "create", "--name", "pop-las", "--scope", "pop", "-o",
                     str(tmp_path / "pop.token"))
    assert "token" not in written and written["token_file"] == str(tmp_path / "pop.token")
    pop_token = (tmp_path / "pop.token").read_text().strip()
    assert (tmp_path / "pop.token").stat().st_mode & 0o777 == 0o600
    c.secret(pop_token)
    assert c.runner.invoke(app, ["pops", "--token", pop_token], env=c.env()).exit_code == 0
    token_id = next(row["id"] for row in c.json("token", "list") if row["name"] == "ci")
    c.run("token", "revoke", token_id)
    revoked = c.runner.invoke(app, ["account", "list", "--token", api_token], env=c.env())
    assert revoked.exit_code == 1 and "unknown or revoked token" in revoked.stderr
    assert "(token from --token)" in revoked.stderr
    c.check_secrets(revoked.stdout + revoked.stderr)

    audit = c.json("audit", "--account", "acme", "--limit", "5")
    assert len(audit) == 5 and audit[0]["action"] == "delete"
    stdout, _ = c.run("audit", "--limit", "50")
    assert "accounts/acme/devices/alice-phone" in stdout
    assert c.json("pops")["pops"] == []
    stdout, _ = c.run("geofeed")
    assert "203.0.113.20/32,US,US-CA,Los Angeles," in stdout


def test_real_processes_and_exit_codes(world: Control) -> None:
    """The contract through real `python -m egressd` processes: 0, 1, 3."""
    c = world
    env = {**c.env(), "EGRESSD_TOKEN_FILE": ""}
    listed = python_egressd("account", "list", "--json", "--control", c.url,
                            "--token-file", str(c.token_file), env=env)
    assert listed.returncode == 0, listed.stderr
    assert {row["id"] for row in json.loads(listed.stdout)} == {"acme", "globex"}
    c.check_secrets(listed.stdout + listed.stderr)

    refused = python_egressd("ip", "assign", "globex", "203.0.113.21", env=c.env())
    assert refused.returncode == 1 and "rule R2" in refused.stderr

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    unreachable = python_egressd("account", "list", "--control", f"http://127.0.0.1:{port}",
                                 env=c.env())
    assert unreachable.returncode == 3
    assert f"cannot reach the control plane at http://127.0.0.1:{port}" in unreachable.stderr


def test_usage_errors_and_missing_token(world: Control, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    c = world
    _, stderr = c.run("ip", "list", "--kind", "weird", code=2)
    assert "expected shared or dedicated" in stderr
    c.run("account", "frobnicate", code=2)
    _, stderr = c.run("account", "list", "--control", "ftp://example.net", code=2)
    assert "not an http:// or https:// URL" in stderr
    _, stderr = c.run("account", "list", "--token-file", str(tmp_path / "missing"), code=2)
    assert "cannot read the token file" in stderr
    stdout, _ = c.run("account", "--help")
    assert "Exit codes" in stdout and "cannot reach the control plane" in stdout
    # No token at all (the default file is looked for in the working directory): 401 and
    # a hint.
    monkeypatch.chdir(tmp_path)
    result = c.runner.invoke(app, ["account", "list"],
                             env={**c.env(), "EGRESSD_TOKEN_FILE": ""})
    assert result.exit_code == 1 and "no token given" in result.stderr


def test_timeout_is_unreachable(world: Control) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        result = world.runner.invoke(app, ["account", "list", "--control", url, "--timeout",
                                           "0.3"], env=world.env())
    assert result.exit_code == 3, result.output
    assert f"cannot reach the control plane at {url}: no answer within 0.3 s" in result.stderr


class _Failing(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/v1/accounts"):
            body = json.dumps({"type": "about:blank", "title": "Internal error", "status": 500,
                               "detail": "the store is down"}).encode()
            self.send_response(500)
            self.send_header("content-type", "application/problem+json")
        else:
            body = b"<html>bad gateway</html>"
            self.send_response(502)
            self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_server_errors_exit_4(world: Control) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        result = world.runner.invoke(app, ["account", "list", "--control", url], env=world.env())
        assert result.exit_code == 4
        assert result.stderr.strip() == "egressd: Internal error (500): the store is down"
        result = world.runner.invoke(app, ["pops", "--control", url], env=world.env())
        assert result.exit_code == 4 and "answered 502" in result.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_account_delete_needs_yes_without_a_terminal(world: Control) -> None:
    c = world
    c.run("account", "create", "initech")
    _, stderr = c.run("account", "delete", "initech", code=2)
    assert "needs --yes" in stderr
    stdout, _ = c.run("account", "delete", "initech", "--yes")
    assert stdout.strip() == "deleted account initech"
    c.run("account", "show", "initech", code=1)
