"""`egressd serve`: the whole gateway in one process, for a first look and for tests.

Three PoPs modelled on the seed's example (las, lax, jfk) on loopback addresses, an echo
origin, an enterprise account `acme` with dedicated egress in lax and jfk, a free account
`globex`. PoP-to-PoP hand-off is in-process, through the same `Backbone` interface the
mTLS backbone implements, delayed by the simulated RTT between the cities.

The configuration lives in the control plane, on SQLite in the state directory, served on
loopback: each PoP follows it through the same long poll and last-good disk copy as
`egressd pop --control`, so a change through the API (or `egressd settings network ...`)
is in force within 2 seconds. The embedded deployment seeds an empty store only; later
starts keep what was changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from egressd.control.app import ControlSettings, create_app
from egressd.control.auth import hash_token
from egressd.control.bootstrap import ensure_admin_token, import_deployment, is_empty, issue_token
from egressd.control.db import make_engine, migrate, sessions
from egressd.control.server import ControlServer
from egressd.control.tables import ApiTokenRow
from egressd.decide import HealthView
from egressd.echo.server import EchoServer
from egressd.model.snapshot import Snapshot
from egressd.model.topology import great_circle_km
from egressd.pki import ensure_ca, ensure_server_cert
from egressd.pop.control_link import ControlWatcher
from egressd.pop.device_link import DeviceLinkServer, device_tls_context
from egressd.pop.flow_shipper import FlowShipper
from egressd.pop.flowlog import FlowLog
from egressd.pop.health_report import HealthReporter
from egressd.pop.identity import hash_secret
from egressd.pop.listeners import ListenerSpec
from egressd.pop.metrics import PopMetrics
from egressd.pop.resolver import Resolver
from egressd.pop.runtime import InProcessBackbone, PopOptions, PopRuntime, StateHolder
from egressd.pop.server import PopServer, drain_all, server_tls_context
from egressd.pop.tunnel_link import TunnelServer

FIBRE_KM_PER_MS = 200.0  # light in fibre, one way
ROUTE_STRETCH = 1.5  # fibre paths are longer than great circles
ECHO_HOST = "127.0.9.1"
ECHO_NAME = "echo.egressd.test"
DEVICES = {"acme": "acme-laptop", "globex": "globex-laptop"}
POP_CODES = ("las", "lax", "jfk")


def rtt_matrix(snapshot: Snapshot) -> dict[tuple[str, str], float]:
    """Simulated backbone RTTs in ms from the great-circle distance between PoPs."""
    dcs = list(snapshot.data_centers.values())
    return {
        (a.code, b.code): round(2 * great_circle_km(a, b) * ROUTE_STRETCH / FIBRE_KM_PER_MS, 2)
        for a in dcs for b in dcs if a.code != b.code
    }


@dataclass
class ServeSettings:
    state_dir: Path = Path(".egressd")
    host: str = "127.0.0.1"
    port_base: int = 18080  # 0: every port ephemeral
    acme_proxy_udp: bool = True  # when the store is first seeded
    options: PopOptions = field(default_factory=PopOptions)


def _port(base: int, offset: int) -> int:
    return base + offset if base else 0


def _secrets(path: Path) -> tuple[dict[str, str], bool]:
    """Device secrets of the demo accounts, created once and kept (mode 0600); and whether
    they were created just now."""
    with contextlib.suppress(OSError, ValueError):
        stored = json.loads(path.read_text())
        if isinstance(stored, dict) and all(isinstance(stored.get(a), str) for a in DEVICES):
            return {account: stored[account] for account in DEVICES}, False
    created = {account: secrets.token_urlsafe(18) for account in DEVICES}
    _write_private(path, json.dumps(created))
    return created, True


def _read_token(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text().strip()
    return ""


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds device secrets)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def embedded_deployment(device_secrets: dict[str, str], *, acme_proxy_udp: bool) -> str:
    template = importlib.resources.files("egressd").joinpath("data/serve.toml").read_text()
    return template.format(
        acme_proxy_udp="true" if acme_proxy_udp else "false",
        acme_secret_sha256=hash_secret(device_secrets["acme"]),
        globex_secret_sha256=hash_secret(device_secrets["globex"]),
    )


class ServeStack:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.echo = EchoServer()
        self.pops: dict[str, PopServer] = {}
        self.device_links: dict[str, DeviceLinkServer] = {}
        self.tunnel_servers: dict[str, TunnelServer] = {}
        self.backbone = InProcessBackbone()
        self.flowlog: FlowLog | None = None
        self.info: dict[str, Any] = {}
        self.control: ControlServer | None = None
        self.watchers: list[ControlWatcher] = []
        self.shipper: FlowShipper | None = None
        self.reporter: HealthReporter | None = None

    def _open_store(self, device_secrets: dict[str, str], fresh_secrets: bool) -> tuple[str, str]:
        """The control plane's SQLite store: seeded from the embedded deployment when new
        (or when the device secrets were just made), with an admin and a PoP token."""
        state = self.settings.state_dir
        url = f"sqlite:///{(state / 'control.db').resolve()}"
        engine = make_engine(url)
        try:
            migrate(engine)
            if fresh_secrets or is_empty(engine):
                text = embedded_deployment(device_secrets,
                                           acme_proxy_udp=self.settings.acme_proxy_udp)
                import_deployment(engine, text, replace=True, source="egressd serve")
            ensure_admin_token(engine, state / "admin.token")
            pop_token = _read_token(state / "pop.token")
            with sessions(engine)() as session:
                known = pop_token and session.scalar(
                    select(ApiTokenRow.id).where(ApiTokenRow.token_sha256 == hash_token(pop_token)))
            if not known:
                pop_token = issue_token(engine, name="serve-pops", scope="pop", account_id=None)
                _write_private(state / "pop.token", pop_token + "\n")
        finally:
            engine.dispose()
        return url, pop_token

    async def start(self) -> dict[str, Any]:
        settings = self.settings
        state = settings.state_dir
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        device_secrets, fresh = _secrets(state / "secrets.json")
        store_url, pop_token = await asyncio.to_thread(self._open_store, device_secrets, fresh)
        self.control = ControlServer(create_app(ControlSettings(database_url=store_url,
                                                                replica="serve")),
                                     host="127.0.0.1", port=_port(settings.port_base, 5))
        try:
            await self.control.start()
            watchers = [ControlWatcher(self.control.url, code, pop_token, state / "pops" / code,
                                       wait=25, backoff=(0.05, 2.0)) for code in POP_CODES]
            self.watchers = watchers
            firsts = await asyncio.gather(*(w.first_snapshot(max_wait=30) for w in watchers))
        except BaseException:
            await self.close()
            raise
        snapshot = firsts[0]
        matrix = rtt_matrix(snapshot)
        self.backbone.rtt_ms = matrix
        view = HealthView(up=frozenset(snapshot.data_centers), rtt_ms=matrix)
        ca = ensure_ca(state / "pki", "egressd serve CA")
        pop_cert = ensure_server_cert(state / "pki", "pop", ["localhost"], [settings.host], ca)
        echo_cert = ensure_server_cert(state / "pki", "echo", [ECHO_NAME], [ECHO_HOST], ca)
        try:
            await self.echo.start(ECHO_HOST, http_port=_port(settings.port_base, 0),
                                  udp_port=_port(settings.port_base, 0),
                                  h3_port=_port(settings.port_base, 1),
                                  certfile=str(echo_cert.cert_path), keyfile=str(echo_cert.key_path))
            self.flowlog = FlowLog.to_path(str(state / "flows.jsonl"))
            assert self.control is not None
            self.shipper = FlowShipper(self.control.url, pop_token, interval=0.2)
            self.flowlog.sinks.append(self.shipper)  # the dashboard's live tail
            self.shipper.start()
            metrics = PopMetrics()
            resolver = Resolver(static={ECHO_NAME: [ipaddress.ip_address(ECHO_HOST)]})
            tls = server_tls_context(pop_cert.cert_path, pop_cert.key_path)
            device_tls = device_tls_context(pop_cert.cert_path, pop_cert.key_path)
            holders: dict[str, StateHolder] = {}
            for index, (code, watcher, first) in enumerate(zip(POP_CODES, self.watchers, firsts,
                                                                 strict=True), start=1):
                holder = holders[code] = StateHolder(first, view)
                watcher.metrics = metrics
                runtime = PopRuntime(code, holder, self.backbone.link(code), resolver,
                                     settings.options, self.flowlog, metrics)
                self.backbone.pops[code] = runtime
                specs = [ListenerSpec(settings.host, _port(settings.port_base, index * 10)),
                         ListenerSpec(settings.host, _port(settings.port_base, index * 10 + 1), tls=True)]
                server = PopServer(runtime, specs, tls_context=tls)
                await server.start()
                self.pops[code] = server
                link = DeviceLinkServer(runtime, device_tls, settings.host,
                                        _port(settings.port_base, index * 10 + 2))
                await link.start()
                self.device_links[code] = link
                tunnels = TunnelServer(runtime, device_tls, settings.host,
                                       _port(settings.port_base, index * 10 + 3))
                await tunnels.start()
                self.tunnel_servers[code] = tunnels
                watcher.start(holder)
        except BaseException:
            await self.close()
            raise
        self.reporter = HealthReporter(
            self.control.url, pop_token, holders, interval=1.0,
            tunnels={code: server.report for code, server in self.tunnel_servers.items()})
        await self.reporter.report_once()  # the dashboard has RTTs from the start
        self.reporter.start()
        await self._confirmed(snapshot.version)
        self.info = self._describe(snapshot, device_secrets, str(ca.cert_path))
        assert self.control is not None
        self.info["control"] = {"url": self.control.url, "admin_token": str(state / "admin.token"),
                                "openapi": f"{self.control.url}/openapi.json",
                                "geofeed": f"{self.control.url}/geofeed.csv"}
        for account_id, device in DEVICES.items():
            # curl reads the credentials from here, so the guide never prints a secret.
            _write_private(state / f"{account_id}.curlrc",
                           f'proxy-user = "{device}:{device_secrets[account_id]}"\n')
            self.info["accounts"][account_id]["curlrc"] = str(state / f"{account_id}.curlrc")
        _write_private(state / "serve.json", json.dumps(self.info, indent=2))
        return self.info

    async def _confirmed(self, version: int, seconds: float = 10.0) -> None:
        """Ready means every PoP has confirmed the version it runs to the control plane
        (its next long poll is parked there)."""
        assert self.control is not None
        publisher = self.control.app.state.ctx.publisher
        deadline = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < deadline:
            rows = await asyncio.to_thread(publisher.pop_statuses)
            if {row.pop for row in rows if row.version >= version} >= set(POP_CODES):
                await asyncio.sleep(0.05)  # let the parked polls reach their wait
                return
            await asyncio.sleep(0.02)
        raise OSError("the PoPs did not confirm their configuration to the control plane")

    def _describe(self, snapshot: Snapshot, device_secrets: dict[str, str], ca_cert: str) -> dict[str, Any]:
        echo_port = self.echo.http_port
        pops: dict[str, Any] = {}
        for code, server in self.pops.items():
            dc = snapshot.data_centers[code]
            plain = server.listener(tls=False).address
            tls = server.listener(tls=True).address
            pops[code] = {
                "city": dc.city,
                "http_proxy": f"http://{plain[0]}:{plain[1]}",
                "https_proxy": f"https://{tls[0]}:{tls[1]}",
                "socks5": f"socks5://{plain[0]}:{plain[1]}",
                "device_link": self.device_links[code].url,
                "tunnel": "{}:{}".format(*self.tunnel_servers[code].address),
                "shared_ipv4": [str(address) for address in dc.shared_ipv4],
                "health": f"http://{plain[0]}:{plain[1]}/health",
            }
        accounts: dict[str, Any] = {}
        for account_id, device in DEVICES.items():
            entry = snapshot.accounts[account_id]
            accounts[account_id] = {
                "plan": entry.account.plan.value,
                "username": device,
                "password": device_secrets[account_id],
                "proxy_udp": entry.account.settings.proxy_udp,
            }
            if entry.locations:
                accounts[account_id]["dedicated"] = {
                    loc.home_pop: str(loc.ipv4) for loc in entry.locations.values()}
        return {
            "echo": {"http": f"http://{ECHO_HOST}:{echo_port}/", "name": f"http://{ECHO_NAME}:{echo_port}/",
                     "trace": f"http://{ECHO_HOST}:{echo_port}/trace",
                     "udp": f"{ECHO_HOST}:{self.echo.udp_port}", "h3": f"https://{ECHO_HOST}:{self.echo.h3_port}/"},
            "ca_cert": ca_cert,
            "flow_log": str(self.settings.state_dir / "flows.jsonl"),
            "backbone_rtt_ms": {f"{a}-{b}": rtt for (a, b), rtt in self.backbone.rtt_ms.items()},
            "pops": pops,
            "accounts": accounts,
        }

    async def drain(self, grace_seconds: float) -> None:
        for link in self.device_links.values():
            link.stop_accepting()
        await drain_all(list(self.pops.values()), grace_seconds)
        await self.close()

    async def close(self) -> None:
        if self.reporter is not None:
            await self.reporter.close()
            self.reporter = None
        if self.shipper is not None:
            await self.shipper.close()
            self.shipper = None
        for watcher in self.watchers:
            await watcher.close()
        self.watchers.clear()
        for server in self.pops.values():
            await server.close()
        self.pops.clear()
        for link in self.device_links.values():
            await link.close()
        self.device_links.clear()
        for tunnels in self.tunnel_servers.values():
            await tunnels.close()
        self.tunnel_servers.clear()
        if self.control is not None:
            await self.control.stop()
            self.control = None
        await self.echo.close()
        if self.flowlog is not None:
            self.flowlog.close()
            self.flowlog = None


def redacted(info: dict[str, Any]) -> dict[str, Any]:
    """serve.json without the device secrets, for printing: they stay in the 0600 files."""
    copy: dict[str, Any] = json.loads(json.dumps(info))
    for account in copy["accounts"].values():
        account["password"] = "***"  # noqa: S105 - a placeholder, not a secret
    return copy


def try_it(info: dict[str, Any]) -> list[str]:
    """The lines `egressd serve` prints for a new user. Credentials stay in the 0600 curlrc
    files (`-K`): the guide itself never prints a secret."""
    las = info["pops"]["las"]
    acme, globex = info["accounts"]["acme"], info["accounts"]["globex"]
    control = info["control"]
    plain = las["http_proxy"]
    echo = info["echo"]["name"]
    return [
        f"# acme (enterprise) through Las Vegas leaves from its Los Angeles address {acme['dedicated']['lax']}:",
        f"curl -K {acme['curlrc']} -x {plain} {echo}",
        f"# globex (free) leaves from a shared Las Vegas address ({', '.join(las['shared_ipv4'])}):",
        f"curl -K {globex['curlrc']} -x {plain} {echo}",
        "# the same through the HTTPS proxy, as a CONNECT tunnel, and over SOCKS5:",
        f"curl -K {acme['curlrc']} --proxy {las['https_proxy']} --proxy-cacert {info['ca_cert']} {echo}trace",
        f"curl -K {acme['curlrc']} -p -x {plain} {echo}trace",
        f"curl -K {acme['curlrc']} --socks5-hostname {plain.removeprefix('http://')} {echo}",
        f"# every flow, one JSON line each: tail -f {info['flow_log']}",
        f"# PoP health and metrics: curl {las['health']}   curl {plain}/metrics",
        f"# the dashboard: {control['url']}/ (sign in with the token in {control['admin_token']})",
        "# the device client (docs/client.md): enroll with a token from "
        f"`egressd device enroll acme alice --control {control['url']} --token-file "
        f"{control['admin_token']}`, then",
        f"#   egressd client enroll --control {control['url']} --token TOKEN --serve-json "
        f"{Path(info['flow_log']).parent / 'serve.json'}",
        "#   egressd client run    (proxy on 127.0.0.1:40000)    egressd verify --family 4",
        "# the control plane (API token in admin.token; every change is in force within 2 s):",
        f"egressd settings network acme --udp off --control {control['url']} "
        f"--token-file {control['admin_token']}",
        f"curl {control['geofeed']}   # and the API's OpenAPI: {control['openapi']}",
    ]
