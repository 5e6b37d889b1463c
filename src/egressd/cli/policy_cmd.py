"""`egressd policy`: an account's egress policies, in order (R6); `egressd route`: its
private routes (R4)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from egressd.cli.api_client import (
    PANEL_API,
    Api,
    api_command,
    details,
    group_help,
    segment,
    split_values,
    table,
    usage_error,
)

policy = typer.Typer(help=group_help(
    "Egress policies of an account: an ordered list, the first that matches a flow decides "
    "whether it leaves from shared addresses or from a dedicated location (R6). Empty "
    "selectors match anything. Positions count from 0."), no_args_is_help=True)
route = typer.Typer(help=group_help(
    "Private routes of an account: destinations reached through a tunnel connector or a "
    "WAN link; flows to them always leave from shared addresses (R4)."), no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(policy, name="policy", rich_help_panel=PANEL_API,
                  short_help="Egress policies of an account, in order (R6).")
    app.add_typer(route, name="route", rich_help_panel=PANEL_API,
                  short_help="Private routes of an account (R4).")


AccountArg = Annotated[str, typer.Argument(help="Account id.", show_default=False)]
PolicyArg = Annotated[str, typer.Argument(help="Policy id.", show_default=False)]
RouteArg = Annotated[str, typer.Argument(help="Route id.", show_default=False)]
SELECTORS = ("users", "groups", "devices", "destinations", "ports", "protocols",
             "connected_pops")
LABELS = {"users": "users", "groups": "groups", "devices": "devices", "destinations": "dest",
          "ports": "ports", "protocols": "proto", "connected_pops": "pops"}


def _many(flag: str, what: str) -> Any:
    return typer.Option(flag, show_default=False, rich_help_panel="Match (empty: anything)",
                        help=f"{what}; repeat, or separate with commas.")


Users = Annotated[list[str] | None, _many("--user", "A user name")]
Groups = Annotated[list[str] | None, _many("--group", "A group name")]
Devices = Annotated[list[str] | None, _many("--device", "A device id")]
Dests = Annotated[list[str] | None, _many("--dest", "A CIDR or hostname pattern "
                                          "(example.com, *.example.com)")]
Ports = Annotated[list[str] | None, _many("--port", "A port or range (443, 8000-8099)")]
Protocols = Annotated[list[str] | None, _many("--protocol", "tcp or udp")]
Pops = Annotated[list[str] | None, _many("--pop", "A PoP the device is attached to")]
EGRESS = "Egress"
Action = Annotated[str | None, typer.Option(
    "--action", metavar="shared|dedicated", show_default=False, rich_help_panel=EGRESS,
    help="Leave from shared addresses, or from the account's dedicated locations.")]
Primary = Annotated[str | None, typer.Option(
    "--primary", metavar="LOCATION", show_default=False, rich_help_panel=EGRESS,
    help="dedicated: the IPv4 location id.")]
Secondary = Annotated[str | None, typer.Option(
    "--secondary", metavar="LOCATION|shared", show_default=False, rich_help_panel=EGRESS,
    help="dedicated: the IPv4 failover, another location or 'shared' (R11).")]
Ipv6 = Annotated[str | None, typer.Option(
    "--ipv6", metavar="LOCATION", show_default=False, rich_help_panel=EGRESS,
    help="dedicated: the IPv6 location id (default: the primary).")]
Name = Annotated[str | None, typer.Option("--name", show_default=False,
                                          help="A description.")]


def _base(account_id: str) -> str:
    return f"/v1/accounts/{segment(account_id)}"


def _selectors(**lists: list[str] | None) -> dict[str, list[str]]:
    return {key: split_values(values) for key, values in lists.items() if values}


def _match(row: dict[str, Any]) -> str:
    parts = [f"{LABELS[key]}={','.join(map(str, row[key]))}" for key in SELECTORS
             if row.get(key)]
    return " ".join(parts) or "anything"


def _egress(row: dict[str, Any]) -> str:
    if row.get("action") != "dedicated":
        return "shared"
    text = f"dedicated {row.get('primary')}"
    if row.get("secondary"):
        text += f", else {row['secondary']}"
    if row.get("ipv6") and row.get("ipv6") != row.get("primary"):
        text += f"; IPv6 {row['ipv6']}"
    return text


def show_policies(api: Api, rows: list[dict[str, Any]], account_id: str) -> None:
    view = [{**row, "match": _match(row), "egress": _egress(row)} for row in rows]
    table(api, view, [("position", "#"), ("id", "policy"), ("name", "name"), ("match", "match"),
                      ("egress", "egress")],
          empty=f"{account_id} has no policies: every flow leaves from shared addresses")


def show_policy(api: Api, row: dict[str, Any]) -> None:
    details(api, {**row, "match": _match(row), "egress": _egress(row)},
            [("id", "id"), ("position", "position"), ("name", "name"), ("match", "match"),
             ("egress", "egress")])


@api_command(policy, "list")
def policy_list(api: Api, account_id: AccountArg) -> None:
    """List an account's policies in evaluation order."""
    rows = api.get(f"{_base(account_id)}/policies")
    api.show(rows, lambda rows: show_policies(api, rows, account_id))


@api_command(policy, "show")
def policy_show(api: Api, account_id: AccountArg, policy_id: PolicyArg) -> None:
    """One policy."""
    data = api.get(f"{_base(account_id)}/policies/{segment(policy_id)}")
    api.show(data, lambda data: show_policy(api, data))


@api_command(policy, "add")
def policy_add(
    api: Api, account_id: AccountArg, policy_id: PolicyArg,
    action: Action = None, primary: Primary = None, secondary: Secondary = None,
    ipv6: Ipv6 = None, name: Name = None,
    users: Users = None, groups: Groups = None, devices: Devices = None,
    destinations: Dests = None, ports: Ports = None, protocols: Protocols = None,
    pops: Pops = None,
    position: Annotated[int | None, typer.Option(
        "--position", min=0, show_default=False,
        help="Where in the order (0 is first; default: last).")] = None,
) -> None:
    """Add a policy, e.g. `egressd policy add acme bank --group finance --dest
    '*.bank.example' --action dedicated --primary jfk --secondary lax`."""
    if action is None:
        usage_error("--action is required (shared or dedicated)")
    body: dict[str, Any] = {"id": policy_id, "action": action, **_selectors(
        users=users, groups=groups, devices=devices, destinations=destinations, ports=ports,
        protocols=protocols, connected_pops=pops)}
    for key, value in (("name", name), ("primary", primary), ("secondary", secondary),
                       ("ipv6", ipv6), ("position", position)):
        if value is not None:
            body[key] = value
    data = api.post(f"{_base(account_id)}/policies", body)
    api.show(data, lambda data: show_policy(api, data))


@api_command(policy, "update")
def policy_update(
    api: Api, account_id: AccountArg, policy_id: PolicyArg,
    action: Action = None, primary: Primary = None, secondary: Secondary = None,
    ipv6: Ipv6 = None, name: Name = None,
    users: Users = None, groups: Groups = None, devices: Devices = None,
    destinations: Dests = None, ports: Ports = None, protocols: Protocols = None,
    pops: Pops = None,
    clear: Annotated[list[str] | None, typer.Option(
        "--clear", metavar="FIELD", show_default=False,
        help="Empty a selector (users, groups, devices, destinations, ports, protocols, "
        "connected_pops: it matches anything again), or ipv6 (follows the primary again); "
        "repeat.")] = None,
) -> None:
    """Change a policy's fields; a selector given replaces that list. Its place in the
    order stays (`egressd policy move` changes it)."""
    body: dict[str, Any] = _selectors(
        users=users, groups=groups, devices=devices, destinations=destinations, ports=ports,
        protocols=protocols, connected_pops=pops)
    for key, value in (("action", action), ("name", name), ("primary", primary),
                       ("secondary", secondary), ("ipv6", ipv6)):
        if value is not None:
            body[key] = value
    for key in split_values(clear):
        if key not in (*SELECTORS, "ipv6", "name"):
            raise typer.BadParameter(f"{key!r} cannot be cleared", param_hint="--clear")
        if key in body:
            usage_error(f"--clear {key} and a new value for it at once")
        body[key] = None
    if not body:
        usage_error("nothing to change: see --help for the fields")
    data = api.patch(f"{_base(account_id)}/policies/{segment(policy_id)}", body)
    api.show(data, lambda data: show_policy(api, data))


@api_command(policy, "remove")
def policy_remove(api: Api, account_id: AccountArg, policy_id: PolicyArg) -> None:
    """Remove a policy; the ones after it move up."""
    api.delete(f"{_base(account_id)}/policies/{segment(policy_id)}")
    api.say(f"removed policy {policy_id} of {account_id}")


@api_command(policy, "move")
def policy_move(
    api: Api, account_id: AccountArg, policy_id: PolicyArg,
    to: Annotated[int | None, typer.Option("--to", min=0, show_default=False,
                                           help="New position (0 is first).")] = None,
    before: Annotated[str | None, typer.Option("--before", metavar="POLICY",
                                               show_default=False)] = None,
    after: Annotated[str | None, typer.Option("--after", metavar="POLICY",
                                              show_default=False)] = None,
    first: Annotated[bool, typer.Option("--first", help="Evaluate it first.")] = False,
    last: Annotated[bool, typer.Option("--last", help="Evaluate it last.")] = False,
) -> None:
    """Move a policy in the evaluation order (one of --to, --before, --after, --first,
    --last). Prints the new order."""
    given = [flag for flag, value in (("--to", to), ("--before", before), ("--after", after),
                                      ("--first", first or None), ("--last", last or None))
             if value is not None]
    if len(given) != 1:
        usage_error("say where with exactly one of --to, --before, --after, --first, --last")
    ids = [row["id"] for row in api.get(f"{_base(account_id)}/policies")]
    if policy_id not in ids:
        usage_error(f"account {account_id!r} has no policy {policy_id!r} (it has: "
                    f"{', '.join(ids) or 'none'})")
    ids.remove(policy_id)
    if first:
        index = 0
    elif last:
        index = len(ids)
    elif to is not None:
        index = min(to, len(ids))
    else:
        anchor = str(before if before is not None else after)
        if anchor not in ids:
            usage_error(f"account {account_id!r} has no other policy {anchor!r}")
        index = ids.index(anchor) + (1 if after is not None else 0)
    ids.insert(index, policy_id)
    rows = api.put(f"{_base(account_id)}/policies/order", {"ids": ids})
    api.show(rows, lambda rows: show_policies(api, rows, account_id))


# Private routes
# --------------------------------------------------------------------------------------

ROUTE_COLUMNS = [("id", "route"), ("kind", "kind"), ("via", "via"),
                 ("destinations", "destinations")]
Kind = Annotated[str | None, typer.Option("--kind", metavar="tunnel|wan", show_default=False,
                                          help="Through a tunnel connector (default) or a "
                                          "WAN link.")]


@api_command(route, "list")
def route_list(api: Api, account_id: AccountArg) -> None:
    """List an account's private routes."""
    rows = api.get(f"{_base(account_id)}/private-routes")
    api.show(rows, lambda rows: table(api, rows, ROUTE_COLUMNS,
                                      empty=f"{account_id} has no private routes"))


@api_command(route, "show")
def route_show(api: Api, account_id: AccountArg, route_id: RouteArg) -> None:
    """One private route."""
    data = api.get(f"{_base(account_id)}/private-routes/{segment(route_id)}")
    api.show(data, lambda data: details(api, data, ROUTE_COLUMNS))


@api_command(route, "add")
def route_add(
    api: Api, account_id: AccountArg, route_id: RouteArg,
    destinations: Annotated[list[str], typer.Argument(
        help="CIDRs and hostname patterns, e.g. 10.20.0.0/16 '*.corp.example'.",
        show_default=False)],
    via: Annotated[str, typer.Option("--via", show_default=False,
                                     help="The connector id (tunnel) or WAN link name.")],
    kind: Kind = None,
) -> None:
    """Add a private route."""
    data = api.post(f"{_base(account_id)}/private-routes", {
        "id": route_id, "kind": kind or "tunnel", "via": via,
        "destinations": split_values(destinations)})
    api.show(data, lambda data: details(api, data, ROUTE_COLUMNS))


@api_command(route, "update")
def route_update(
    api: Api, account_id: AccountArg, route_id: RouteArg,
    destinations: Annotated[list[str] | None, typer.Argument(
        help="New destinations (replace the list).", show_default=False)] = None,
    via: Annotated[str | None, typer.Option("--via", show_default=False)] = None,
    kind: Kind = None,
) -> None:
    """Change a private route in one config version (never a moment without it)."""
    if not destinations and via is None and kind is None:
        usage_error("nothing to change: give destinations, --via or --kind")
    path = f"{_base(account_id)}/private-routes/{segment(route_id)}"
    current = api.get(path)
    body = {"id": route_id, "kind": kind or current["kind"], "via": via or current["via"],
            "destinations": split_values(destinations) or current["destinations"]}
    data = api.put(path, body)
    api.show(data, lambda data: details(api, data, ROUTE_COLUMNS))


@api_command(route, "remove")
def route_remove(api: Api, account_id: AccountArg, route_id: RouteArg) -> None:
    """Remove a private route: its destinations are then reached over the Internet."""
    api.delete(f"{_base(account_id)}/private-routes/{segment(route_id)}")
    api.say(f"removed private route {route_id} of {account_id}")
