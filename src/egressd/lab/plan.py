"""The lab's plan: namespaces, links, addresses and routes, computed from a topology file.

Pure: `plan_lab` reads the topology (a deployment file plus a `[lab]` table) and returns
everything `egressd lab up` will create, so the address plan is testable without root and
`lab status` can show it. The deployment part is the same file the PoPs load; the lab
derives the network from it — each PoP's shared and dedicated addresses routed to it, each
dedicated IPv6 range's per-PoP sub-range (R9) routed to that PoP — so the lab cannot drift
from the configuration it demonstrates.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egressd.decide import ipv6_subrange
from egressd.model.addresses import IPAddress, IPNetwork
from egressd.model.deployment import DeploymentError, load_deployment
from egressd.model.snapshot import Snapshot
from egressd.model.topology import DataCenter, great_circle_km

FIBRE_KM_PER_MS = 200.0  # light in fibre: about two thirds of c
DEFAULT_STRETCH = 1.5  # fibre routes are longer than the great circle
LINK_POOL_V4 = ipaddress.IPv4Network("198.51.100.128/26")  # /30 per link
LINK_POOL_V6 = ipaddress.IPv6Network("2001:db8:ff00::/40")  # /64 per link
INTERNET = "inet"
_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")


class LabError(ValueError):
    """A topology the lab cannot build, said plainly."""


@dataclass(frozen=True, slots=True)
class Origin:
    """A server of the lab: where it runs and what it is."""

    name: str  # also its DNS name under the lab zone
    kind: str  # "echo" | "in-network" | "dns"
    namespace_role: str  # INTERNET or a private site's role
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address | None


@dataclass(frozen=True, slots=True)
class Site:
    """Where devices sit: attached to one PoP over a link of their own."""

    name: str
    pop: str
    latitude: float
    longitude: float
    devices: Mapping[str, str]  # device id -> secret (lab fixtures, never printed)


@dataclass(frozen=True, slots=True)
class PrivateSite:
    """A private network (R4): `wan`, reached only over one PoP's WAN link; or `connector`,
    on the Internet taking no inbound connections, whose tunnel connector dials out."""

    name: str
    kind: str  # "wan" | "connector"
    pop: str | None  # the PoP of a WAN site
    network: ipaddress.IPv4Network
    connector: str | None = None
    token: str | None = field(default=None, repr=False)  # a lab fixture, never printed


@dataclass(frozen=True, slots=True)
class Link:
    """A point-to-point link; `delay_ms` one way (0: a plain veth pair)."""

    a_role: str
    a_name: str  # interface name in a's namespace
    b_role: str
    b_name: str
    v4: ipaddress.IPv4Network
    v6: ipaddress.IPv6Network
    delay_ms: float

    @property
    def a_v4(self) -> ipaddress.IPv4Address:
        return self.v4.network_address + 1

    @property
    def b_v4(self) -> ipaddress.IPv4Address:
        return self.v4.network_address + 2

    @property
    def a_v6(self) -> ipaddress.IPv6Address:
        return self.v6.network_address + 1

    @property
    def b_v6(self) -> ipaddress.IPv6Address:
        return self.v6.network_address + 2


@dataclass(frozen=True, slots=True)
class Route:
    """`destination` reached through `interface`, via the far end `gateway`; or local."""

    destination: IPNetwork
    interface: str
    gateway: IPAddress | None = None
    local: bool = False


@dataclass(slots=True)
class Namespace:
    role: str
    loopback: list[IPNetwork] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LabPlan:
    deployment_text: str
    snapshot: Snapshot
    zone: str
    stretch: float
    namespaces: Mapping[str, Namespace]
    links: tuple[Link, ...]
    origins: tuple[Origin, ...]
    sites: tuple[Site, ...]
    private_sites: tuple[PrivateSite, ...]
    proxy_port: int
    https_port: int
    backbone_port: int
    dns_port: int
    tunnel_port: int
    control: ipaddress.IPv4Address  # the control plane, in the Internet namespace
    control_port: int = 18070
    device_port: int = 8444  # each PoP's device link (egressd client)

    @property
    def control_url(self) -> str:
        return f"http://{self.control}:{self.control_port}"

    def pop_address(self, pop: str) -> IPAddress:
        """Where devices and peers reach `pop`: its backbone address."""
        address = self.snapshot.data_centers[pop].backbone_address
        assert address is not None
        return address

    def hostname(self, origin: str) -> str:
        return f"{origin}.{self.zone}"

    def zone_records(self) -> dict[str, list[IPAddress]]:
        """The lab DNS zone: every origin and PoP by name, both families."""
        records: dict[str, list[IPAddress]] = {}
        for origin in self.origins:
            addresses: list[IPAddress] = [origin.ipv4] + ([origin.ipv6] if origin.ipv6 else [])
            records[self.hostname(origin.name)] = addresses
            records[f"*.{self.hostname(origin.name)}"] = addresses  # fresh names, never cached
        for code in self.snapshot.data_centers:
            records[f"{code}.pop.{self.zone}"] = [self.pop_address(code)]
        return records


def one_way_delay_ms(a: DataCenter | tuple[float, float], b: DataCenter | tuple[float, float],
                     stretch: float) -> float:
    """Fibre delay over the great circle times the stretch, rounded to 0.1 ms."""
    def as_dc(point: DataCenter | tuple[float, float]) -> DataCenter:
        if isinstance(point, DataCenter):
            return point
        return DataCenter("", "", "", "", point[0], point[1], (), None, None, 0)
    km = great_circle_km(as_dc(a), as_dc(b))
    return round(km * stretch / FIBRE_KM_PER_MS, 1)


def read_topology(path: Path) -> LabPlan:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LabError(f"{path}: {exc.strerror}") from None
    return plan_lab(text, source=str(path))


def plan_lab(text: str, *, source: str = "<topology>") -> LabPlan:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LabError(f"{source}: {exc}") from None
    lab = raw.pop("lab", None)
    if not isinstance(lab, dict):
        raise LabError(f"{source}: a [lab] table is needed (see docs/lab.md)")
    deployment_text = _without_lab_table(text)
    try:
        snapshot = load_deployment(deployment_text)
    except DeploymentError as exc:
        raise LabError(f"{source}: the deployment part is invalid:\n{exc}") from None
    return _plan(lab, snapshot, deployment_text, source)


def _without_lab_table(text: str) -> str:
    """The deployment file the PoPs load: the topology with its [lab] tables blanked out
    (not removed, so that line numbers in errors still point into the topology file)."""
    kept: list[str] = []
    in_lab = False
    for line in text.splitlines():
        header = line.strip()
        if header.startswith("["):
            name = header.strip("[]").strip()
            in_lab = name == "lab" or name.startswith("lab.")
        kept.append("" if in_lab else line)
    return "\n".join(kept) + "\n"


def _number(table: Mapping[str, Any], key: str, default: float, source: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise LabError(f"{source}: lab.{key} must be a number ≥ 0, not {value!r}")
    return float(value)


def _plan(lab: Mapping[str, Any], snapshot: Snapshot, deployment_text: str, source: str) -> LabPlan:
    stretch = _number(lab, "stretch", DEFAULT_STRETCH, source)
    zone = str(lab.get("zone", "lab.egressd.test")).strip(".").lower()
    namespaces: dict[str, Namespace] = {INTERNET: Namespace(INTERNET)}
    for code, dc in snapshot.data_centers.items():
        if not _NAME.match(code):
            raise LabError(f"{source}: PoP code {code!r}: the lab needs 1-8 lowercase letters/digits")
        if dc.backbone_address is None or dc.backbone_address.version != 4:
            raise LabError(f"{source}: PoP {code} needs an IPv4 `backbone` address in the lab "
                           "(devices and peers reach it there)")
        namespaces[code] = Namespace(code)

    control = _control(lab, snapshot, source)
    sites = tuple(_sites(lab, snapshot, source))
    private_sites = tuple(_private_sites(lab, snapshot, source))
    origins = tuple(_origins(lab, private_sites, source))
    for role in [f"s-{s.name}" for s in sites] + [f"p-{p.name}" for p in private_sites]:
        namespaces[role] = Namespace(role)

    links = list(_links(snapshot, sites, private_sites, stretch))
    _addresses_and_routes(namespaces, links, snapshot, origins, private_sites)
    namespaces[INTERNET].loopback.append(ipaddress.ip_network(control))
    for link in links:  # a site reaches the control plane (enrolment, its account) directly
        if link.a_role == INTERNET and link.b_role.startswith("s-"):
            namespaces[link.b_role].routes.append(Route(ipaddress.ip_network(control), "inet", link.a_v4))
    return LabPlan(
        deployment_text=deployment_text, snapshot=snapshot, zone=zone, stretch=stretch,
        namespaces=namespaces, links=tuple(links), origins=origins, sites=sites,
        private_sites=private_sites,
        proxy_port=int(_number(lab, "proxy_port", 8080, source)),
        https_port=int(_number(lab, "https_port", 8443, source)),
        backbone_port=int(_number(lab, "backbone_port", 7443, source)),
        dns_port=53, tunnel_port=int(_number(lab, "tunnel_port", 7444, source)), control=control)


def _control(lab: Mapping[str, Any], snapshot: Snapshot, source: str) -> ipaddress.IPv4Address:
    """The control plane's address: [lab] control, else the deployment's first single
    control address. It must be one of `control_addresses`, which the PoPs refuse (R13)."""
    protected = snapshot.settings.control_addresses
    text = lab.get("control")
    if text is None:
        hosts = [net.network_address for net in protected if net.version == 4 and net.num_addresses == 1]
        if not hosts:
            raise LabError(f"{source}: give [lab] control = \"IPv4\" and list it in [deployment] control_addresses")
        return ipaddress.IPv4Address(hosts[0])
    try:
        address = ipaddress.IPv4Address(str(text))
    except ValueError as exc:
        raise LabError(f"{source}: lab.control: {exc}") from None
    if not any(address in net for net in protected):
        raise LabError(f"{source}: lab.control {address} must be in [deployment] control_addresses "
                       "(the PoPs must refuse to reach it, R13)")
    return address


def _sites(lab: Mapping[str, Any], snapshot: Snapshot, source: str) -> Iterator[Site]:
    for entry in lab.get("sites", []):
        name, pop = str(entry.get("name", "")), str(entry.get("pop", ""))
        if not _NAME.match(name):
            raise LabError(f"{source}: lab.sites name {name!r}: 1-8 lowercase letters/digits")
        dc = snapshot.data_centers.get(pop)
        if dc is None:
            raise LabError(f"{source}: lab site {name}: unknown PoP {pop!r}")
        devices = entry.get("devices", {})
        known = {device.id for e in snapshot.accounts.values() for device in e.account.devices}
        for device in devices:
            if device not in known:
                raise LabError(f"{source}: lab site {name}: device {device!r} is not in the deployment")
        yield Site(name, pop, float(entry.get("latitude", dc.latitude)),
                   float(entry.get("longitude", dc.longitude)),
                   {str(k): str(v) for k, v in devices.items()})


def _private_sites(lab: Mapping[str, Any], snapshot: Snapshot, source: str) -> Iterator[PrivateSite]:
    for entry in lab.get("private_sites", []):
        name, kind = str(entry.get("name", "")), str(entry.get("kind", "wan"))
        if not _NAME.match(name):
            raise LabError(f"{source}: lab.private_sites name {name!r}: 1-8 lowercase letters/digits")
        try:
            network = ipaddress.IPv4Network(str(entry.get("network")))
        except ValueError as exc:
            raise LabError(f"{source}: private site {name}: network: {exc}") from None
        if kind == "wan":
            pop = str(entry.get("pop", ""))
            if pop not in snapshot.data_centers:
                raise LabError(f"{source}: private site {name}: unknown PoP {pop!r}")
            yield PrivateSite(name, kind, pop, network)
        elif kind == "connector":
            connector, token = entry.get("connector"), entry.get("token")
            if not isinstance(connector, str) or connector not in snapshot.connectors:
                raise LabError(f"{source}: private site {name}: connector {connector!r} is not in the deployment")
            if not isinstance(token, str):
                raise LabError(f"{source}: private site {name}: its connector needs a token")
            yield PrivateSite(name, kind, None, network, connector, token)
        else:
            raise LabError(f"{source}: private site {name}: kind must be wan or connector")


def _origins(lab: Mapping[str, Any], private_sites: tuple[PrivateSite, ...], source: str) -> Iterator[Origin]:
    roles = {p.name: f"p-{p.name}" for p in private_sites}
    for entry in lab.get("origins", []):
        name, kind = str(entry.get("name", "")), str(entry.get("kind", "echo"))
        if kind not in ("echo", "in-network", "dns"):
            raise LabError(f"{source}: origin {name}: kind must be echo, in-network or dns")
        site = entry.get("site")
        if site is not None and site not in roles:
            raise LabError(f"{source}: origin {name}: unknown private site {site!r}")
        try:
            ipv4 = ipaddress.IPv4Address(str(entry.get("ipv4")))
            ipv6 = ipaddress.IPv6Address(str(entry["ipv6"])) if "ipv6" in entry else None
        except ValueError as exc:
            raise LabError(f"{source}: origin {name}: {exc}") from None
        yield Origin(name, kind, roles[site] if site else INTERNET, ipv4, ipv6)


def _links(snapshot: Snapshot, sites: tuple[Site, ...], private_sites: tuple[PrivateSite, ...],
           stretch: float) -> Iterator[Link]:
    v4_pool = LINK_POOL_V4.subnets(new_prefix=30)
    v6_pool = LINK_POOL_V6.subnets(new_prefix=64)

    def link(a: str, a_name: str, b: str, b_name: str, delay: float) -> Link:
        try:
            return Link(a, a_name, b, b_name, next(v4_pool), next(v6_pool), delay)
        except StopIteration:
            raise LabError(f"too many links for the lab's address pool {LINK_POOL_V4}") from None

    codes = list(snapshot.data_centers)
    for code in codes:  # the Internet is near every PoP: plain veth
        yield link(INTERNET, code, code, "inet", 0.0)
    for i, a in enumerate(codes):
        for b in codes[i + 1:]:
            delay = one_way_delay_ms(snapshot.data_centers[a], snapshot.data_centers[b], stretch)
            yield link(a, f"bb-{b}", b, f"bb-{a}", delay)
    for site in sites:
        dc = snapshot.data_centers[site.pop]
        delay = one_way_delay_ms(dc, (site.latitude, site.longitude), stretch)
        yield link(f"s-{site.name}", "pop", site.pop, f"s-{site.name}", delay)
        yield link(INTERNET, f"s-{site.name}", f"s-{site.name}", "inet", 0.0)  # to the control plane only
    for private in private_sites:
        if private.pop is not None:
            yield link(f"p-{private.name}", "wan", private.pop, f"wan-{private.name}", 0.0)
        else:  # an office on the Internet
            yield link(f"p-{private.name}", "inet", INTERNET, f"p-{private.name}", 0.0)


def _addresses_and_routes(namespaces: dict[str, Namespace], links: list[Link], snapshot: Snapshot,
                          origins: tuple[Origin, ...], private_sites: tuple[PrivateSite, ...]) -> None:
    def host(address: IPAddress) -> IPNetwork:
        return ipaddress.ip_network(address)

    inet = namespaces[INTERNET]
    for origin in origins:
        ns = namespaces[origin.namespace_role]
        ns.loopback.append(host(origin.ipv4))
        if origin.ipv6 is not None:
            ns.loopback.append(host(origin.ipv6))

    by_end = {(link.a_role, link.b_role): link for link in links}
    locations = [loc for entry in snapshot.accounts.values() for loc in entry.account.locations]
    for code, dc in snapshot.data_centers.items():
        ns = namespaces[code]
        uplink = by_end[(INTERNET, code)]
        owned: list[IPNetwork] = [host(a) for a in dc.shared_ipv4]
        owned += [host(loc.ipv4) for loc in locations if loc.home_pop == code]
        assert dc.backbone_address is not None
        ns.loopback += [*owned, host(dc.backbone_address)]
        v6_local: list[IPNetwork] = [dc.shared_ipv6] if dc.shared_ipv6 is not None else []
        v6_local += [ipv6_subrange(loc.ipv6, dc.slot) for loc in locations if loc.ipv6 is not None]
        ns.routes += [Route(net, "lo", local=True) for net in v6_local]
        ns.routes += [Route(ipaddress.ip_network("0.0.0.0/0"), "inet", uplink.a_v4),
                      Route(ipaddress.ip_network("::/0"), "inet", uplink.a_v6)]
        # the Internet side routes every address this PoP sends from back to it (R9 sub-ranges too)
        inet.routes += [Route(net, code, uplink.b_v4 if net.version == 4 else uplink.b_v6)
                        for net in [*owned, *v6_local]]
        # its service address, for what dials in from the Internet side (tunnel connectors)
        inet.routes.append(Route(host(dc.backbone_address), code, uplink.b_v4))
    for link in links:
        if link.a_role in snapshot.data_centers and link.b_role in snapshot.data_centers:
            a_dc, b_dc = snapshot.data_centers[link.a_role], snapshot.data_centers[link.b_role]
            assert a_dc.backbone_address is not None and b_dc.backbone_address is not None
            namespaces[link.a_role].routes.append(Route(host(b_dc.backbone_address), link.a_name, link.b_v4))
            namespaces[link.b_role].routes.append(Route(host(a_dc.backbone_address), link.b_name, link.a_v4))
        elif link.a_role.startswith("s-"):
            namespaces[link.a_role].routes += [Route(ipaddress.ip_network("0.0.0.0/0"), "pop", link.b_v4),
                                               Route(ipaddress.ip_network("::/0"), "pop", link.b_v6)]
    for private in private_sites:
        if private.pop is None:  # its default route is the Internet; nothing routes to it
            uplink = by_end[(f"p-{private.name}", INTERNET)]
            namespaces[f"p-{private.name}"].routes.append(
                Route(ipaddress.ip_network("0.0.0.0/0"), "inet", uplink.b_v4))
            continue
        wan = by_end[(f"p-{private.name}", private.pop)]
        namespaces[f"p-{private.name}"].routes += [
            Route(ipaddress.ip_network("0.0.0.0/0"), "wan", wan.b_v4)]
        namespaces[private.pop].routes.append(Route(private.network, f"wan-{private.name}", wan.a_v4))
