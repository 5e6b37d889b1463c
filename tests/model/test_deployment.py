"""The deployment file loader (`load_deployment`) and `egressd config check`."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from egressd.decide import Egress, decide
from egressd.decide import Path as EgressPath
from egressd.model import LocationState, Plan, SharedAction, Snapshot
from egressd.model.accounts import Fallback
from egressd.model.deployment import DeploymentError, LocatedIssue, load_deployment
from egressd.model.policy import DedicatedAction
from egressd.model.routes import RouteKind

from .builders import addr, flow, net, view

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "seed.toml"
SEED = EXAMPLE.read_text(encoding="utf-8")
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def load(text: str) -> Snapshot:
    return load_deployment(text, now=NOW)


def line_of(text: str, needle: str, after: str | None = None) -> int:
    """1-based number of the first line containing `needle` (after the line with `after`)."""
    lines = text.splitlines()
    start = 0
    if after is not None:
        start = next(i for i, line in enumerate(lines) if after in line) + 1
    for number in range(start, len(lines)):
        if needle in lines[number]:
            return number + 1
    raise AssertionError(f"{needle!r} not in text")


def mutate(old: str, new: str, text: str = SEED) -> str:
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


def errors_of(text: str) -> DeploymentError:
    with pytest.raises(DeploymentError) as excinfo:
        load(text)
    error = excinfo.value
    assert len(error.located) == len(error.issues)
    return error


def located(error: DeploymentError, path: str) -> LocatedIssue:
    for item in error.located:
        if item.issue.path == path:
            return item
    raise AssertionError(f"no issue at {path!r}; got {[str(i) for i in error.located]}")


# --------------------------------------------------------------------------------------------
# The example file
# --------------------------------------------------------------------------------------------


def test_example_is_valid_and_builds_the_expected_snapshot() -> None:
    snap = load(SEED)
    assert snap.version == 1
    assert list(snap.data_centers) == ["las", "lax", "jfk"]
    las = snap.data_centers["las"]
    assert (las.city, las.country, las.region, las.slot) == ("Las Vegas", "US", "US-NV", 1)
    assert (las.latitude, las.longitude) == (36.17, -115.14)
    assert las.shared_ipv4 == (addr("198.51.100.10"), addr("198.51.100.11"))
    assert las.shared_ipv6 == net("2001:db8:10::/48")
    assert las.backbone_address == addr("203.0.113.1")
    assert [dc.slot for dc in snap.data_centers.values()] == [1, 2, 3]

    assert set(snap.accounts) == {"acme", "globex"}
    acme = snap.accounts["acme"]
    assert acme.account.plan is Plan.ENTERPRISE
    assert acme.account.name == "Acme Corp"
    assert acme.dedicated_active
    settings = acme.account.settings
    assert (settings.proxy_tcp, settings.proxy_udp, settings.fallback) == (
        True,
        True,
        Fallback.CLOSED,
    )
    assert [(loc.id, loc.home_pop, str(loc.ipv4), str(loc.ipv6), loc.state) for loc in
            acme.account.locations] == [
        ("lax", "lax", "198.51.100.50", "2001:db8:100::/48", LocationState.ACTIVE),
        ("jfk", "jfk", "198.51.100.60", "2001:db8:200::/48", LocationState.ACTIVE),
    ]  # fmt: skip
    assert {user.name: user.groups for user in acme.account.users} == {
        "alice": frozenset({"engineering"}),
        "bob": frozenset({"finance"}),
    }
    assert snap.devices["bob-laptop"][0] == "acme"
    assert snap.devices["carol-phone"][0] == "globex"
    assert len(snap.devices["alice-laptop"][1].secret_sha256) == 64

    bank, updates = acme.account.policies
    assert bank.id == "bank-from-new-york"
    assert bank.selector.groups == frozenset({"finance"})
    assert bank.selector.hostnames == ("*.bank.example",)
    assert bank.selector.networks == (net("198.51.100.200/32"),)
    assert bank.selector.ports == ((443, 443),)
    assert bank.action == DedicatedAction(primary="jfk", secondary="lax", ipv6="jfk")
    assert updates.id == "updates-shared"
    assert updates.action == SharedAction()

    (route,) = snap.routes
    assert (route.id, route.account, route.kind, route.via) == (
        "office-lan",
        "acme",
        RouteKind.TUNNEL,
        "office-connector",
    )
    assert route.networks == (net("10.20.0.0/16"),)
    assert route.hostnames == ("*.corp.acme.example",)
    (origin,) = snap.origins
    assert origin.name == "cdn"
    assert origin.networks == (net("203.0.113.128/25"),)
    assert origin.hostnames == ("*.cdn.example",)

    globex = snap.accounts["globex"]
    assert globex.account.plan is Plan.FREE
    assert not globex.dedicated_active
    assert snap.settings.quarantine_days == 30
    assert snap.settings.control_addresses == (net("203.0.113.250/32"),)
    assert snap.owner_of(addr("198.51.100.50")) == "acme"
    assert snap.owner_of(addr("2001:db8:200::1")) == "acme"
    assert snap.owner_of(addr("198.51.100.10")) is None


def test_example_decides_the_seed_scenario() -> None:
    snap = load(SEED)
    rtt = {("las", "lax"): 8.0, ("las", "jfk"): 60.0}
    up = view(rtt=rtt)
    # Alice in Las Vegas: Los Angeles, over the backbone.
    alice = decide(snap, flow("acme", "192.0.2.10", device="alice-laptop"), up)
    assert (alice.egress, alice.path, alice.egress_pop, str(alice.source_address)) == (
        Egress.DEDICATED,
        EgressPath.BACKBONE,
        "lax",
        "198.51.100.50",
    )
    # Bob's bank only allowlists New York; with New York down, Los Angeles.
    bank = flow("acme", "192.0.2.20", user="bob", device="bob-laptop", hostname="www.bank.example")
    assert str(decide(snap, bank, up).source_address) == "198.51.100.60"
    assert str(decide(snap, bank, view(down={"jfk"}, rtt=rtt)).source_address) == "198.51.100.50"
    # Updates: shared. Carol (free plan): shared. The CDN: in-network with PROXY v2.
    updates = decide(snap, flow("acme", "192.0.2.30", hostname="dl.updates.example"), up)
    assert updates.rule == "policy:updates-shared"
    assert updates.egress is Egress.SHARED
    carol = decide(snap, flow("globex", "192.0.2.10", user="carol", device="carol-phone"), up)
    assert carol.egress is Egress.SHARED
    assert str(carol.source_address) in {"198.51.100.10", "198.51.100.11"}
    cdn = decide(snap, flow("acme", "203.0.113.200"), up)
    assert cdn.path is EgressPath.IN_NETWORK
    assert str(cdn.proxy_v2_source) == "198.51.100.50"
    # The control plane address is refused.
    assert decide(snap, flow("acme", "203.0.113.250"), up).refused


def test_load_deployment_passes_the_version() -> None:
    assert load_deployment(SEED, version=42, now=NOW).version == 42


# --------------------------------------------------------------------------------------------
# Bad input: every issue names its path and the line it is on
# --------------------------------------------------------------------------------------------

# id: (old, new, issue path, line marker in the mutated text, text the message contains)
BAD_INPUTS: dict[str, tuple[str, str, str, str, str]] = {
    "bad-address-shared": (
        'shared_ipv4 = ["198.51.100.20"]',
        'shared_ipv4 = ["198.51.100.256"]',
        "data_centers[lax].shared_ipv4",
        "198.51.100.256",
        "198.51.100.256",
    ),
    "bad-address-location": (
        'ipv4 = "198.51.100.60"',
        'ipv4 = "198.51.100.600"',
        "accounts[acme].locations[jfk].ipv4",
        "198.51.100.600",
        "IPv4",
    ),
    "ipv6-address-as-ipv4": (
        'ipv4 = "198.51.100.60"',
        'ipv4 = "2001:db8::60"',
        "accounts[acme].locations[jfk].ipv4",
        "2001:db8::60",
        "IPv4",
    ),
    "bad-ipv6-prefix-host-bits": (
        'ipv6 = "2001:db8:200::/48"',
        'ipv6 = "2001:db8:200::1/48"',
        "accounts[acme].locations[jfk].ipv6",
        "2001:db8:200::1/48",
        "IPv6",
    ),
    "bad-backbone": (
        'backbone = "203.0.113.3"',
        'backbone = "203.0.113.x"',
        "data_centers[jfk].backbone",
        "203.0.113.x",
        "203.0.113.x",
    ),
    "bad-cidr-destination": (
        '"198.51.100.200/32"',
        '"198.51.100.200/24"',
        "accounts[acme].policies[bank-from-new-york].destinations",
        "198.51.100.200/24",
        "CIDR",
    ),
    "bad-hostname-destination": (
        'destinations = ["*.updates.example"]',
        'destinations = ["bad host!"]',
        "accounts[acme].policies[updates-shared].destinations",
        "bad host!",
        "bad host!",
    ),
    "bad-control-address": (
        'control_addresses = ["203.0.113.250/32"]',
        'control_addresses = ["203.0.113.250/33"]',
        "deployment.control_addresses",
        "203.0.113.250/33",
        "CIDR",
    ),
    "missing-city": (
        'city = "New York"\n',
        "",
        "data_centers[jfk].city",
        'code = "jfk"',
        "missing",
    ),
    "missing-latitude": (
        "latitude = 34.05\n",
        "",
        "data_centers[lax].latitude",
        'code = "lax"',
        "missing",
    ),
    "missing-via": (
        '  via = "office-connector"\n',
        "",
        "accounts[acme].private_routes[office-lan].via",
        'id = "office-lan"',
        "missing",
    ),
    "missing-primary": (
        '  primary = "jfk"\n',
        "",
        "accounts[acme].policies[bank-from-new-york].primary",
        'id = "bank-from-new-york"',
        "missing",
    ),
    "missing-location-pop": (
        '  pop = "lax"\n',
        "",
        "accounts[acme].locations[lax].pop",
        'id = "lax"',
        "missing",
    ),
    "missing-device-secret": (
        '  secret_sha256 = "773f2025e00f4e7e11b81e5b3726d1a10739a46d605ccf6a76dc8c73816e5aed"\n',
        "",
        "accounts[globex].devices[carol-phone].secret_sha256",
        'id = "carol-phone"',
        "missing",
    ),
    "unknown-pop-location": (
        '  pop = "jfk"',
        '  pop = "ord"',
        "accounts[acme].locations[jfk].pop",
        'pop = "ord"',
        "ord",
    ),
    "unknown-pop-policy": (
        '  id = "updates-shared"\n',
        '  id = "updates-shared"\n  connected_pops = ["ord"]\n',
        "accounts[acme].policies[updates-shared].connected_pops",
        'connected_pops = ["ord"]',
        "ord",
    ),
    "unknown-user-device": (
        '  user = "carol"',
        '  user = "dave"',
        "accounts[globex].devices[carol-phone].user",
        'user = "dave"',
        "dave",
    ),
    "unknown-location-policy": (
        '  secondary = "lax"',
        '  secondary = "ord"',
        "accounts[acme].policies[bank-from-new-york].secondary",
        'secondary = "ord"',
        "ord",
    ),
    "wrong-type-float": (
        "latitude = 34.05",
        'latitude = "north"',
        "data_centers[lax].latitude",
        'latitude = "north"',
        "float",
    ),
    "wrong-type-bool": (
        "proxy_tcp = true",
        'proxy_tcp = "yes"',
        "accounts[acme].network.proxy_tcp",
        'proxy_tcp = "yes"',
        "bool",
    ),
    "wrong-type-int": (
        "slot = 3",
        'slot = "3"',
        "data_centers[jfk].slot",
        'slot = "3"',
        "int",
    ),
    "wrong-type-bool-for-int": (
        "slot = 3",
        "slot = true",
        "data_centers[jfk].slot",
        "slot = true",
        "int",
    ),
    "wrong-type-str": (
        '  user = "carol"',
        "  user = 7",
        "accounts[globex].devices[carol-phone].user",
        "user = 7",
        "str",
    ),
    "wrong-type-list": (
        '  name = "bob"\n  groups = ["finance"]',
        '  name = "bob"\n  groups = "finance"',
        "accounts[acme].users[bob].groups",
        'groups = "finance"',
        "list",
    ),
    "wrong-type-list-items": (
        'destinations = ["*.updates.example"]',
        "destinations = [1, 2]",
        "accounts[acme].policies[updates-shared].destinations",
        "destinations = [1, 2]",
        "list",
    ),
    "bad-port-range-reversed": (
        'ports = ["443"]',
        'ports = ["443-80"]',
        "accounts[acme].policies[bank-from-new-york].ports",
        'ports = ["443-80"]',
        "443-80",
    ),
    "bad-port-zero": (
        'ports = ["443"]',
        'ports = ["0"]',
        "accounts[acme].policies[bank-from-new-york].ports",
        'ports = ["0"]',
        "0",
    ),
    "bad-port-too-high": (
        'ports = ["443"]',
        'ports = ["1-65536"]',
        "accounts[acme].policies[bank-from-new-york].ports",
        'ports = ["1-65536"]',
        "65536",
    ),
    "bad-port-text": (
        'ports = ["443"]',
        'ports = ["https"]',
        "accounts[acme].policies[bank-from-new-york].ports",
        'ports = ["https"]',
        "https",
    ),
    "unknown-enum-plan": (
        'plan = "free"',
        'plan = "gold"',
        "accounts[globex].plan",
        'plan = "gold"',
        "gold",
    ),
    "unknown-enum-fallback": (
        'fallback = "closed"',
        'fallback = "open"',
        "accounts[acme].network.fallback",
        'fallback = "open"',
        "open",
    ),
    "unknown-enum-state": (
        '  ipv6 = "2001:db8:200::/48"\n',
        '  ipv6 = "2001:db8:200::/48"\n  state = "retired"\n',
        "accounts[acme].locations[jfk].state",
        'state = "retired"',
        "retired",
    ),
    "unknown-enum-route-kind": (
        'kind = "tunnel"',
        'kind = "vpn"',
        "accounts[acme].private_routes[office-lan].kind",
        'kind = "vpn"',
        "vpn",
    ),
    "unknown-enum-action": (
        'action = "shared"',
        'action = "block"',
        "accounts[acme].policies[updates-shared].action",
        'action = "block"',
        "block",
    ),
    "unknown-enum-protocol": (
        '  id = "updates-shared"\n',
        '  id = "updates-shared"\n  protocols = ["icmp"]\n',
        "accounts[acme].policies[updates-shared].protocols",
        'protocols = ["icmp"]',
        "icmp",
    ),
    "r3-udp-without-tcp": (
        "proxy_tcp = true",
        "proxy_tcp = false",
        "accounts[acme].network.proxy_udp",
        "proxy_udp = true",
        "proxy.tcp",
    ),
    "r2-address-owned-twice": (
        'ipv4 = "198.51.100.60"',
        'ipv4 = "198.51.100.50"',
        "accounts[acme].locations[jfk].ipv4",
        "198.51.100.50",  # the second one: see AFTER
        "acme",
    ),
    "r2-shared-address-dedicated": (
        'ipv4 = "198.51.100.60"',
        'ipv4 = "198.51.100.30"',
        "accounts[acme].locations[jfk].ipv4",
        'ipv4 = "198.51.100.30"',
        "shared",
    ),
}
AFTER = {"r2-address-owned-twice": 'id = "jfk"'}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_the_path_and_the_line(case: str) -> None:
    old, new, path, marker, says = BAD_INPUTS[case]
    text = mutate(old, new)
    error = errors_of(text)
    item = located(error, path)
    assert says in item.issue.message, item
    expected = line_of(text, marker.strip(), after=AFTER.get(case))
    assert item.line == expected, (item, text.splitlines()[(item.line or 1) - 1])
    # The rendered message carries line, path and message.
    assert str(item) == f"line {expected}: {item.issue}"
    assert path in str(error)


def test_rule_issues_carry_their_rule() -> None:
    error = errors_of(mutate("proxy_tcp = true", "proxy_tcp = false"))
    assert located(error, "accounts[acme].network.proxy_udp").issue.rule == "R3"
    error = errors_of(mutate('plan = "enterprise"', 'plan = "free"'))
    item = located(error, "accounts[acme].locations")
    assert item.issue.rule == "R2"
    # The line is inside acme's table.
    assert line_of(SEED, 'id = "acme"') <= (item.line or 0) < line_of(SEED, 'id = "globex"')


def test_every_issue_is_reported_at_once() -> None:
    text = mutate("latitude = 34.05", 'latitude = "north"')
    text = mutate('plan = "free"', 'plan = "gold"', text)
    text = mutate('ipv4 = "198.51.100.60"', 'ipv4 = "198.51.100.600"', text)
    error = errors_of(text)
    paths = {item.issue.path for item in error.located}
    assert {
        "data_centers[lax].latitude",
        "accounts[globex].plan",
        "accounts[acme].locations[jfk].ipv4",
    } <= paths
    for item in error.located:
        assert item.line is not None


def test_bad_toml_is_a_deployment_error_naming_the_line() -> None:
    text = '[[data_centers]]\ncode = "las"\ncity = \n'
    error = errors_of(text)
    (issue,) = error.issues
    assert issue.path == "(file)"
    assert "TOML" in issue.message
    assert "line 3" in issue.message


def test_bad_toml_issue_is_located_on_its_line() -> None:
    error = errors_of('[[data_centers]]\ncode = "las"\ncity = \n')
    assert error.located[0].line == 3


def test_bad_toml_unclosed_table() -> None:
    error = errors_of(SEED.replace("[[accounts]]", "[[accounts]", 1))
    assert error.issues[0].path == "(file)"


@pytest.mark.parametrize(
    ("toml", "path"),
    [
        ("data_centers = 5\n", "data_centers"),
        ('accounts = "acme"\n', "accounts"),
        ("in_network_origins = [1]\n", "in_network_origins"),
        ('[[data_centers]]\ncode = "las"\ncity = "Las Vegas"\n', "data_centers[las].country"),
    ],
)
def test_wrong_shape_of_the_file(toml: str, path: str) -> None:
    error = errors_of(toml)
    item = located(error, path)
    assert item.line is not None
    assert item.line <= len(toml.splitlines())


def test_a_wrongly_typed_accounts_is_reported_once() -> None:
    error = errors_of("accounts = 5\n")
    assert [str(i) for i in error.issues] == [str(error.issues[0])]


def test_quarantine_in_the_file() -> None:
    text = SEED + (
        '\n[[quarantine]]\naddress = "198.51.100.60"\nreleased_by = "initech"\n'
        "until = 2030-02-01T00:00:00Z\n"
    )
    error = errors_of(text)
    item = located(error, "accounts[acme].locations[jfk]")
    assert item.issue.rule == "R2"
    assert item.line == line_of(text, 'id = "jfk"', after='ipv4 = "198.51.100.50"')
    snap = load_deployment(text, now=datetime(2030, 2, 1, tzinfo=UTC))
    assert snap.quarantine[0].address == ipaddress.ip_address("198.51.100.60")
    # A local date-time is taken as UTC.
    naive = text.replace("2030-02-01T00:00:00Z", "2030-02-01T00:00:00")
    assert load_deployment(naive, now=NOW.replace(month=3)).quarantine[0].until.tzinfo is not None


def test_quarantine_entry_errors() -> None:
    text = SEED + '\n[[quarantine]]\naddress = "198.51.100.999"\nuntil = "tomorrow"\n'
    error = errors_of(text)
    paths = {item.issue.path for item in error.located}
    assert {
        "quarantine[198.51.100.999].address",
        "quarantine[198.51.100.999].until",
        "quarantine[198.51.100.999].released_by",
    } <= paths


def test_ports_of_the_wrong_type_are_an_error() -> None:
    text = mutate('ports = ["443"]', 'ports = "443"')
    error = errors_of(text)
    assert located(error, "accounts[acme].policies[bank-from-new-york].ports").line == line_of(
        text, 'ports = "443"'
    )


@pytest.mark.parametrize("key", ["control_addresses", "allow_destinations"])
def test_hostnames_in_address_settings_are_an_error(key: str) -> None:
    text = mutate('control_addresses = ["203.0.113.250/32"]', f'{key} = ["control.egress.example"]')
    error = errors_of(text)
    assert located(error, f"deployment.{key}").line == line_of(text, "control.egress.example")


def test_a_user_without_a_name_is_an_error() -> None:
    text = mutate('  name = "carol"\n', "")
    error = errors_of(text)
    assert any(item.issue.path.startswith("accounts[globex].users") for item in error.located)


def test_an_unknown_key_is_an_error() -> None:
    text = mutate('destinations = ["*.updates.example"]', 'destination = ["*.updates.example"]')
    error = errors_of(text)
    assert any("destination" in item.issue.path for item in error.located)


def test_issue_line_when_an_account_and_its_location_share_an_id() -> None:
    text = mutate('id = "acme"', 'id = "jfk"')
    text = mutate('ipv4 = "198.51.100.60"', 'ipv4 = "198.51.100.600"', text)
    error = errors_of(text)
    assert located(error, "accounts[jfk].locations[jfk].ipv4").line == line_of(
        text, "198.51.100.600"
    )


# --------------------------------------------------------------------------------------------
# `egressd config check`, the real console script
# --------------------------------------------------------------------------------------------


def _console_script() -> str:
    beside = Path(sys.executable).with_name("egressd")
    if beside.exists():
        return str(beside)
    found = shutil.which("egressd")
    if found is None:
        pytest.skip("the egressd console script is not installed")
    return found


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run(
        [_console_script(), "config", "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_cli_check_accepts_the_example() -> None:
    result = run_check(str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
    assert "3 data centers" in result.stdout
    assert "acme" in result.stdout
    quiet = run_check("--quiet", str(EXAMPLE))
    assert quiet.returncode == 0
    assert quiet.stdout.strip() == ""


def test_cli_check_reports_every_error_with_its_line(tmp_path: Path) -> None:
    text = mutate("latitude = 34.05", 'latitude = "north"')
    text = mutate('ports = ["443"]', 'ports = ["443-80"]', text)
    text = mutate("proxy_tcp = true", 'proxy_tcp = "yes"', text)
    broken = tmp_path / "broken.toml"
    broken.write_text(text, encoding="utf-8")
    result = run_check(str(broken))
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "error" in result.stderr
    lat = line_of(text, 'latitude = "north"')
    tcp = line_of(text, 'proxy_tcp = "yes"')
    assert f"{broken}:{lat}: data_centers[lax].latitude: expected float" in result.stderr
    assert f"{broken}:{tcp}: accounts[acme].network.proxy_tcp: expected bool" in result.stderr


def test_cli_check_reports_rule_errors_with_line_and_rule(tmp_path: Path) -> None:
    text = mutate('ports = ["443"]', 'ports = ["443-80"]')
    text = mutate("proxy_tcp = true", "proxy_tcp = false", text)
    broken = tmp_path / "rules.toml"
    broken.write_text(text, encoding="utf-8")
    result = run_check(str(broken))
    assert result.returncode == 1
    ports = line_of(text, 'ports = ["443-80"]')
    udp = line_of(text, "proxy_udp = true")
    assert f"{broken}:{ports}: accounts[acme].policies[bank-from-new-york].ports" in result.stderr
    assert f"{broken}:{udp}: accounts[acme].network.proxy_udp" in result.stderr
    assert "[R3]" in result.stderr


def test_cli_check_bad_toml_exits_1(tmp_path: Path) -> None:
    broken = tmp_path / "syntax.toml"
    broken.write_text("[[data_centers]\n", encoding="utf-8")
    result = run_check(str(broken))
    assert result.returncode == 1
    assert "not valid TOML" in result.stderr


def test_cli_check_missing_file_exits_2(tmp_path: Path) -> None:
    result = run_check(str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert "absent.toml" in result.stderr


def test_type_errors_and_rule_errors_are_reported_in_one_run() -> None:
    text = mutate("proxy_tcp = true", "proxy_tcp = false")
    text = mutate('destinations = ["*.updates.example"]', 'destination = ["*.updates.example"]', text)
    error = errors_of(text)
    paths = {item.issue.path for item in error.located}
    assert "accounts[acme].network.proxy_udp" in paths  # R3, a rule error
    assert "accounts[acme].policies[updates-shared].destination" in paths  # unknown key
