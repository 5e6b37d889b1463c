"""``egressd echo``: run the echo origin (what address and city does a flow come from).

This module only turns options into an :class:`~egressd.echo.server.EchoServer` and
runs it until SIGINT/SIGTERM; the server itself lives in :mod:`egressd.echo.server`.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

import typer

from egressd.echo.server import EchoServer
from egressd.pki import PkiError, ensure_ca, ensure_server_cert
from egressd.protocols.geofeed import GeofeedError, GeofeedIndex

__all__ = ["register"]

_HELP = """Run the echo origin that `egressd verify`, the tests and the lab ask "where do I
come from?".

HTTP/1.1 on --http-port: `GET /` answers the client's address, `GET /trace` key=value
lines (ip, family, port, proxy_protocol, peer, http, and country/region/city when
--geofeed places the address). A connection may start with a PROXY protocol v2 header;
its source is then reported as ip= and the physical peer as peer=.

UDP on --udp-port: every datagram is answered with "<ip> <port>".

HTTP/3 on --h3-port (UDP): the same paths over QUIC; needs --cert and --key, or
--pki-dir to create and reuse a CA and a certificate for the hosts there.

Port 0 picks a free port (the same on every host). Runs until Ctrl-C or SIGTERM.
"""


def _url(scheme: str, host: str, port: int) -> str:
    try:
        bracketed = ipaddress.ip_address(host).version == 6
    except ValueError:
        bracketed = False
    authority = f"[{host}]:{port}" if bracketed else f"{host}:{port}"
    return f"{scheme}://{authority}" + ("/" if scheme.startswith("http") else "")


def _h3_credentials(
    hosts: list[str], cert: Path | None, key: Path | None, pki_dir: Path | None
) -> tuple[Path, Path]:
    if cert is not None and key is not None:
        return cert, key
    if cert is not None or key is not None:
        raise typer.BadParameter("give both --cert and --key", param_hint="--cert/--key")
    if pki_dir is None:
        raise typer.BadParameter(
            "HTTP/3 needs --cert and --key, or --pki-dir to create them", param_hint="--h3-port"
        )
    ips, names = [], []
    for host in hosts:
        try:
            ips.append(str(ipaddress.ip_address(host)))
        except ValueError:
            names.append(host)
    try:
        ca = ensure_ca(pki_dir)
        files = ensure_server_cert(pki_dir, "echo", [*names, "localhost"], ips, ca)
    except (PkiError, OSError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--pki-dir") from None
    typer.echo(f"echo: HTTP/3 certificate {files.cert_path} (CA {ca.cert_path})")
    return files.cert_path, files.key_path


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (faster), the standard loop otherwise."""
    try:
        import uvloop  # optional: the standard loop works too
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _serve(echo: EchoServer, start: Callable[[], Awaitable[None]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with echo:
            await start()
            for label, scheme, addresses in (
                ("HTTP/1.1", "http", echo.http_addresses),
                ("UDP echo", "udp", echo.udp_addresses),
                ("HTTP/3  ", "https", echo.h3_addresses),
            ):
                for host, port in addresses:
                    typer.echo(f"echo: {label} on {_url(scheme, host, port)}")
            await stop.wait()
            typer.echo("echo: stopping")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def echo_command(
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="Address to listen on; repeat for several (127.0.0.1, ::1)."),
    ] = None,
    http_port: Annotated[
        int, typer.Option(min=0, max=65535, help="HTTP/1.1 port (TCP); 0 picks a free one.")
    ] = 8080,
    udp_port: Annotated[
        int, typer.Option(min=0, max=65535, help="UDP echo port; 0 picks a free one.")
    ] = 8081,
    no_udp: Annotated[bool, typer.Option("--no-udp", help="Do not run the UDP echo.")] = False,
    h3_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="HTTP/3 port (UDP); off unless given."),
    ] = None,
    cert: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="PEM certificate (chain) for HTTP/3."),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="PEM private key for HTTP/3."),
    ] = None,
    pki_dir: Annotated[
        Path | None,
        typer.Option(
            file_okay=False,
            help="Create (once) and reuse a CA and an HTTP/3 certificate in this directory.",
        ),
    ] = None,
    geofeed: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="RFC 8805 geofeed CSV: adds city=... to /trace."
        ),
    ] = None,
    proxy_protocol: Annotated[
        bool,
        typer.Option(
            "--proxy-protocol/--no-proxy-protocol",
            help="Accept a PROXY protocol v2 header at the start of a connection.",
        ),
    ] = True,
    report_link: Annotated[
        bool,
        typer.Option(
            "--report-link",
            help="Name the interface each client's packets arrived on: link=NAME in /trace and "
            "as a third field of UDP replies (the lab's proof of the egress PoP).",
        ),
    ] = False,
) -> None:
    """Run the echo origin (address, trace, geolocation) until interrupted."""
    hosts = host or ["127.0.0.1"]
    index: GeofeedIndex | None = None
    if geofeed is not None:
        try:
            index = GeofeedIndex.from_text(geofeed.read_text(encoding="utf-8"))
        except (GeofeedError, UnicodeDecodeError) as error:
            raise typer.BadParameter(str(error), param_hint="--geofeed") from None
        typer.echo(f"echo: geofeed {geofeed} with {len(index)} prefixes")
    certfile, keyfile = (None, None)
    if h3_port is not None:
        certfile, keyfile = _h3_credentials(hosts, cert, key, pki_dir)
    echo = EchoServer(accept_proxy_v2=proxy_protocol, report_link=report_link)
    start = functools.partial(
        echo.start,
        hosts,
        http_port=http_port,
        udp_port=None if no_udp else udp_port,
        h3_port=h3_port,
        geofeed=index,
        certfile=certfile,
        keyfile=keyfile,
    )
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve(echo, start))
    except OSError as error:
        typer.echo(f"echo: cannot listen: {error}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
        raise typer.Exit(130) from None


def register(app: typer.Typer) -> None:
    """Add the ``echo`` command to ``app``."""
    app.command("echo", help=_HELP, short_help="Run the echo origin (address, trace, geo).")(
        echo_command
    )
