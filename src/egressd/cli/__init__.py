"""The `egressd` command: one module per command group, registered on one typer app."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="egressd",
    help=(
        "egressd: a self-hosted egress gateway. Devices attach to the nearest PoP; traffic "
        "leaves from shared addresses or from an organisation's dedicated egress IPs."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

# Each module defines `register(app)`; a missing optional module must not break the rest.
_COMMAND_MODULES = ("config_cmd", "echo_cmd", "serve_cmd", "pop_cmd", "control_cmd", "pki_cmd",
                    "accounts_cmd", "network_cmd", "identity_cmd", "policy_cmd", "infra_cmd",
                    "lab_cmd", "client_cmd", "tunnel_cmd")


def _register_all() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"egressd.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"egressd.cli.{name}":
                raise
            continue
        module.register(app)


_register_all()


def main() -> None:
    app()
