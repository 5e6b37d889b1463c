"""`egressd pop`: run one PoP from a deployment file, optionally as several worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from egressd.cli.runner import SignalWaiter, hold_signals, run, setup_logging

if TYPE_CHECKING:
    from egressd.pop.flowlog import FlowLog

log = logging.getLogger("egressd.pop")


def register(app: typer.Typer) -> None:
    app.command("pop")(pop)


def _host_port(text: str, option: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise typer.BadParameter(f"expected HOST:PORT, got {text!r}", param_hint=option)
    return host.strip("[]") or "0.0.0.0", int(port)


def pop(
    deployment: Path = typer.Option(..., "--deployment", "-d", help="Deployment file (TOML), see docs/deployment-file.md."),
    code: str = typer.Option(..., "--pop", help="Which data center of the deployment this PoP is."),
    listen: list[str] = typer.Option(["127.0.0.1:8080"], "--listen", help="HOST:PORT for HTTP proxy + SOCKS5 (sniffed). Repeatable."),
    https_listen: list[str] = typer.Option([], "--https-listen", help="HOST:PORT for the HTTPS proxy (TLS). Repeatable."),
    cert: Path | None = typer.Option(None, "--cert", help="Certificate (PEM) for --https-listen."),
    key: Path | None = typer.Option(None, "--key", help="Private key (PEM) for --https-listen."),
    workers: int = typer.Option(1, "--workers", min=1, max=64, help="Processes sharing the listeners (SO_REUSEPORT)."),
    flow_log: str = typer.Option("-", "--flow-log", help="Flow log path; '-' for stderr, 'off' for none."),
    static_host: list[str] = typer.Option([], "--host", help="NAME=IP static name for the resolver (labs, tests). Repeatable."),
    connect_timeout: float = typer.Option(10.0, "--connect-timeout", help="Seconds to connect upstream."),
    handshake_timeout: float = typer.Option(10.0, "--handshake-timeout", help="Seconds a client has to finish its request."),
    idle_timeout: float = typer.Option(300.0, "--idle-timeout", help="Seconds an idle tunnel is kept."),
    max_lifetime: float = typer.Option(0.0, "--max-lifetime", help="Seconds a tunnel may live at most, busy or not; 0: no limit."),
    grace: float = typer.Option(30.0, "--grace", help="Seconds flows may finish after SIGTERM."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Run one PoP. SIGHUP reloads the deployment file (new flows use it, flows in progress
    keep going; an invalid file is reported and the last good configuration stays).
    SIGTERM stops accepting and lets flows finish for --grace seconds."""
    from egressd.model.deployment import DeploymentError, load_deployment

    setup_logging(log_level)
    try:
        snapshot = load_deployment(deployment.read_text(encoding="utf-8"))
    except OSError as exc:
        typer.echo(f"egressd pop: cannot read {deployment}: {exc.strerror}", err=True)
        raise typer.Exit(2) from exc
    except DeploymentError as exc:
        typer.echo(f"egressd pop: {deployment} is invalid:\n{exc}", err=True)
        raise typer.Exit(2) from exc
    if code not in snapshot.data_centers:
        typer.echo(f"egressd pop: no data center {code!r} in {deployment} (have: {', '.join(snapshot.data_centers)})", err=True)
        raise typer.Exit(2)
    if https_listen and (cert is None or key is None):
        raise typer.BadParameter("--https-listen needs --cert and --key", param_hint="--https-listen")
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

    hold_signals()

    def child() -> None:
        run(lambda: _serve_pop(deployment, code, plain, tls, cert, key, flow_log, statics,
                               connect_timeout, handshake_timeout, idle_timeout, max_lifetime or None,
                               grace, workers > 1))

    if workers == 1:
        child()
        return
    _run_workers(workers, child)


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
    deployment: Path, code: str, plain: list[tuple[str, int]], tls: list[tuple[str, int]],
    cert: Path | None, key: Path | None, flow_log: str,
    statics: dict[str, list[ipaddress.IPv4Address | ipaddress.IPv6Address]],
    connect_timeout: float, handshake_timeout: float, idle_timeout: float,
    max_lifetime: float | None, grace: float, reuse_port: bool,
) -> None:
    from egressd.decide import HealthView
    from egressd.model.deployment import DeploymentError, load_deployment
    from egressd.pop.listeners import ListenerSpec
    from egressd.pop.metrics import PopMetrics
    from egressd.pop.resolver import Resolver
    from egressd.pop.runtime import NoBackbone, PopOptions, PopRuntime, StateHolder
    from egressd.pop.server import PopServer, server_tls_context

    snapshot = load_deployment(_read(deployment))
    # Until the backbone lands, a standalone PoP reaches only itself (R11 applies to the rest).
    view = HealthView(up=frozenset({code}))
    options = PopOptions(connect_timeout=connect_timeout, handshake_timeout=handshake_timeout,
                         idle_timeout=idle_timeout, max_lifetime=max_lifetime)
    flowlog = _open_flow_log(flow_log)
    state = StateHolder(snapshot, view)
    runtime = PopRuntime(code, state, NoBackbone(), Resolver(static=statics), options, flowlog, PopMetrics())
    specs = [ListenerSpec(host, port) for host, port in plain]
    specs += [ListenerSpec(host, port, tls=True) for host, port in tls]
    context = server_tls_context(cert, key) if tls and cert and key else None
    server = PopServer(runtime, specs, tls_context=context, reuse_port=reuse_port)
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot listen on %s", exc.strerror or exc)
        flowlog.close()
        raise SystemExit(2) from exc

    def reload() -> None:
        try:
            fresh = load_deployment(_read(deployment), version=state.snapshot.version + 1)
        except (OSError, DeploymentError) as exc:
            log.error("reload of %s failed, keeping snapshot %d:\n%s", deployment, state.snapshot.version, exc)
            return
        state.replace(fresh)
        log.info("reloaded %s: snapshot %d", deployment, fresh.version)

    reason = await SignalWaiter(on_reload=reload).wait()
    log.info("%s: draining for up to %g s", reason, grace)
    await server.drain(grace)
    flowlog.close()
    await asyncio.sleep(0)


def _read(path: Path) -> str:
    """A deployment file is small: read it synchronously, at start and on SIGHUP only."""
    return path.read_text(encoding="utf-8")


def _open_flow_log(target: str) -> FlowLog:
    from egressd.pop.flowlog import FlowLog

    if target == "off":
        return FlowLog(open(os.devnull, "w"))
    return FlowLog() if target == "-" else FlowLog.to_path(target)
