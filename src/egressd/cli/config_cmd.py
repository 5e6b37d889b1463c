"""`egressd config check FILE`: validate a deployment file and explain every problem."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from egressd.model.deployment import DeploymentError, load_deployment


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Deployment files: check them before you roll them out.", no_args_is_help=True
    )
    group.command("check")(check)
    app.add_typer(group, name="config")


def check(
    file: Path = typer.Argument(..., help="Deployment file (TOML), e.g. examples/seed.toml."),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="Print nothing when the file is valid."
    ),
) -> None:
    """Validate a deployment file; print every error with its line and rule; exit 1 if any."""
    out = Console(soft_wrap=True)
    err = Console(stderr=True, soft_wrap=True)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        err.print(f"[red]error:[/red] cannot read {file}: {exc.strerror}")
        raise typer.Exit(2) from exc
    try:
        snapshot = load_deployment(text)
    except DeploymentError as exc:
        err.print(f"[red]{file}: {len(exc.located)} error(s)[/red]")
        for item in sorted(exc.located, key=lambda item: (item.line is None, item.line or 0)):
            where = f"{file}:{item.line}: " if item.line else f"{file}: "
            err.print(f"{where}{item.issue}", markup=False, highlight=False)
        raise typer.Exit(1) from exc
    if quiet:
        return
    active = [entry.account.id for entry in snapshot.accounts.values() if entry.dedicated_active]
    out.print(
        f"[green]{file}: valid[/green] — {len(snapshot.data_centers)} data centers, "
        f"{len(snapshot.accounts)} accounts ({len(active)} with active dedicated egress: "
        f"{', '.join(active) or 'none'}), {len(snapshot.routes)} private routes, "
        f"{len(snapshot.origins)} in-network origins"
    )
