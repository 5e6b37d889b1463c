"""`egressd user`, `egressd group`, `egressd device`: who may send traffic through an
account, and the device credentials the PoPs check."""

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

user = typer.Typer(help=group_help(
    "Users of an account. A user's groups are set on the user (`--groups`, `--add-group`); "
    "groups must exist first (`egressd group add`)."), no_args_is_help=True)
group = typer.Typer(help=group_help(
    "Groups of an account, which policies select. Members join through the user "
    "(`egressd user update ACCOUNT USER --add-group GROUP`)."), no_args_is_help=True)
device = typer.Typer(help=group_help(
    "Devices: the proxy credentials (device id = proxy user name, and a secret) the PoPs "
    "check. `enroll` makes a single-use enrollment token with which a device enrolls itself "
    "(POST /v1/enroll); `add` makes a credential directly. Secrets and tokens are shown "
    "once."), no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(user, name="user", rich_help_panel=PANEL_API,
                  short_help="Users of an account and their groups.")
    app.add_typer(group, name="group", rich_help_panel=PANEL_API,
                  short_help="Groups of an account.")
    app.add_typer(device, name="device", rich_help_panel=PANEL_API,
                  short_help="Devices and enrollment tokens.")


AccountArg = Annotated[str, typer.Argument(help="Account id.", show_default=False)]
UserArg = Annotated[str, typer.Argument(help="User name.", show_default=False)]
GroupArg = Annotated[str, typer.Argument(help="Group name.", show_default=False)]
DeviceArg = Annotated[str, typer.Argument(help="Device id (the proxy user name).",
                                          show_default=False)]


def _base(account_id: str) -> str:
    return f"/v1/accounts/{segment(account_id)}"


# Users
# --------------------------------------------------------------------------------------

USER_COLUMNS = [("name", "user"), ("groups", "groups"), ("devices", "devices")]


@api_command(user, "list")
def user_list(api: Api, account_id: AccountArg) -> None:
    """List an account's users with their groups and devices."""
    rows = api.get(f"{_base(account_id)}/users")
    api.show(rows, lambda rows: table(api, rows, USER_COLUMNS, empty=f"{account_id} has no users"))


@api_command(user, "show")
def user_show(api: Api, account_id: AccountArg, name: UserArg) -> None:
    """One user."""
    data = api.get(f"{_base(account_id)}/users/{segment(name)}")
    api.show(data, lambda data: details(api, data, USER_COLUMNS))


@api_command(user, "add")
def user_add(
    api: Api, account_id: AccountArg, name: UserArg,
    groups: Annotated[list[str] | None, typer.Option(
        "--group", "-g", show_default=False,
        help="A group the user is in; repeat, or separate with commas.")] = None,
) -> None:
    """Add a user to an account."""
    data = api.post(f"{_base(account_id)}/users",
                    {"name": name, "groups": split_values(groups)})
    api.show(data, lambda data: details(api, data, USER_COLUMNS))


@api_command(user, "update")
def user_update(
    api: Api, account_id: AccountArg, name: UserArg,
    groups: Annotated[str | None, typer.Option(
        "--groups", metavar="G,...", show_default=False,
        help="Replace the user's groups ('' leaves none).")] = None,
    add_groups: Annotated[list[str] | None, typer.Option(
        "--add-group", show_default=False, help="Put the user in this group too; repeat.")] = None,
    remove_groups: Annotated[list[str] | None, typer.Option(
        "--remove-group", show_default=False, help="Take the user out of this group.")] = None,
) -> None:
    """Change a user's groups."""
    if groups is None and not add_groups and not remove_groups:
        usage_error("nothing to change: give --groups, --add-group or --remove-group")
    path = f"{_base(account_id)}/users/{segment(name)}"
    wanted = split_values([groups]) if groups is not None else list(api.get(path)["groups"])
    wanted += [item for item in split_values(add_groups) if item not in wanted]
    removing = set(split_values(remove_groups))
    data = api.patch(path, {"groups": [item for item in wanted if item not in removing]})
    api.show(data, lambda data: details(api, data, USER_COLUMNS))


@api_command(user, "remove")
def user_remove(api: Api, account_id: AccountArg, name: UserArg) -> None:
    """Remove a user with their devices and enrollment tokens (refused while a policy
    selects the user or one of the devices)."""
    api.delete(f"{_base(account_id)}/users/{segment(name)}")
    api.say(f"removed user {name} of {account_id}")


# Groups
# --------------------------------------------------------------------------------------

GROUP_COLUMNS = [("name", "group"), ("members", "members")]


@api_command(group, "list")
def group_list(api: Api, account_id: AccountArg) -> None:
    """List an account's groups with their members."""
    rows = api.get(f"{_base(account_id)}/groups")
    api.show(rows, lambda rows: table(api, rows, GROUP_COLUMNS,
                                      empty=f"{account_id} has no groups"))


@api_command(group, "show")
def group_show(api: Api, account_id: AccountArg, name: GroupArg) -> None:
    """One group and its members."""
    data = api.get(f"{_base(account_id)}/groups/{segment(name)}")
    api.show(data, lambda data: details(api, data, GROUP_COLUMNS))


@api_command(group, "add")
def group_add(api: Api, account_id: AccountArg, name: GroupArg) -> None:
    """Create a group."""
    data = api.post(f"{_base(account_id)}/groups", {"name": name})
    api.show(data, lambda data: api.say(f"created group {data['name']} in {account_id}"))


@api_command(group, "remove")
def group_remove(api: Api, account_id: AccountArg, name: GroupArg) -> None:
    """Remove a group; its members leave it (refused while a policy selects it)."""
    api.delete(f"{_base(account_id)}/groups/{segment(name)}")
    api.say(f"removed group {name} of {account_id}")


# Devices and enrollment tokens
# --------------------------------------------------------------------------------------

DEVICE_COLUMNS = [("id", "device"), ("user", "user"), ("created_at", "created")]


@api_command(device, "list")
def device_list(
    api: Api, account_id: AccountArg,
    user_name: Annotated[str | None, typer.Option("--user", show_default=False,
                                                  help="Only this user's devices.")] = None,
) -> None:
    """List an account's devices (never their secrets)."""
    rows = api.get(f"{_base(account_id)}/devices", {"user": user_name})
    api.show(rows, lambda rows: table(api, rows, DEVICE_COLUMNS,
                                      empty=f"{account_id} has no devices"))


@api_command(device, "show")
def device_show(api: Api, account_id: AccountArg, device_id: DeviceArg) -> None:
    """One device."""
    data = api.get(f"{_base(account_id)}/devices/{segment(device_id)}")
    api.show(data, lambda data: details(api, data, DEVICE_COLUMNS))


@api_command(device, "enroll")
def device_enroll(
    api: Api, account_id: AccountArg, user_name: UserArg,
    expires: Annotated[int, typer.Option("--expires", min=1, max=10080, metavar="MINUTES",
                                         help="How long the token can be used.")] = 60,
) -> None:
    """Create a single-use enrollment token for a device of USER. It is shown once: hand
    it to the device, which enrolls itself with POST /v1/enroll (no admin token)."""
    data = api.post(f"{_base(account_id)}/enrollment-tokens",
                    {"user": user_name, "expires_in_minutes": expires})

    def human(data: dict[str, Any]) -> None:
        expires_at = str(data.get("expires_at", ""))[:19].replace("T", " ")
        api.out.print(f"enrollment token {data['id']} for {user_name} of {account_id}, single "
                      f"use, expires {expires_at} UTC. The device enrolls with:", markup=False)
        api.out.print(f"  curl -sS -X POST {api.url}/v1/enroll -H 'content-type: "
                      "application/json' -d '{\"token\": \"<token>\"}'", markup=False)
        api.out.print("the token, shown once:")
        print(data["token"], flush=True)

    api.show(data, human)


@api_command(device, "add")
def device_add(
    api: Api, account_id: AccountArg, user_name: UserArg,
    device_id: Annotated[str | None, typer.Option(
        "--id", show_default=False, help="The proxy user name, unique in the deployment "
        "(default: ACCOUNT-USER-<6 hex>).")] = None,
) -> None:
    """Create a device credential directly; its secret (the proxy password) is shown once."""
    body: dict[str, Any] = {"user": user_name}
    if device_id is not None:
        body["id"] = device_id
    data = api.post(f"{_base(account_id)}/devices", body)

    def human(data: dict[str, Any]) -> None:
        api.out.print(f"device {data['id']} of {user_name} ({account_id}); proxy user name "
                      f"{data['id']}, password shown once:", markup=False)
        print(data["secret"], flush=True)

    api.show(data, human)


@api_command(device, "remove")
def device_remove(api: Api, account_id: AccountArg, device_id: DeviceArg) -> None:
    """Remove a device: the PoPs refuse it from the next config version on."""
    api.delete(f"{_base(account_id)}/devices/{segment(device_id)}")
    api.say(f"removed device {device_id} of {account_id}")


@api_command(device, "tokens")
def device_tokens(api: Api, account_id: AccountArg) -> None:
    """List an account's enrollment tokens: unused, used (by which device) or expired."""
    rows = api.get(f"{_base(account_id)}/enrollment-tokens")
    api.show(rows, lambda rows: table(api, rows, [
        ("id", "id"), ("user", "user"), ("status", "status"), ("expires_at", "expires"),
        ("used_by_device", "device")], empty=f"{account_id} has no enrollment tokens"))


@api_command(device, "revoke-token")
def device_revoke_token(
    api: Api, account_id: AccountArg,
    token_id: Annotated[str, typer.Argument(help="The enrollment token's id.",
                                            show_default=False)],
) -> None:
    """Revoke an enrollment token before it is used."""
    api.delete(f"{_base(account_id)}/enrollment-tokens/{segment(token_id)}")
    api.say(f"revoked enrollment token {token_id} of {account_id}")
