"""`egressd tunnel`: tunnel connectors of an account (create, token, list, show, delete,
through the control plane's API) and the connector itself (`egressd tunnel run`)."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from egressd.cli.api_client import (
    PANEL_API,
    Api,
    api_command,
    details,
    group_help,
    segment,
    table,
    usage_error,
)

tunnel = typer.Typer(help=group_help(
    "Tunnel connectors: `egressd tunnel run` inside a private network dials out to the "
    "nearest PoPs and carries the account's flows to its private routes (kind tunnel, "
    "`via` = the connector id), from its own host (R4). `create` and `token` show the "
    "connector's token once."), no_args_is_help=True)

log = logging.getLogger("egressd.connector")

TOKEN_ENV = "EGRESSD_TUNNEL_TOKEN"  # noqa: S105 - an environment variable name


def register(app: typer.Typer) -> None:
    app.add_typer(tunnel, name="tunnel", rich_help_panel=PANEL_API,
                  short_help="Tunnel connectors: manage them, or run one.")


AccountArg = Annotated[str, typer.Argument(help="Account id.", show_default=False)]
TunnelArg = Annotated[str, typer.Argument(help="Connector id (deployment-wide).",
                                          show_default=False)]
COLUMNS = [("id", "connector"), ("status", "status"), ("pops", "attached to"),
           ("announced", "routes announced"), ("declared_routes", "private routes")]


def _base(account_id: str) -> str:
    return f"/v1/accounts/{segment(account_id)}/tunnels"


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    attached = row.get("attached", [])
    return {**row, "pops": [f"{item['pop']} ({item['peer']})" for item in attached]}


def _show_token(api: Api, data: dict[str, Any], what: str) -> None:
    api.out.print(f"{what} {data['id']} of {data['account_id']}; run it inside the private "
                  "network with `egressd tunnel run --token-file FILE --pop HOST:PORT "
                  "--ca CA`. The token, shown once:", markup=False)
    print(data["token"], flush=True)


@api_command(tunnel, "list")
def tunnel_list(api: Api, account_id: AccountArg) -> None:
    """List an account's connectors: where each is attached and the routes it announced."""
    rows = api.get(_base(account_id))
    api.show(rows, lambda rows: table(api, [_flat(row) for row in rows], COLUMNS,
                                      empty=f"{account_id} has no tunnel connectors"))


@api_command(tunnel, "show")
def tunnel_show(api: Api, account_id: AccountArg, tunnel_id: TunnelArg) -> None:
    """One connector, with the PoPs it is attached to."""
    data = api.get(f"{_base(account_id)}/{segment(tunnel_id)}")
    api.show(data, lambda data: details(api, _flat(data), [
        *COLUMNS, ("created_at", "created"), ("token_issued_at", "token issued")]))


@api_command(tunnel, "create")
def tunnel_create(api: Api, account_id: AccountArg, tunnel_id: TunnelArg) -> None:
    """Create a connector; its token is shown once (only a digest is stored)."""
    data = api.post(_base(account_id), {"id": tunnel_id})
    api.show(data, lambda data: _show_token(api, data, "connector"))


@api_command(tunnel, "token")
def tunnel_token(api: Api, account_id: AccountArg, tunnel_id: TunnelArg) -> None:
    """Issue a new token (shown once); the old one stops working and its links drop."""
    data = api.post(f"{_base(account_id)}/{segment(tunnel_id)}/token")
    api.show(data, lambda data: _show_token(api, data, "new token for connector"))


@api_command(tunnel, "delete")
def tunnel_delete(api: Api, account_id: AccountArg, tunnel_id: TunnelArg) -> None:
    """Delete (revoke) a connector: the PoPs drop its links at the next version."""
    api.delete(f"{_base(account_id)}/{segment(tunnel_id)}")
    api.say(f"deleted connector {tunnel_id} of {account_id}")


@tunnel.command("run")
def tunnel_run(
    ca: Annotated[Path, typer.Option("--ca", exists=True, dir_okay=False, show_default=False,
                                     help="CA bundle (PEM) that issued the PoPs' certificates.")],
    pops: Annotated[list[str] | None, typer.Option(
        "--pop", metavar="[NAME@]HOST:PORT", show_default=False,
        help="A PoP's tunnel listener (egressd pop --tunnel-listen); repeat. NAME is what "
             "its certificate names (default HOST). The two nearest by RTT are used.")] = None,
    control: Annotated[str | None, typer.Option(
        "--control", metavar="URL", show_default=False,
        help="Control plane URL: the PoPs with a tunnel listener are listed there (the "
             "connector's token authenticates; a PoP's certificate must name its code). "
             "With --pop, both are used.")] = None,
    control_ca: Annotated[Path | None, typer.Option(
        "--control-ca", exists=True, dir_okay=False, show_default=False,
        help="CA bundle to verify an https:// --control with, instead of the system's.")] = None,
    token: Annotated[str | None, typer.Option(
        "--token", show_default=False,
        help=f"The connector's token (prefer --token-file or ${TOKEN_ENV}: a flag shows in ps).")] = None,
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", exists=True, dir_okay=False, show_default=False,
        help="File holding the connector's token.")] = None,
    routes: Annotated[list[str] | None, typer.Option(
        "--route", metavar="CIDR|HOST", show_default=False,
        help="A route to announce (CIDR or hostname pattern); repeat. Default: every private "
             "route declared for this connector.")] = None,
    links: Annotated[int, typer.Option("--links", min=1, max=8,
                                       help="PoPs to hold a link to at once.")] = 2,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
) -> None:
    """Run a tunnel connector: dial out to the nearest PoPs, announce routes, and open the
    flows they send from this host. Reconnects with backoff; SIGTERM stops it."""
    from egressd.cli.runner import SignalWaiter, run, setup_logging
    from egressd.connector import ConnectorAgent, ConnectorSettings, parse_pop
    from egressd.protocols.tunnel import connector_of, parse_routes

    setup_logging(log_level)
    secret = _token(token, token_file)
    if connector_of(secret) is None:
        usage_error("that is not a connector token (egdt.<id>.<secret>; egressd tunnel create)")
    if not pops and not control:
        usage_error("give the PoPs: --pop HOST:PORT (repeat) or --control URL")
    try:
        addresses = tuple(parse_pop(item) for item in pops or [])
        announced = parse_routes(",".join(routes or []))
    except ValueError as error:
        usage_error(str(error))
    settings = ConnectorSettings(token=secret, pops=addresses, ca=ca, routes=announced, links=links,
                                 control=control, control_ca=control_ca)

    try:
        agent = ConnectorAgent(settings)
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        usage_error(f"--ca {ca}: {error}")

    async def main() -> None:
        stop = asyncio.ensure_future(SignalWaiter().wait())
        running = asyncio.ensure_future(agent.run())
        await asyncio.wait({stop, running}, return_when=asyncio.FIRST_COMPLETED)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        if stop.done():
            log.info("connector: %s, stopped", stop.result())
        else:
            stop.cancel()

    run(main)


def _token(token: str | None, token_file: Path | None) -> str:
    if token is not None and token.strip():
        return token.strip()
    if token_file is not None:
        return token_file.read_text(encoding="utf-8").strip()
    value = os.environ.get(TOKEN_ENV, "").strip()
    if not value:
        usage_error(f"give the connector's token: --token-file FILE, ${TOKEN_ENV} or --token")
    return value
