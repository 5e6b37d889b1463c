"""`egressd pop`: run one PoP from a deployment file or fed by the control plane (R14),
optionally as several worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from egressd.cli.runner import SignalWaiter, hold_signals, run, settle_heap, setup_logging
from egressd.pop.admission import AdmissionLimits

if TYPE_CHECKING:
    from egressd.pop.control_link import ControlWatcher
    from egressd.pop.flow_shipper import FlowShipper
    from egressd.pop.flowlog import FlowLog
    from egressd.pop.health_report import HealthReporter
    from egressd.pop.metrics import PopMetrics
    from egressd.pop.runtime import StateHolder

log = logging.getLogger("egressd.pop")
TOKEN_ENV = "EGRESSD_POP_TOKEN"  # noqa: S105 - the name of the variable, not a secret


@dataclass(frozen=True)
class ControlSource:
    """Where a PoP fed by the control plane gets its snapshots (`--control`)."""

    url: str
    token: str
    state_dir: Path
    ca: Path | None
    first_wait: float

    def __repr__(self) -> str:  # never show the token
        return f"ControlSource(url={self.url!r}, state_dir={str(self.state_dir)!r})"


def register(app: typer.Typer) -> None:
    app.command("pop")(pop)


def _host_port(text: str, option: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise typer.BadParameter(f"expected HOST:PORT, got {text!r}", param_hint=option)
    return host.strip("[]") or "0.0.0.0", int(port)


def pop(
    deployment: Path | None = typer.Option(None, "--deployment", "-d", help="Deployment file (TOML), see docs/deployment-file.md. Or use --control."),
    code: str = typer.Option(..., "--pop", help="Which data center of the deployment this PoP is."),
    control: str | None = typer.Option(None, "--control", help="Control plane URL (http(s)://HOST:PORT): watch it for snapshots instead of reading -d FILE. Needs --state-dir and a token."),
    control_token_file: Path | None = typer.Option(None, "--control-token-file", help=f"File holding this PoP's control-plane token (else env {TOKEN_ENV})."),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="With --control: directory for the last good snapshot (snapshot.json, 0600), served at start when the control plane is down."),
    control_ca: Path | None = typer.Option(None, "--control-ca", help="With --control https://: CA bundle (PEM) to verify the control plane with, instead of the system's."),
    first_wait: float = typer.Option(120.0, "--first-snapshot-wait", min=1.0, help="With --control and no copy in --state-dir: seconds to wait for the first snapshot before giving up (exit 2)."),
    listen: list[str] = typer.Option(["127.0.0.1:8080"], "--listen", help="HOST:PORT for HTTP proxy + SOCKS5 (sniffed). Repeatable."),
    https_listen: list[str] = typer.Option([], "--https-listen", help="HOST:PORT for the HTTPS proxy (TLS). Repeatable."),
    device_listen: str | None = typer.Option(None, "--device-listen", help="HOST:PORT for device links (TLS 1.3 + HTTP/2 extended CONNECT, one connection per device; `egressd client run`). Needs --cert and --key."),
    tunnel_listen: str | None = typer.Option(None, "--tunnel-listen", help="HOST:PORT where tunnel connectors (egressd tunnel run) attach: TLS with --cert/--key, else the --pki certificate of this PoP."),
    tunnel_advertise: str | None = typer.Option(None, "--tunnel-advertise", help="[NAME@]HOST:PORT that connectors using the control plane's PoP list dial (NAME: what the certificate names). Default: the --tunnel-listen address, named by this PoP's code with --pki."),
    cert: Path | None = typer.Option(None, "--cert", help="Certificate (PEM) for --https-listen and --device-listen."),
    key: Path | None = typer.Option(None, "--key", help="Private key (PEM) for --https-listen."),
    workers: int = typer.Option(1, "--workers", min=1, max=64, help="Processes sharing the listeners (SO_REUSEPORT)."),
    flow_log: str = typer.Option("-", "--flow-log", help="Flow log path; '-' for stderr, 'off' for none."),
    static_host: list[str] = typer.Option([], "--host", help="NAME=IP static name for the resolver (labs, tests). Repeatable."),
    dns_upstream: list[str] = typer.Option([], "--dns-upstream", help="IP[:PORT] ([IPv6]:PORT) of an upstream DNS server for the PoP's resolver (flows' hostnames and --dns-listen), asked from this PoP's shared address (R4). Repeatable: tried in order. Default: the system resolver (with --dns-listen: the servers in /etc/resolv.conf)."),
    dns_listen: list[str] = typer.Option([], "--dns-listen", help="HOST:PORT where the PoP serves DNS to devices over UDP and TCP (and DoH at /dns-query on its HTTP(S) listeners). Repeatable."),
    dns_allow: list[str] = typer.Option([], "--dns-allow", help="CIDR of clients that may use --dns-listen and DoH without a device credential; others get REFUSED. Repeatable. Default: loopback."),
    connect_timeout: float = typer.Option(10.0, "--connect-timeout", help="Seconds to connect upstream."),
    handshake_timeout: float = typer.Option(10.0, "--handshake-timeout", help="Seconds a client has to finish its request."),
    idle_timeout: float = typer.Option(300.0, "--idle-timeout", help="Seconds an idle tunnel is kept."),
    max_lifetime: float = typer.Option(0.0, "--max-lifetime", help="Seconds a tunnel may live at most, busy or not; 0: no limit."),
    max_request_line: int = typer.Option(8192, "--max-request-line", min=64, max=1 << 20, help="Bytes of a request line; longer ones get 414."),
    max_header_bytes: int = typer.Option(65536, "--max-header-bytes", min=256, max=1 << 24, help="Bytes of a request's header section; larger ones get 431."),
    max_header_fields: int = typer.Option(100, "--max-header-fields", min=1, max=10000, help="Fields in a request's header section; more get 431."),
    max_handshakes_per_source: int = typer.Option(64, "--max-handshakes-per-source", min=0, help="Connections from one address that may be unfinished (no complete request yet) at once; more are closed at accept (slowloris). 0: no limit."),
    max_connections_per_source: int = typer.Option(1024, "--max-connections-per-source", min=0, help="TLS listener: connections from one address at once. 0: no limit."),
    max_flows_per_source: int = typer.Option(4096, "--max-flows-per-source", min=0, help="TCP flows from one address at once (per worker); more get 429 / SOCKS5 'not allowed'. 0: no limit."),
    max_flows_per_account: int = typer.Option(10000, "--max-flows-per-account", min=0, help="TCP flows of one account at once (per worker). 0: no limit."),
    auth_failures_per_source: int = typer.Option(30, "--auth-failures-per-source", min=0, help="Failed logins from one address per minute; past it, every attempt from it is refused until the minute ends. 0: no limit."),
    pki: Path | None = typer.Option(None, "--pki", file_okay=False, help="Join the backbone: DIR holds ca.crt and pop-CODE.crt/.key (egressd pki). Flows whose egress is another PoP are carried there over mutually authenticated TLS; peers are the data centers with a `backbone` address."),
    backbone_port: int = typer.Option(7443, "--backbone-port", min=1, max=65535, help="The backbone port of every PoP (with --pki)."),
    backbone_listen: str | None = typer.Option(None, "--backbone-listen", help="HOST:PORT of this PoP's backbone server (default: its data center's backbone address and --backbone-port)."),
    grace: float = typer.Option(30.0, "--grace", help="Seconds flows may finish after SIGTERM."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Run one PoP, configured by exactly one of:

    -d FILE: a deployment file. SIGHUP reloads it (new flows use it, flows in progress keep
    going; an invalid file is reported and the last good configuration stays).

    --control URL --state-dir DIR (token in --control-token-file or $EGRESSD_POP_TOKEN):
    long-poll the control plane for new snapshots and apply each within moments (R14). The
    last good snapshot is kept in DIR; a PoP restarted while the control plane is down
    serves it at once. Without a copy the PoP waits for the first snapshot (at most
    --first-snapshot-wait seconds). An invalid snapshot is logged and not applied; an
    unreachable control plane is retried while the PoP keeps serving, and /health says so.

    SIGTERM stops accepting and lets flows finish for --grace seconds."""
    setup_logging(log_level)
    source = _config_source(deployment, code, control, control_token_file, state_dir, control_ca, first_wait)
    if https_listen and (cert is None or key is None):
        raise typer.BadParameter("--https-listen needs --cert and --key", param_hint="--https-listen")
    if device_listen and (cert is None or key is None):
        raise typer.BadParameter("--device-listen needs --cert and --key", param_hint="--device-listen")
    device = _host_port(device_listen, "--device-listen") if device_listen else None
    if tunnel_listen and (cert is None or key is None) and pki is None:
        raise typer.BadParameter("--tunnel-listen needs --cert and --key, or --pki", param_hint="--tunnel-listen")
    tunnel_at = _host_port(tunnel_listen, "--tunnel-listen") if tunnel_listen else None
    if tunnel_at is not None and tunnel_advertise is None and cert is None and pki is not None \
            and tunnel_at[0] not in ("0.0.0.0", "::", ""):
        tunnel_advertise = f"{code}@{tunnel_listen}"  # its pki certificate names the code
    if tunnel_listen and workers > 1:
        raise typer.BadParameter("connectors attach to one process: use --workers 1 with "
                                 "--tunnel-listen", param_hint="--workers")
    plain = [_host_port(item, "--listen") for item in listen]
    tls = [_host_port(item, "--https-listen") for item in https_listen]
    statics: dict[str, list[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {}
    for item in static_host:
        name, sep, address = item.partition("=")
        try:
            statics.setdefault(name, []).append(ipaddress.ip_address(address))
        except ValueError as exc:
            raise typer.BadParameter(f"expected NAME=IP, got {item!r}", param_hint="--host") from exc
        if not sep or not name:
            raise typer.BadParameter(f"expected NAME=IP, got {item!r}", param_hint="--host")

    upstreams = [_dns_server(item) for item in dns_upstream]
    dns_listens = [_host_port(item, "--dns-listen") for item in dns_listen]
    dns_allows = []
    for item in dns_allow:
        try:
            dns_allows.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise typer.BadParameter(f"expected a CIDR, got {item!r}", param_hint="--dns-allow") from None
    backbone_spec = (pki, backbone_port,
                     _host_port(backbone_listen, "--backbone-listen") if backbone_listen else None)
    limits = AdmissionLimits(
        max_handshakes_per_source=max_handshakes_per_source,
        max_connections_per_source=max_connections_per_source,
        max_flows_per_source=max_flows_per_source, max_flows_per_account=max_flows_per_account,
        auth_failures_per_source=auth_failures_per_source)
    hold_signals()

    def child() -> None:
        run(lambda: _serve_pop(source, code, plain, tls, cert, key, flow_log, (statics, upstreams, dns_listens, dns_allows),
                               connect_timeout, handshake_timeout, idle_timeout, max_lifetime or None,
                               grace, workers > 1, limits, backbone_spec,
                               (max_request_line, max_header_bytes, max_header_fields), device,
                               (tunnel_at, tunnel_advertise) if tunnel_at else None))

    if workers == 1:
        child()
        return
    _run_workers(workers, child)


def shared_source(state: StateHolder | None, code: str,
                  version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The PoP's first shared address of that IP version: where its own DNS queries leave from (R4)."""
    dc = state.snapshot.data_centers.get(code) if state is not None else None
    if dc is None:
        return None
    if version == 4:
        return dc.shared_ipv4[0] if dc.shared_ipv4 else None
    return dc.shared_ipv6.network_address + 1 if dc.shared_ipv6 is not None else None


def _dns_server(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """IP, IP:PORT or [IPv6]:PORT (port 53 by default)."""
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else -1
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text) if port_text.isdigit() else -1
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or not 0 < port < 65536:
        raise typer.BadParameter(f"expected IP, IP:PORT or [IPv6]:PORT, got {text!r}", param_hint="--dns-upstream")
    return address, port


def _fail(message: str) -> typer.Exit:
    typer.echo(f"egressd pop: {message}", err=True)
    return typer.Exit(2)


def _config_source(deployment: Path | None, code: str, control: str | None, token_file: Path | None,
                   state_dir: Path | None, control_ca: Path | None, first_wait: float) -> Path | ControlSource:
    """Check the configuration options before any fork: the deployment file (validated),
    or the control plane's URL, token and state directory."""
    if (deployment is None) == (control is None):
        raise _fail("give exactly one of -d/--deployment FILE (a deployment file) or "
                    "--control URL (the control plane)")
    if deployment is not None:
        extra = [name for name, value in (("--control-token-file", token_file), ("--state-dir", state_dir),
                                          ("--control-ca", control_ca)) if value is not None]
        if extra:
            raise _fail(f"{', '.join(extra)} only apply with --control, not with -d/--deployment")
        return _checked_file(deployment, code)
    assert control is not None
    from urllib.parse import urlsplit

    parts = urlsplit(control)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.query:
        raise _fail(f"--control expects http(s)://HOST[:PORT][/PATH] without credentials, got {control!r}")
    if state_dir is None:
        raise _fail("--control needs --state-dir DIR, where the last good snapshot is kept (R14)")
    token = _read_token(token_file)
    if parts.scheme == "http" and parts.hostname not in ("localhost", "127.0.0.1", "::1"):
        log.warning("--control %s is plain HTTP: the PoP token travels in clear text; use https://", control)
    if control_ca is not None and not control_ca.is_file():
        raise _fail(f"--control-ca {control_ca}: no such file")
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = tempfile.NamedTemporaryFile(dir=state_dir, prefix=".probe-")  # noqa: SIM115 - closed at once
        probe.close()
    except OSError as exc:
        raise _fail(f"--state-dir {state_dir} is not a writable directory: {exc.strerror or exc}") from exc
    return ControlSource(control.rstrip("/"), token, state_dir, control_ca, first_wait)


def _checked_file(deployment: Path, code: str) -> Path:
    from egressd.model.deployment import DeploymentError, load_deployment

    try:
        snapshot = load_deployment(deployment.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _fail(f"cannot read {deployment}: {exc.strerror}") from exc
    except DeploymentError as exc:
        raise _fail(f"{deployment} is invalid:\n{exc}") from exc
    if code not in snapshot.data_centers:
        raise _fail(f"no data center {code!r} in {deployment} (have: {', '.join(snapshot.data_centers)})")
    return deployment


def _read_token(token_file: Path | None) -> str:
    """The PoP's bearer token: --control-token-file, else $EGRESSD_POP_TOKEN. Never echoed."""
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
            mode = token_file.stat().st_mode
        except OSError as exc:
            raise _fail(f"cannot read --control-token-file {token_file}: {exc.strerror}") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("--control-token-file %s is readable by others (mode %o): chmod 600 it",
                        token_file, stat.S_IMODE(mode))
        where = str(token_file)
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        where = f"${TOKEN_ENV}"
        if not token:
            raise _fail(f"--control needs the PoP's token: --control-token-file PATH or ${TOKEN_ENV}")
    if not token or any(char.isspace() for char in token):
        raise _fail(f"the token in {where} is empty or contains white space")
    return token


def _run_workers(count: int, child: object) -> None:
    """Fork `count` workers (before any event loop exists) and relay signals to them."""
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="egressd-metrics-"))
    pids: list[int] = []
    for index in range(count):
        pid = os.fork()
        if pid == 0:
            os.environ["EGRESSD_WORKER"] = str(index)
            status = 0
            try:
                child()  # type: ignore[operator]
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("worker %d failed", index)
                status = 1
            os._exit(status)
        pids.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    from egressd.cli.runner import _early

    for signum in _early:  # arrived while forking
        forward(signum, None)
    _early.clear()
    worst = 0
    for pid in pids:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        code = os.waitstatus_to_exitcode(status)
        if code < 0:  # killed by a signal: report it the way shells do
            log.error("worker %d was killed by signal %d", pid, -code)
            code = 128 - code
        worst = max(worst, code)
    sys.exit(worst)


async def _serve_pop(
    source: Path | ControlSource, code: str, plain: list[tuple[str, int]], tls: list[tuple[str, int]],
    cert: Path | None, key: Path | None, flow_log: str,
    names: tuple[dict[str, list[ipaddress.IPv4Address | ipaddress.IPv6Address]],
                 list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]],
                 list[tuple[str, int]], list[ipaddress.IPv4Network | ipaddress.IPv6Network]],
    connect_timeout: float, handshake_timeout: float, idle_timeout: float,
    max_lifetime: float | None, grace: float, reuse_port: bool, limits: AdmissionLimits,
    backbone_spec: tuple[Path | None, int, tuple[str, int] | None] = (None, 7443, None),
    head_limits: tuple[int, int, int] = (8192, 65536, 100),
    device_listen: tuple[str, int] | None = None,
    tunnel_listen: tuple[tuple[str, int], str | None] | None = None,
) -> None:
    from egressd.decide import HealthView
    from egressd.model.deployment import DeploymentError, load_deployment
    from egressd.pop.control_link import FirstSnapshotTimeout
    from egressd.pop.listeners import ListenerSpec
    from egressd.pop.metrics import PopMetrics
    from egressd.pop.resolver import Resolver
    from egressd.pop.runtime import NoBackbone, PopOptions, PopRuntime, StateHolder
    from egressd.pop.server import PopServer, server_tls_context

    metrics = PopMetrics()
    state: StateHolder | None = None
    watcher: ControlWatcher | None = None

    def reload() -> None:
        if state is None:
            return
        if not isinstance(source, Path):
            log.info("SIGHUP: the configuration comes from the control plane (snapshot %d); "
                     "nothing to reload", state.snapshot.version)
            return
        try:
            fresh = load_deployment(_read(source), version=state.snapshot.version + 1)
        except (OSError, DeploymentError) as exc:
            log.error("reload of %s failed, keeping snapshot %d:\n%s", source, state.snapshot.version, exc)
            return
        state.replace(fresh)
        metrics.config_version.labels(code).set(fresh.version)
        log.info("reloaded %s: snapshot %d", source, fresh.version)

    # Signals first: SIGTERM must also end the wait for a first snapshot.
    stopped = asyncio.ensure_future(SignalWaiter(on_reload=reload).wait())
    if isinstance(source, Path):
        snapshot = load_deployment(_read(source))
        metrics.config_version.labels(code).set(snapshot.version)
    else:
        watcher = _watcher(source, code, metrics)
        first = asyncio.ensure_future(watcher.first_snapshot(max_wait=source.first_wait))
        await asyncio.wait({first, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not first.done():
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            await watcher.close()
            log.info("%s before the first snapshot: stopped", stopped.result())
            return
        try:
            snapshot = first.result()
        except FirstSnapshotTimeout as exc:
            log.error("%s", exc)
            await watcher.close()
            stopped.cancel()
            raise SystemExit(2) from exc
    # Alone, a PoP reaches only itself (R11 applies to the rest); the backbone's health
    # monitor replaces this view with what it measures.
    view = HealthView(up=frozenset({code}))
    stack = None
    if backbone_spec[0] is not None:
        from egressd.pop.backbone import BackboneStack

        try:
            stack = BackboneStack.for_snapshot(code, snapshot, backbone_spec[0], backbone_spec[1],
                                               backbone_spec[2])
        except (OSError, ValueError) as exc:
            log.error("backbone: %s", exc)
            if watcher is not None:
                await watcher.close()
            stopped.cancel()
            raise SystemExit(2) from exc
    options = PopOptions(connect_timeout=connect_timeout, handshake_timeout=handshake_timeout,
                         idle_timeout=idle_timeout, max_lifetime=max_lifetime, limits=limits,
                         max_request_line=head_limits[0], max_header_section=head_limits[1],
                         max_header_fields=head_limits[2])
    flowlog = _open_flow_log(flow_log)
    state = StateHolder(snapshot, view)
    dns_service = None
    if names[1] or names[2]:
        from egressd.pop.dns_service import DEFAULT_ALLOW, DnsService, system_upstreams

        dns_service = DnsService(code, names[1] or system_upstreams(),
                                 lambda version: shared_source(state, code, version), flowlog,
                                 allow=names[3] or DEFAULT_ALLOW)
    runtime = PopRuntime(code, state, stack.backbone if stack else NoBackbone(),
                         Resolver(static=names[0], service=dns_service), options, flowlog, metrics)
    runtime.dns = dns_service
    specs = [ListenerSpec(host, port) for host, port in plain]
    specs += [ListenerSpec(host, port, tls=True) for host, port in tls]
    context = server_tls_context(cert, key) if tls and cert and key else None
    server = PopServer(runtime, specs, tls_context=context, reuse_port=reuse_port)
    device_link = None
    if device_listen is not None and cert is not None and key is not None:
        from egressd.pop.device_link import DeviceLinkServer, device_tls_context

        device_link = DeviceLinkServer(runtime, device_tls_context(cert, key), *device_listen,
                                       reuse_port=reuse_port)
    tunnels = None
    if tunnel_listen is not None:
        from egressd.pop.device_link import device_tls_context
        from egressd.pop.tunnel_link import TunnelServer

        pki = backbone_spec[0]
        tunnel_cert, tunnel_key = (cert, key) if cert and key else (
            (pki / f"pop-{code}.crt", pki / f"pop-{code}.key") if pki else (None, None))
        assert tunnel_cert is not None and tunnel_key is not None  # checked with the options
        tunnels = TunnelServer(runtime, device_tls_context(tunnel_cert, tunnel_key),
                               *tunnel_listen[0], advertise=tunnel_listen[1])
    try:
        await server.start()
        if device_link is not None:
            await device_link.start()
        if tunnels is not None:
            await tunnels.start()
        if dns_service is not None and names[2]:
            await dns_service.start(names[2], reuse_port=reuse_port)
            log.info("DNS for devices on %s (UDP, TCP), upstreams %s", ", ".join(
                f"{host}:{port}" for host, port in dns_service.addresses),
                ", ".join(str(server) for server, _ in dns_service.upstreams) or "none")
        if stack is not None:
            await stack.start(runtime, state, reuse_port=reuse_port)
        settle_heap()
    except OSError as exc:
        log.error("cannot listen on %s", exc.strerror or exc)
        if dns_service is not None:
            dns_service.close()
        if device_link is not None:
            await device_link.close()
        if tunnels is not None:
            await tunnels.close()
        await server.close()
        if stack is not None:
            await stack.close()
        flowlog.close()
        if watcher is not None:
            await watcher.close()
        stopped.cancel()
        raise SystemExit(2) from exc
    shipper: FlowShipper | None = None
    reporter: HealthReporter | None = None
    if watcher is not None:
        watcher.start(state)
        assert isinstance(source, ControlSource)
        from egressd.pop.flow_shipper import FlowShipper

        shipper = FlowShipper(source.url, source.token, verify=watcher.verify)
        flowlog.sinks.append(shipper)  # the dashboard's live tail
        shipper.start()
        from egressd.pop.health_report import HealthReporter

        reporter = HealthReporter(source.url, source.token, {code: state},
                                  verify=watcher.verify,
                                  tunnels={code: tunnels.report} if tunnels else None)
        reporter.start()

    reason = await stopped
    log.info("%s: draining for up to %g s", reason, grace)
    if device_link is not None:
        device_link.stop_accepting()
    if dns_service is not None:
        dns_service.close()
    await server.drain(grace)
    if device_link is not None:
        await device_link.close()
    if tunnels is not None:
        await tunnels.close()
    if stack is not None:
        await stack.close()
    if shipper is not None:
        await shipper.close()
    if reporter is not None:
        await reporter.close()
    if watcher is not None:
        await watcher.close()
    flowlog.close()
    await asyncio.sleep(0)


def _watcher(source: ControlSource, code: str, metrics: PopMetrics) -> ControlWatcher:
    import ssl

    from egressd.pop.control_link import ControlWatcher

    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per long poll
    verify: ssl.SSLContext | bool = True
    if source.ca is not None:
        verify = ssl.create_default_context(cafile=str(source.ca))
    return ControlWatcher(source.url, code, source.token, source.state_dir, metrics=metrics, verify=verify)


def _read(path: Path) -> str:
    """A deployment file is small: read it synchronously, at start and on SIGHUP only."""
    return path.read_text(encoding="utf-8")


def _open_flow_log(target: str) -> FlowLog:
    from egressd.pop.flowlog import FlowLog

    if target == "off":
        return FlowLog.disabled()  # not /dev/null: no record is encoded or written at all
    return FlowLog() if target == "-" else FlowLog.to_path(target)
