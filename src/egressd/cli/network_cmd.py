"""`egressd ip`: the address inventory, and dedicated locations of accounts (R2)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from egressd.cli.api_client import PANEL_API, Api, api_command, details, group_help, segment, table

ip = typer.Typer(help=group_help(
    "Egress addresses. The inventory (`list`, `add`, `remove`) holds every shared and "
    "dedicated IPv4 address and IPv6 prefix, per data center. Dedicated ones are assigned "
    "to enterprise accounts as locations (`assign`), which stay **pending** until the "
    "administrator confirms that allowlists are updated (`confirm`); a released address "
    "(`release`) is quarantined before another account can have it (R2)."),
    no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(ip, name="ip", rich_help_panel=PANEL_API,
                  short_help="Address inventory and dedicated locations (R2).")


AccountArg = Annotated[str, typer.Argument(help="Account id.", show_default=False)]
LocationArg = Annotated[str, typer.Argument(help="Location id (by default the PoP's code, "
                                            "e.g. lax).", show_default=False)]

ADDRESS_COLUMNS = [("address", "address"), ("family", "family"), ("kind", "kind"),
                   ("data_center", "data center"), ("assigned_to", "assigned to")]
LOCATION_COLUMNS = [("id", "location"), ("pop", "pop"), ("city", "city"), ("ipv4", "ipv4"),
                    ("ipv6", "ipv6"), ("state", "state"), ("assigned_at", "assigned")]


def _dedicated_line(api: Api, account_id: str) -> None:
    """After a change to locations: where the account's dedicated egress stands now."""
    account = api.get(f"/v1/accounts/{segment(account_id)}")
    dedicated = account.get("dedicated", {})
    style = "green" if dedicated.get("status") == "active" else "yellow"
    api.out.print(f"account {account_id}: dedicated egress [{style}]"
                  f"{dedicated.get('status', '?')}[/{style}]", end="")
    api.out.print(f" — {dedicated.get('detail', '')}", markup=False)


@api_command(ip, "list")
def list_addresses(
    api: Api,
    data_center: Annotated[str | None, typer.Option("--dc", help="Only this data center.",
                                                    show_default=False)] = None,
    kind: Annotated[str | None, typer.Option("--kind", metavar="shared|dedicated",
                                             show_default=False)] = None,
    free: Annotated[bool, typer.Option("--free", help="Only dedicated ones nobody holds.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000)] = 1000,
    offset: Annotated[int, typer.Option("--offset", min=0)] = 0,
) -> None:
    """List the address inventory, with the account holding each dedicated one."""
    if kind is not None and kind not in ("shared", "dedicated"):
        raise typer.BadParameter("expected shared or dedicated", param_hint="--kind")
    rows = api.get("/v1/addresses", {"data_center": data_center, "kind": kind,
                                     "free": "true" if free else None,
                                     "limit": limit, "offset": offset})
    api.show(rows, lambda data: table(api, data, ADDRESS_COLUMNS, empty="no addresses"))


@api_command(ip, "add")
def add(
    api: Api,
    address: Annotated[str, typer.Argument(help="An IPv4 address, or an IPv6 prefix "
                                           "(e.g. 2001:db8:100::/48).", show_default=False)],
    data_center: Annotated[str, typer.Option("--dc", help="Data center (PoP) it is routed to.",
                                             show_default=False)],
    kind: Annotated[str, typer.Option("--kind", metavar="dedicated|shared",
                                      help="dedicated: for accounts' locations; shared: "
                                      "everyone's egress at that PoP.")] = "dedicated",
) -> None:
    """Add an address or IPv6 prefix to the inventory."""
    if kind not in ("shared", "dedicated"):
        raise typer.BadParameter("expected dedicated or shared", param_hint="--kind")
    data = api.post("/v1/addresses", {"address": address, "data_center": data_center,
                                      "kind": kind})
    api.show(data, lambda data: api.say(
        f"added {data['address']} ({data['kind']}, IPv{data['family']}) at {data['data_center']}"))


@api_command(ip, "remove")
def remove(
    api: Api,
    address: Annotated[str, typer.Argument(help="The address or IPv6 prefix.",
                                           show_default=False)],
) -> None:
    """Remove an address from the inventory (refused while an account holds it)."""
    api.delete(f"/v1/addresses/{segment(address)}")
    api.say(f"removed {address} from the inventory")


@api_command(ip, "assign")
def assign(
    api: Api,
    account_id: AccountArg,
    ipv4: Annotated[str, typer.Argument(help="A free dedicated IPv4 address of the inventory.",
                                        show_default=False)],
    ipv6: Annotated[str | None, typer.Option(
        "--ipv6", metavar="PREFIX", show_default=False,
        help="A dedicated IPv6 prefix of the inventory at the same PoP.")] = None,
    location_id: Annotated[str | None, typer.Option(
        "--id", show_default=False, help="Location id (default: the PoP's code).")] = None,
    confirmed: Annotated[bool, typer.Option(
        "--confirmed", help="Allowlists are already updated (or need none): active at once "
        "instead of pending.")] = False,
) -> None:
    """Assign a dedicated address to an enterprise account as a location (pending until
    `egressd ip confirm`, unless `--confirmed`)."""
    body: dict[str, Any] = {"ipv4": ipv4, "confirmed": confirmed}
    if ipv6 is not None:
        body["ipv6"] = ipv6
    if location_id is not None:
        body["id"] = location_id
    data = api.post(f"/v1/accounts/{segment(account_id)}/locations", body)

    def human(data: dict[str, Any]) -> None:
        api.say(f"assigned {data['ipv4']}" + (f" and {data['ipv6']}" if data.get("ipv6") else "")
                + f" to {account_id} as location {data['id']} ({data['city']}): {data['state']}")
        if data["state"] == "pending":
            api.say(f"update the allowlists, then: egressd ip confirm {account_id} {data['id']}")
        _dedicated_line(api, account_id)

    api.show(data, human)


@api_command(ip, "confirm")
def confirm(api: Api, account_id: AccountArg, location_id: LocationArg) -> None:
    """Confirm that allowlists are updated: the location's addresses go into use."""
    data = api.post(f"/v1/accounts/{segment(account_id)}/locations/{segment(location_id)}/confirm")

    def human(data: dict[str, Any]) -> None:
        api.say(f"location {data['id']} of {account_id} ({data['ipv4']}, {data['city']}) is "
                f"{data['state']}")
        _dedicated_line(api, account_id)

    api.show(data, human)


@api_command(ip, "release")
def release(api: Api, account_id: AccountArg, location_id: LocationArg) -> None:
    """Release a location: its addresses go into quarantine for the deployment's cool-down
    before another account can have them (R2)."""
    api.delete(f"/v1/accounts/{segment(account_id)}/locations/{segment(location_id)}")
    if not api.json_output:
        api.say(f"released location {location_id} of {account_id} (its addresses are "
                "quarantined)")
        _dedicated_line(api, account_id)


@api_command(ip, "locations")
def locations(api: Api, account_id: AccountArg) -> None:
    """An account's dedicated locations and whether its dedicated egress is active."""
    rows = api.get(f"/v1/accounts/{segment(account_id)}/locations")

    def human(rows: list[Any]) -> None:
        table(api, rows, LOCATION_COLUMNS, empty=f"{account_id} has no dedicated locations")
        _dedicated_line(api, account_id)

    api.show(rows, human)


@api_command(ip, "location")
def location(api: Api, account_id: AccountArg, location_id: LocationArg) -> None:
    """One dedicated location."""
    data = api.get(f"/v1/accounts/{segment(account_id)}/locations/{segment(location_id)}")
    api.show(data, lambda data: details(api, data))
