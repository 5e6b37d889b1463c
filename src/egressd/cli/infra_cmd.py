"""Deployment-wide resources: `egressd dc`, `egressd origin`, `egressd token`, and
`egressd audit`, `egressd pops`, `egressd geofeed`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from egressd.cli.api_client import (
    PANEL_API,
    Api,
    api_command,
    details,
    emit_json,
    group_help,
    segment,
    table,
    usage_error,
    write_private,
)

dc = typer.Typer(help=group_help(
    "Data centers (PoPs): where they are, their shared egress addresses (R1), and their "
    "IPv6 slot (R9)."), no_args_is_help=True)
origin = typer.Typer(help=group_help(
    "In-network origins: destinations served inside the network, reached without leaving "
    "it (R8)."), no_args_is_help=True)
token = typer.Typer(help=group_help(
    "API tokens: deployment-wide, for one account, or for a PoP. Only a hash is stored; "
    "the token is shown once, by `create`."), no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(dc, name="dc", rich_help_panel=PANEL_API,
                  short_help="Data centers (PoPs).")
    app.add_typer(origin, name="origin", rich_help_panel=PANEL_API,
                  short_help="In-network origins (R8).")
    app.add_typer(token, name="token", rich_help_panel=PANEL_API,
                  short_help="API tokens.")
    api_command(app, "audit", rich_help_panel=PANEL_API, short_help="The audit log.",
                help=group_help(
        "The audit log, newest first: who changed what, with the config version it made."
    ))(audit)
    api_command(app, "pops", rich_help_panel=PANEL_API,
                short_help="Config version each PoP runs.", help=group_help(
        "The newest config version, and the version each PoP confirmed running."))(pops)
    api_command(app, "geofeed", rich_help_panel=PANEL_API,
                short_help="Download the RFC 8805 geofeed.", help=group_help(
        "Download the RFC 8805 geofeed (/geofeed.csv, public: no token needed)."))(geofeed)


CodeArg = Annotated[str, typer.Argument(help="Data center code, e.g. lax.", show_default=False)]
DC_COLUMNS = [("code", "code"), ("city", "city"), ("country", "country"), ("region", "region"),
              ("latitude", "lat"), ("longitude", "lon"), ("backbone", "backbone"),
              ("slot", "slot")]


def _optional(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


@api_command(dc, "list")
def dc_list(api: Api) -> None:
    """List the data centers."""
    rows = api.get("/v1/data-centers")
    api.show(rows, lambda rows: table(api, rows, DC_COLUMNS, empty="no data centers"))


@api_command(dc, "show")
def dc_show(api: Api, code: CodeArg) -> None:
    """One data center, with its addresses."""
    data = api.get(f"/v1/data-centers/{segment(code)}")

    def human(data: dict[str, Any]) -> None:
        details(api, data)
        addresses = api.get("/v1/addresses", {"data_center": code})
        api.out.print()
        table(api, addresses, [("address", "address"), ("kind", "kind"),
                               ("assigned_to", "assigned to")], title="addresses",
              empty="no addresses")

    api.show(data, human)


@api_command(dc, "add")
def dc_add(
    api: Api,
    code: CodeArg,
    city: Annotated[str, typer.Option("--city", show_default=False)],
    country: Annotated[str, typer.Option("--country", help="ISO 3166-1 alpha-2, e.g. US.",
                                         show_default=False)],
    latitude: Annotated[float, typer.Option("--lat", show_default=False)],
    longitude: Annotated[float, typer.Option("--lon", show_default=False)],
    shared_ipv4: Annotated[list[str], typer.Option(
        "--shared-ipv4", show_default=False,
        help="A shared egress address; repeat for more. At least one (R1).")],
    region: Annotated[str, typer.Option("--region", help="ISO 3166-2, e.g. US-CA.")] = "",
    shared_ipv6: Annotated[str | None, typer.Option(
        "--shared-ipv6", metavar="PREFIX", show_default=False)] = None,
    backbone: Annotated[str | None, typer.Option(
        "--backbone", metavar="IP", show_default=False,
        help="Address other PoPs reach this one at.")] = None,
    slot: Annotated[int | None, typer.Option(
        "--slot", show_default=False, help="IPv6 sub-range number (R9; default: the next "
        "free one).")] = None,
) -> None:
    """Add a data center with its shared addresses."""
    body = {"code": code, "city": city, "country": country, "region": region,
            "latitude": latitude, "longitude": longitude, "shared_ipv4": shared_ipv4,
            **_optional(shared_ipv6=shared_ipv6, backbone=backbone, slot=slot)}
    data = api.post("/v1/data-centers", body)
    api.show(data, lambda data: details(api, data))


@api_command(dc, "update")
def dc_update(
    api: Api,
    code: CodeArg,
    city: Annotated[str | None, typer.Option("--city", show_default=False)] = None,
    country: Annotated[str | None, typer.Option("--country", show_default=False)] = None,
    region: Annotated[str | None, typer.Option("--region", show_default=False)] = None,
    latitude: Annotated[float | None, typer.Option("--lat", show_default=False)] = None,
    longitude: Annotated[float | None, typer.Option("--lon", show_default=False)] = None,
    backbone: Annotated[str | None, typer.Option("--backbone", metavar="IP",
                                                 show_default=False)] = None,
) -> None:
    """Change a data center's location or backbone address."""
    body = _optional(city=city, country=country, region=region, latitude=latitude,
                     longitude=longitude, backbone=backbone)
    if not body:
        usage_error("nothing to change: give --city, --country, --region, --lat, --lon or "
                    "--backbone")
    data = api.patch(f"/v1/data-centers/{segment(code)}", body)
    api.show(data, lambda data: details(api, data))


@api_command(dc, "remove")
def dc_remove(api: Api, code: CodeArg) -> None:
    """Remove a data center (refused while it has addresses in the inventory)."""
    api.delete(f"/v1/data-centers/{segment(code)}")
    api.say(f"removed data center {code}")


# In-network origins
# --------------------------------------------------------------------------------------


@api_command(origin, "list")
def origin_list(api: Api) -> None:
    """List the in-network origins."""
    rows = api.get("/v1/in-network-origins")
    api.show(rows, lambda rows: table(api, rows, [("name", "name"),
                                                  ("destinations", "destinations")],
                                      empty="no in-network origins"))


@api_command(origin, "set")
def origin_set(
    api: Api,
    name: Annotated[str, typer.Argument(help="Origin name, e.g. cdn.", show_default=False)],
    destinations: Annotated[list[str], typer.Argument(
        help="CIDRs and hostname patterns (e.g. 203.0.113.128/25 '*.cdn.example').",
        show_default=False)],
) -> None:
    """Create an in-network origin, or replace its destinations."""
    data = api.put(f"/v1/in-network-origins/{segment(name)}",
                   {"name": name, "destinations": destinations})
    api.show(data, lambda data: api.say(
        f"origin {data['name']}: {', '.join(data['destinations'])}"))


@api_command(origin, "remove")
def origin_remove(
    api: Api,
    name: Annotated[str, typer.Argument(help="Origin name.", show_default=False)],
) -> None:
    """Remove an in-network origin."""
    api.delete(f"/v1/in-network-origins/{segment(name)}")
    api.say(f"removed in-network origin {name}")


# API tokens
# --------------------------------------------------------------------------------------


@api_command(token, "list")
def token_list(api: Api) -> None:
    """List API tokens (names and scopes; the tokens themselves are never shown again)."""
    rows = api.get("/v1/tokens")
    api.show(rows, lambda rows: table(api, rows, [
        ("id", "id"), ("name", "name"), ("scope", "scope"), ("account_id", "account"),
        ("created_at", "created")], empty="no tokens"))


@api_command(token, "create")
def token_create(
    api: Api,
    name: Annotated[str, typer.Option("--name", help="Shown in the audit log.",
                                      show_default=False)],
    scope: Annotated[str | None, typer.Option(
        "--scope", metavar="deployment|account|pop", show_default=False,
        help="Default: account with --account, else deployment.")] = None,
    account_id: Annotated[str | None, typer.Option(
        "--account", show_default=False, help="The account, for --scope account.")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", dir_okay=False, show_default=False,
        help="Write the token to this file (mode 0600) instead of stdout.")] = None,
) -> None:
    """Create a token. It is printed once (or written to `--output`); only its hash is
    kept."""
    scope = scope or ("account" if account_id is not None else "deployment")
    if scope not in ("deployment", "account", "pop"):
        raise typer.BadParameter("expected deployment, account or pop", param_hint="--scope")
    if (scope == "account") != (account_id is not None):
        usage_error("--account goes with --scope account, and only with it")
    data = api.post("/v1/tokens", {"name": name, "scope": scope, "account_id": account_id})
    secret = str(data.get("token", ""))
    if output is not None:
        write_private(output, secret + "\n")
        data = {key: value for key, value in data.items() if key != "token"}
        api.show({**data, "token_file": str(output)}, lambda data: api.say(
            f"{scope} token {data['id']} ({name}) written to {output} (mode 0600)"))
        return

    def human(data: dict[str, Any]) -> None:
        api.out.print(f"{scope} token {data['id']} ({name})"
                      + (f" for account {account_id}" if account_id else "")
                      + " — shown once, store it now:", markup=False, highlight=False)
        print(secret, flush=True)

    api.show(data, human)


@api_command(token, "revoke")
def token_revoke(
    api: Api,
    token_id: Annotated[str, typer.Argument(help="The token's id (from `egressd token list`).",
                                            show_default=False)],
) -> None:
    """Revoke a token: it stops working at once."""
    api.delete(f"/v1/tokens/{segment(token_id)}")
    api.say(f"revoked token {token_id}")


# Audit log, PoP versions, geofeed
# --------------------------------------------------------------------------------------


def audit(
    api: Api,
    account_id: Annotated[str | None, typer.Option("--account", show_default=False,
                                                   help="Only this account's entries.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000)] = 20,
    before_id: Annotated[int | None, typer.Option(
        "--before", min=1, show_default=False, help="Older than this entry id (paging).")] = None,
    changes: Annotated[bool, typer.Option("--changes", help="Show before/after of each "
                                          "entry.")] = False,
) -> None:
    rows = api.get("/v1/audit", {"account_id": account_id, "limit": limit,
                                 "before_id": before_id})
    columns = [("id", "id"), ("at", "at"), ("actor", "actor"), ("action", "action"),
               ("resource", "resource"), ("version", "version")]
    if changes:
        columns += [("before", "before"), ("after", "after")]
    api.show(rows, lambda rows: table(api, rows, columns, empty="no audit entries"))


def pops(api: Api) -> None:
    data = api.get("/v1/version")

    def human(data: dict[str, Any]) -> None:
        published = data.get("published_at")
        api.out.print(f"config version {data.get('version')}"
                      + (f", published {str(published)[:19].replace('T', ' ')}" if published
                         else ", not published yet")
                      + (f" (built in {data['build_ms']} ms)" if data.get("build_ms") else ""),
                      markup=False)
        table(api, data.get("pops", []), [
            ("pop", "pop"), ("version", "version"), ("current", "current"),
            ("seconds_since_seen", "seen (s ago)"), ("replica", "replica")],
            empty="no PoP has asked for the configuration yet")

    api.show(data, human)


def geofeed(
    api: Api,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", dir_okay=False, show_default=False,
        help="Write it to this file instead of stdout.")] = None,
    deployment: Annotated[Path | None, typer.Option(
        "--deployment", "-d", exists=True, dir_okay=False, show_default=False,
        help="Make it from this deployment file instead of asking the control plane.")] = None,
) -> None:
    if deployment is not None:
        text = _offline_geofeed(deployment)
        if output is not None:
            output.write_text(text, encoding="utf-8")
            api.say(f"wrote {output} ({len(geofeed_rows(text))} entries)")
        elif api.json_output:
            emit_json(geofeed_rows(text))
        else:
            print(text, end="", flush=True)
        return
    response = api.send("GET", "/geofeed.csv")
    if api.json_output:
        emit_json(geofeed_rows(response.text))
        return
    if output is not None:
        output.write_text(response.text, encoding="utf-8")
        lines = [line for line in response.text.splitlines()
                 if line.strip() and not line.startswith("#")]
        api.say(f"wrote {output} ({len(lines)} entries)")
        return
    print(response.text, end="" if response.text.endswith("\n") else "\n", flush=True)


def _offline_geofeed(path: Path) -> str:
    from egressd.control.geofeed import snapshot_geofeed
    from egressd.model.deployment import load_deployment
    from egressd.model.errors import ValidationError

    try:
        return snapshot_geofeed(load_deployment(path.read_text(encoding="utf-8")))
    except ValidationError as error:
        typer.echo(f"egressd geofeed: {path} is not valid:\n{error}", err=True)
        raise typer.Exit(1) from None


def geofeed_rows(text: str) -> list[dict[str, str]]:
    """RFC 8805 lines as objects (for --json); comments and blank lines left out."""
    keys = ("prefix", "country", "region", "city", "postal_code")
    rows = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            values = [part.strip() for part in line.split(",")]
            rows.append(dict(zip(keys, values + [""] * (len(keys) - len(values)), strict=False)))
    return rows
