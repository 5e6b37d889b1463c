"""`egressd account`: accounts (tenants) and their plan; `egressd settings`: Settings ›
Network of an account, and the deployment's settings."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from egressd.cli.api_client import (
    PANEL_API,
    Api,
    api_command,
    details,
    group_help,
    on_off,
    segment,
    table,
    usage_error,
)

account = typer.Typer(help=group_help(
    "Accounts: an organisation's users, devices, policies and dedicated egress IPs. "
    "Dedicated egress is for the **enterprise** plan and is active once the account has "
    "active locations in two different cities (R2)."), no_args_is_help=True)
settings = typer.Typer(help=group_help(
    "Settings › Network of an account (what leaves from its dedicated IPs), and the "
    "deployment-wide settings."), no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(account, name="account", rich_help_panel=PANEL_API,
                  short_help="Accounts: plan, settings, dedicated-egress status.")
    app.add_typer(settings, name="settings", rich_help_panel=PANEL_API,
                  short_help="Settings › Network of an account; deployment settings.")


AccountArg = Annotated[str, typer.Argument(help="Account id, e.g. acme.", show_default=False)]
Plan = Annotated[str | None, typer.Option(
    "--plan", metavar="free|enterprise", show_default=False,
    help="free: shared egress only; enterprise: dedicated egress IPs (R2).")]
Fallback = Annotated[str | None, typer.Option(
    "--fallback", metavar="closed|shared", show_default=False,
    help="No usable dedicated location: closed refuses the flow, shared leaves from shared "
    "addresses.")]

ACCOUNT_COLUMNS = [("id", "id"), ("name", "name"), ("plan", "plan"),
                   ("network.proxy_tcp", "tcp"), ("network.proxy_udp", "udp"),
                   ("network.fallback", "fallback"), ("dedicated.status", "dedicated"),
                   ("dedicated.cities", "cities")]
LOCATION_COLUMNS = [("id", "location"), ("pop", "pop"), ("city", "city"), ("ipv4", "ipv4"),
                    ("ipv6", "ipv6"), ("state", "state"), ("assigned_at", "assigned")]
NETWORK_KEYS = [("proxy_tcp", "TCP through dedicated IPs"),
                ("proxy_udp", "UDP (HTTP/3) through dedicated IPs"),
                ("fallback", "fallback")]


def _choice(value: str | None, allowed: tuple[str, ...], option: str) -> str | None:
    if value is not None and value not in allowed:
        raise typer.BadParameter(f"expected one of {', '.join(allowed)}", param_hint=option)
    return value


def show_account(api: Api, data: dict[str, Any], locations: list[Any] | None = None) -> None:
    details(api, data, [("id", "id"), ("name", "name"), ("plan", "plan"),
                        ("network.proxy_tcp", "proxy TCP"), ("network.proxy_udp", "proxy UDP"),
                        ("network.fallback", "fallback"), ("dedicated.status", "dedicated"),
                        ("dedicated.detail", ""), ("created_at", "created")])
    if locations:
        api.out.print()
        table(api, locations, LOCATION_COLUMNS, title="dedicated locations")


@api_command(account, "list")
def list_accounts(
    api: Api,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 100,
    offset: Annotated[int, typer.Option("--offset", min=0)] = 0,
) -> None:
    """List accounts with their plan, network settings and dedicated-egress status."""
    rows = api.get("/v1/accounts", {"limit": limit, "offset": offset})
    api.show(rows, lambda data: table(api, data, ACCOUNT_COLUMNS, empty="no accounts"))


@api_command(account, "show")
def show(api: Api, account_id: AccountArg) -> None:
    """One account, with its dedicated locations (--json: the account only)."""
    data = api.get(f"/v1/accounts/{segment(account_id)}")
    api.show(data, lambda data: show_account(
        api, data, api.get(f"/v1/accounts/{segment(account_id)}/locations")))


@api_command(account, "create")
def create(
    api: Api,
    account_id: AccountArg,
    name: Annotated[str | None, typer.Option("--name", help="Display name (default: the id).",
                                             show_default=False)] = None,
    plan: Plan = None,
    tcp: Annotated[str | None, typer.Option("--tcp", metavar="on|off", show_default=False,
                                            help="proxy TCP through dedicated IPs (default on)")] = None,
    udp: Annotated[str | None, typer.Option("--udp", metavar="on|off", show_default=False,
                                            help="proxy UDP too; needs TCP (R3; default off)")] = None,
    fallback: Fallback = None,
) -> None:
    """Create an account (plan free unless `--plan enterprise`)."""
    network: dict[str, Any] = {}
    for key, value in (("proxy_tcp", on_off(tcp, "--tcp")), ("proxy_udp", on_off(udp, "--udp")),
                       ("fallback", _choice(fallback, ("closed", "shared"), "--fallback"))):
        if value is not None:
            network[key] = value
    body: dict[str, Any] = {"id": account_id, "name": name or account_id,
                            "plan": _choice(plan, ("free", "enterprise"), "--plan") or "free"}
    if network:
        body["network"] = network
    data = api.post("/v1/accounts", body)
    api.show(data, lambda data: show_account(api, data))


@api_command(account, "update")
def update(
    api: Api,
    account_id: AccountArg,
    name: Annotated[str | None, typer.Option("--name", show_default=False)] = None,
    plan: Plan = None,
) -> None:
    """Rename an account or change its plan (leaving enterprise needs its locations
    released first)."""
    body = {key: value for key, value in (
        ("name", name), ("plan", _choice(plan, ("free", "enterprise"), "--plan")))
        if value is not None}
    if not body:
        usage_error("nothing to change: give --name and/or --plan")
    data = api.patch(f"/v1/accounts/{segment(account_id)}", body)
    api.show(data, lambda data: show_account(api, data))


@api_command(account, "delete")
def delete(
    api: Api,
    account_id: AccountArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete an account with its users, devices and policies. Its dedicated addresses
    go into quarantine (R2). Asks first unless `--yes`; without a terminal, `--yes` is
    required."""
    if not yes:
        if not sys.stdin.isatty():
            usage_error(f"deleting account {account_id!r} needs --yes when not interactive")
        typer.confirm(f"Delete account {account_id!r} and everything in it?", abort=True,
                      err=True)
    api.delete(f"/v1/accounts/{segment(account_id)}")
    api.say(f"deleted account {account_id}")


@api_command(settings, "network")
def network(
    api: Api,
    account_id: AccountArg,
    tcp: Annotated[str | None, typer.Option(
        "--tcp", metavar="on|off", show_default=False,
        help="Proxy TCP through the dedicated IPs. Off turns UDP off too (R3).")] = None,
    udp: Annotated[str | None, typer.Option(
        "--udp", metavar="on|off", show_default=False,
        help="Proxy UDP (HTTP/3) too; needs TCP on (R3).")] = None,
    fallback: Fallback = None,
) -> None:
    """Show an account's Settings › Network, or change it with `--tcp`, `--udp`,
    `--fallback`."""
    path = f"/v1/accounts/{segment(account_id)}/settings/network"
    body = {key: value for key, value in (
        ("proxy_tcp", on_off(tcp, "--tcp")), ("proxy_udp", on_off(udp, "--udp")),
        ("fallback", _choice(fallback, ("closed", "shared"), "--fallback")))
        if value is not None}
    data = api.patch(path, body) if body else api.get(path)
    api.show(data, lambda data: details(api, data, NETWORK_KEYS))


@api_command(settings, "deployment")
def deployment(
    api: Api,
    quarantine_days: Annotated[int | None, typer.Option(
        "--quarantine-days", min=0, max=3650, show_default=False,
        help="Days a released dedicated address waits before it can go to another account "
        "(R2).")] = None,
    allow_destinations: Annotated[str | None, typer.Option(
        "--allow-destinations", metavar="CIDR,...", show_default=False,
        help="Special-purpose ranges the PoPs may reach anyway; replaces the list "
        "('' empties it).")] = None,
    control_addresses: Annotated[str | None, typer.Option(
        "--control-addresses", metavar="CIDR,...", show_default=False,
        help="Infrastructure the PoPs must never reach (R13); replaces the list "
        "('' empties it).")] = None,
) -> None:
    """Show the deployment's settings, or change them (the others keep their values)."""
    current = api.get("/v1/settings")
    changes: dict[str, Any] = {}
    if quarantine_days is not None:
        changes["quarantine_days"] = quarantine_days
    for key, value in (("allow_destinations", allow_destinations),
                       ("control_addresses", control_addresses)):
        if value is not None:
            changes[key] = [item.strip() for item in value.split(",") if item.strip()]
    data = api.put("/v1/settings", {**current, **changes}) if changes else current
    api.show(data, lambda data: details(api, data, [
        ("quarantine_days", "quarantine days"), ("allow_destinations", "allow destinations"),
        ("control_addresses", "control addresses")]))
