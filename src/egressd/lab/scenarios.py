"""`egressd lab run seed`: the seed's story, told by what the origins saw.

A device at the lab's first site, of the first enterprise account with active dedicated
locations, sends one request per case through its PoP. Each row reports what the *origin*
observed — the source address in the echo's trace, the interface the packets arrived on
(named after the PoP whose link it is), the city the geofeed gives that address, or the
source the lab's DNS server logged — and compares it with what the seed promises. The PoP's
own flow log is not consulted. The scenario leaves the lab as it found it: `proxy_udp` is
restored and the PoP stopped for the failover is started again.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from egressd.lab import netns
from egressd.lab.plan import INTERNET, LabError, Origin
from egressd.lab.runner import (
    ECHO_HTTP_PORT,
    ECHO_UDP_PORT,
    Lab,
    pop_health,
    start_pop,
    wait_backbone,
)
from egressd.model.accounts import DedicatedLocation
from egressd.protocols.geofeed import GeofeedIndex

FAILOVER_WITHIN = 3.0  # R11: a dead location is avoided for new flows within 3 s
PROBE_TIMEOUT = 20.0


@dataclass(slots=True)
class Row:
    case: str
    destination: str
    family: int
    connected: str
    egress_pop: str = "-"  # observed: the link the packets arrived on
    source: str = "-"  # observed: the address the origin saw
    geolocation: str = "-"  # the geofeed's city for that address
    expected: str = ""
    ok: bool = False
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Result:
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(row.ok for row in self.rows)

    def table(self) -> str:
        header = ("case", "destination", "fam", "connected", "egress PoP", "source seen by origin",
                  "geolocation", "")
        lines = [header] + [(r.case, r.destination, str(r.family), r.connected, r.egress_pop, r.source,
                             r.geolocation, ("ok" if r.ok else f"FAIL: expected {r.expected}")
                             + (f" ({r.note})" if r.note else "")) for r in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
        out = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)) + "  " + line[-1]
               for line in lines]
        out.insert(1, "-" * len(out[0]))
        verdict = "all rows as the seed says" if self.ok else "SOME ROWS DIFFER from the seed"
        return "\n".join(out) + f"\n\n{sum(r.ok for r in self.rows)}/{len(self.rows)} rows ok: {verdict}\n"


def run(name: str, lab: Lab) -> Result:
    scenarios: dict[str, Callable[[Lab], Result]] = {"seed": seed}
    if name not in scenarios:
        raise LabError(f"unknown scenario {name!r}; known: {', '.join(scenarios)}")
    return scenarios[name](lab)


class Device:
    """Requests from a device in its site's namespace, through its PoP."""

    def __init__(self, lab: Lab, site_role: str, device: str, secret: str, pop: str) -> None:
        self.lab, self.site_role, self.device, self.pop = lab, site_role, device, pop
        self.credentials = lab.directory / f"device-{device}.credentials"
        if not self.credentials.exists():
            self.credentials.touch(mode=0o600)
            self.credentials.write_text(f"{device}:{secret}\n", encoding="utf-8")
        self.proxy = f"{lab.plan.pop_address(pop)}:{lab.plan.proxy_port}"

    def _probe(self, *args: str) -> dict[str, Any]:
        command = self.lab.exec_in(self.site_role, sys.executable, "-m", "egressd.lab.probe", *args)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"no answer within {PROBE_TIMEOUT:g} s"}
        try:
            answer: dict[str, Any] = json.loads(result.stdout)
        except json.JSONDecodeError:
            return {"ok": False, "error": (result.stderr.strip() or "no output")[-300:]}
        return answer

    def http(self, url: str) -> dict[str, Any]:
        """Through the HTTP proxy; IPv6 literals through SOCKS5 (see probe.socks5_http_probe)."""
        kind = "socks5-http" if "[" in url else "http"
        return self._probe(kind, self.proxy, str(self.credentials), url)

    def dns(self, name: str, kind: str) -> dict[str, Any]:
        return self._probe("dns", str(self.lab.plan.pop_address(self.pop)), name, kind)

    def udp(self, host: str, port: int) -> dict[str, Any]:
        return self._probe("udp", self.proxy, str(self.credentials), host, str(port))


def _url(address: ipaddress.IPv4Address | ipaddress.IPv6Address, path: str = "/trace") -> str:
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{host}:{ECHO_HTTP_PORT}{path}"


def _observed_pop(lab: Lab, origin: Origin, link: str | None) -> str:
    """Where the origin's packets came from: the PoP whose link they arrived on (for a WAN
    site, its only link's PoP); for an office behind a connector, the connector itself
    (the packets come from its own host: `lo`)."""
    if link is None:
        return "?"
    if origin.namespace_role == INTERNET:
        return link
    site = next((p for p in lab.plan.private_sites if f"p-{p.name}" == origin.namespace_role), None)
    if site is None:
        return link
    if site.pop is None:
        return f"connector {site.connector}" if link == "lo" else f"{link}?"
    return site.pop


def _fill(row: Row, lab: Lab, origin: Origin, answer: dict[str, Any], geofeed: GeofeedIndex) -> None:
    if not answer.get("ok"):
        row.note = str(answer.get("error", "failed"))[:160]
        return
    trace = answer.get("trace", {})
    row.source = trace.get("ip", "?")
    if trace.get("proxy_protocol") == "yes":
        row.source += f" (PROXY v2; packets from {trace.get('peer')})"
    row.egress_pop = _observed_pop(lab, origin, trace.get("link"))
    row.geolocation = trace.get("city") or _city(geofeed, trace.get("ip"))


def _city(geofeed: GeofeedIndex, address: str | None) -> str:
    try:
        entry = geofeed.lookup(ipaddress.ip_address(address or ""))
    except ValueError:
        return "?"
    return entry.city if entry is not None else "-"


def _primary(lab: Lab, connected: str, locations: tuple[DedicatedLocation, ...]) -> DedicatedLocation:
    """The location the seed expects: the most performant from the connected PoP (R6)."""
    def delay(location: DedicatedLocation) -> float:
        if location.home_pop == connected:
            return 0.0
        for link in lab.plan.links:
            if {link.a_role, link.b_role} == {connected, location.home_pop}:
                return link.delay_ms
        return float("inf")
    return min(locations, key=lambda location: (delay(location), location.id))


def set_network(lab: Lab, account: str, settings: dict[str, Any]) -> None:
    """Change `account`'s network settings through the control plane, as an operator would,
    and wait until every PoP serves the new version (R14)."""
    lab.api("PATCH", f"/v1/accounts/{account}/settings/network", settings)
    version = int(lab.api("GET", "/v1/version")["version"])
    deadline = time.monotonic() + 10
    for code in lab.plan.snapshot.data_centers:
        while (pop_health(lab, code) or {}).get("snapshot_version", 0) < version:
            if time.monotonic() > deadline:
                raise LabError(f"PoP {code} did not apply version {version} of the configuration")
            time.sleep(0.05)


def seed(lab: Lab) -> Result:
    plan = lab.plan
    if not plan.sites:
        raise LabError("the seed scenario needs a [[lab.sites]] with devices")
    site = plan.sites[0]
    snapshot = plan.snapshot
    owner = {device.id: entry for entry in snapshot.accounts.values() for device in entry.account.devices}
    enterprise = next((d for d in site.devices if owner[d].dedicated_active), None)
    free = next((d for d in site.devices if not owner[d].account.locations), None)
    if enterprise is None:
        raise LabError(f"site {site.name} has no device of an account with active dedicated egress")
    entry = owner[enterprise]
    account = entry.account.id
    connected = site.pop
    locations = entry.active_locations
    primary = _primary(lab, connected, locations)
    secondary = _primary(lab, connected, tuple(loc for loc in locations if loc is not primary))
    shared = {str(a) for a in snapshot.data_centers[connected].shared_ipv4}
    geofeed = GeofeedIndex.from_text((lab.directory / "geofeed.csv").read_text(encoding="utf-8"))
    home_city = {loc.id: snapshot.data_centers[loc.home_pop].city for loc in locations}
    connected_city = snapshot.data_centers[connected].city
    device = Device(lab, f"s-{site.name}", enterprise, site.devices[enterprise], connected)
    echo = next(o for o in plan.origins if o.kind == "echo" and o.namespace_role == INTERNET)
    cdn = next((o for o in plan.origins if o.kind == "in-network"), None)
    sites_by_role = {f"p-{p.name}": p for p in plan.private_sites}
    privates = [(o, sites_by_role[o.namespace_role]) for o in plan.origins if o.namespace_role in sites_by_role]
    result = Result()

    def http_row(case: str, origin: Origin, family: int, check: Callable[[Row], bool], expected: str,
                 probe: Device = device) -> Row:
        address = origin.ipv4 if family == 4 else origin.ipv6
        assert address is not None
        row = Row(case, f"{origin.name} {address}", family, connected, expected=expected)
        _fill(row, lab, origin, probe.http(_url(address)), geofeed)
        row.ok = row.note == "" and check(row)
        result.rows.append(row)
        return row

    def subrange_of(location: DedicatedLocation, source: str) -> bool:
        if location.ipv6 is None:
            return False
        from egressd.decide import ipv6_subrange
        try:
            return ipaddress.ip_address(source.split()[0]) in ipv6_subrange(location.ipv6, snapshot.data_centers[connected].slot)
        except ValueError:
            return False

    http_row("ordinary site, IPv4 (R6, R7)", echo, 4,
             lambda r: r.egress_pop == primary.home_pop and r.source == str(primary.ipv4)
             and r.geolocation == home_city[primary.id],
             f"leaves {primary.home_pop} from {primary.ipv4}, {home_city[primary.id]}")
    if cdn is not None:
        http_row("in-network site, IPv4 (R8)", cdn, 4,
                 lambda r: r.egress_pop == connected and r.source.startswith(f"{primary.ipv4} (PROXY v2; packets from ")
                 and r.source.split("from ")[1].rstrip(")") in shared,
                 f"leaves {connected}, PROXY v2 source {primary.ipv4}")
    if echo.ipv6 is not None and primary.ipv6 is not None:
        http_row("ordinary site, IPv6 (R9)", echo, 6,
                 lambda r: r.egress_pop == connected and subrange_of(primary, r.source)
                 and r.geolocation == home_city[primary.id],
                 f"leaves {connected} from {primary.ipv6}'s {connected} sub-range, {home_city[primary.id]}")
    if cdn is not None and cdn.ipv6 is not None and primary.ipv6 is not None:
        http_row("in-network site, IPv6 (R9)", cdn, 6,
                 lambda r: r.egress_pop == connected and subrange_of(primary, r.source)
                 and r.geolocation == home_city[primary.id],
                 f"leaves {connected} from {primary.ipv6}'s {connected} sub-range, {home_city[primary.id]}")
    result.rows.append(_device_dns_row(lab, device, echo, connected, shared, geofeed))
    result.rows.append(_dns_row(lab, device, echo, connected, shared, geofeed))
    dedicated = {str(loc.ipv4) for loc in locations}
    for private, private_site in privates:
        if private_site.kind == "wan":
            http_row("private origin over a WAN route (R4)", private, 4,
                     lambda r: r.source in shared and r.egress_pop == connected,
                     f"a {connected} shared address, never a dedicated one")
        else:
            office = {str(a.network_address) for a in plan.namespaces[private.namespace_role].loopback}
            office |= {str(link.a_v4) for link in plan.links if link.a_role == private.namespace_role}

            def from_the_connector(row: Row, office: set[str] = office,
                                   via: str = f"connector {private_site.connector}") -> bool:
                return row.source in office and row.source not in dedicated | shared and row.egress_pop == via

            http_row("private origin behind a tunnel connector (R4)", private, 4, from_the_connector,
                     f"the connector's own address ({private_site.connector}), never a dedicated one")
    if free is not None:
        free_device = Device(lab, f"s-{site.name}", free, site.devices[free], connected)
        http_row(f"free account {owner[free].account.id} (R1)", echo, 4,
                 lambda r: r.source in shared and r.egress_pop == connected and r.geolocation == connected_city,
                 f"a {connected} shared address", probe=free_device)
        for private, private_site in privates:
            kind = "WAN" if private_site.kind == "wan" else "connector"
            row = Row(f"{account}'s {private_site.name} ({kind}), as {owner[free].account.id} (R13)",
                      f"{private.name} {private.ipv4}", 4, connected, expected="refused by the PoP")
            answer = free_device.http(_url(private.ipv4))
            if answer.get("ok"):
                _fill(row, lab, private, answer, geofeed)
            row.note = f"HTTP {answer.get('status')}: {str(answer.get('error', ''))[:120]}"
            row.ok = answer.get("status") == 403
            result.rows.append(row)
    before = lab.api("GET", f"/v1/accounts/{account}/settings/network")
    try:
        for setting in (False, True):
            set_network(lab, account, {"proxy_udp": setting})
            row = Row(f"UDP, proxy.udp {'on' if setting else 'off'} (R3)", f"{echo.name} {echo.ipv4}:{ECHO_UDP_PORT}",
                      4, connected)
            _fill(row, lab, echo, device.udp(str(echo.ipv4), ECHO_UDP_PORT), geofeed)
            if setting:
                row.expected = f"leaves {primary.home_pop} from {primary.ipv4}"
                row.ok = row.egress_pop == primary.home_pop and row.source == str(primary.ipv4)
            else:
                row.expected = f"a {connected} shared address"
                row.ok = row.egress_pop == connected and row.source in shared
            row.ok = row.ok and row.note == ""
            result.rows.append(row)
    finally:
        set_network(lab, account, {"proxy_udp": bool(before["proxy_udp"])})
    result.rows.append(_failover_row(lab, device, echo, connected, primary, secondary, geofeed))
    return result


def _device_dns_row(lab: Lab, device: Device, echo: Origin, connected: str, shared: set[str],
                    geofeed: GeofeedIndex) -> Row:
    """The device asks its PoP's resolver (port 53) for a fresh name: the upstream's log
    says which address the PoP asked from (R4), and the device gets the zone's answer."""
    name = f"d{secrets.token_hex(4)}.{echo.name}.{lab.plan.zone}"
    row = Row("DNS query by the device to its PoP (R4)", name, 4, connected,
              expected=f"answered {echo.ipv4}; asked upstream from a {connected} shared address")
    answer = device.dns(name, "A")
    if answer.get("answer") != [str(echo.ipv4)]:
        row.note = str(answer.get("error") or f"answer {answer.get('rcode')} {answer.get('answer')}")[:160]
    return _upstream_saw(lab, row, name, shared, geofeed)


def _dns_row(lab: Lab, device: Device, echo: Origin, connected: str, shared: set[str],
             geofeed: GeofeedIndex) -> Row:
    """A name only this row asks for: the lab DNS server's log says who asked for it (R4)."""
    name = f"r{secrets.token_hex(4)}.{echo.name}.{lab.plan.zone}"
    row = Row("name of a proxied flow, resolved by the PoP (R4)", name, 4, connected,
              expected=f"asked from a {connected} shared address")
    answer = device.http(f"http://{name}:{ECHO_HTTP_PORT}/")
    if not answer.get("ok"):
        row.note = str(answer.get("error", "failed"))[:160]
    return _upstream_saw(lab, row, name, shared, geofeed)


def _upstream_saw(lab: Lab, row: Row, name: str, shared: set[str], geofeed: GeofeedIndex) -> Row:
    sources, links = [], []
    try:
        for line in lab.dns_log.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if entry.get("name", "").rstrip(".") == name:
                sources.append(entry["source"])
                links.append(entry.get("link") or "?")
    except (OSError, json.JSONDecodeError) as exc:
        row.note = f"cannot read the DNS log: {exc}"
    if sources:
        row.source = ", ".join(sorted(set(sources)))
        row.egress_pop = ", ".join(sorted(set(links)))
        row.geolocation = _city(geofeed, sources[0])
    row.ok = bool(sources) and set(sources) <= shared and set(links) == {row.connected} and not row.note
    return row


def _failover_row(lab: Lab, device: Device, echo: Origin, connected: str, primary: DedicatedLocation,
                  secondary: DedicatedLocation, geofeed: GeofeedIndex) -> Row:
    """Stop the primary's PoP (SIGKILL, like a crash); new flows must leave the secondary within 3 s."""
    row = Row(f"failover: {primary.home_pop} stopped (R11)", f"{echo.name} {echo.ipv4}", 4, connected,
              expected=f"leaves {secondary.home_pop} from {secondary.ipv4} within {FAILOVER_WITHIN:g} s")
    netns.kill_all(lab.pop_pids(primary.home_pop), grace=0.0)
    stopped = time.monotonic()
    try:
        started = stopped
        while time.monotonic() - stopped < FAILOVER_WITHIN + 5:
            started = time.monotonic()  # the flow that counts is a new one, started after the stop
            answer = device.http(_url(echo.ipv4))
            row.note = ""
            _fill(row, lab, echo, answer, geofeed)
            if row.source == str(secondary.ipv4):
                break
            time.sleep(0.1)
        elapsed = started - stopped
        row.ok = row.source == str(secondary.ipv4) and row.egress_pop == secondary.home_pop and elapsed <= FAILOVER_WITHIN
        problem = f"; last error: {row.note}" if row.note else ""
        row.note = f"first flow via {secondary.home_pop} started {elapsed:.1f} s after the stop{problem}"
    finally:
        start_pop(lab, primary.home_pop)
        wait_backbone(lab, time.monotonic() + 20)
    return row
