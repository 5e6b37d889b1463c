"""`egressd control`: run the control plane, and the few things done at the machine
(migrate the store, issue the first tokens, import a deployment file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy import Engine

from egressd.cli.runner import SignalWaiter, hold_signals, run, setup_logging

control = typer.Typer(
    help="The control plane: store, REST API (/v1, OpenAPI at /openapi.json), snapshot "
    "distribution to PoPs, geofeed at /geofeed.csv. SQLite by default; PostgreSQL "
    "(`--db postgresql://...`) for several replicas.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(control, name="control")


StateDir = Annotated[Path, typer.Option("--state-dir", help="Where the SQLite store and the "
                                        "bootstrap admin token live.")]
Database = Annotated[str | None, typer.Option(
    "--db", envvar="EGRESSD_DATABASE_URL",
    help="sqlite:///PATH or postgresql://USER:PASS@HOST/DB. Default: STATE_DIR/control.db.")]


def database_url(db: str | None, state_dir: Path) -> str:
    if db:
        return db
    state_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(state_dir / 'control.db').resolve()}"


@control.command("serve")
def serve(
    state_dir: StateDir = Path(".egressd-control"),
    db: Database = None,
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT of the API.")] = "127.0.0.1:18070",
    replica: Annotated[str, typer.Option("--replica", help="Name shown in PoP status (default host:pid).")] = "",
    deployment: Annotated[Path | None, typer.Option(
        "--import", "-d", exists=True, dir_okay=False,
        help="Load this deployment file into an empty store at start-up.")] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Serve the REST API and snapshots. Migrates the store first. If the store has no
    admin token yet, one is created and written to STATE_DIR/admin.token (mode 0600)."""
    from egressd.control.app import ControlSettings, create_app
    from egressd.control.bootstrap import ensure_admin_token, is_empty
    from egressd.control.db import make_engine, migrate
    from egressd.control.server import ControlServer

    setup_logging(log_level)
    host, _, port_text = listen.rpartition(":")
    if not host or not port_text.isdigit():
        raise typer.BadParameter("expected HOST:PORT, e.g. 127.0.0.1:18070", param_hint="--listen")
    url = database_url(db, state_dir)
    engine = make_engine(url)
    try:
        migrate(engine)
    except Exception as error:
        typer.echo(f"egressd control: cannot open the store {engine.url.render_as_string()}: {error}", err=True)
        raise typer.Exit(1) from None
    token_path = state_dir / "admin.token"
    if ensure_admin_token(engine, token_path):
        typer.echo(f"egressd control: created the first admin token in {token_path} (mode 0600)")
    if deployment is not None and is_empty(engine):
        _import(engine, deployment, replace=False)
    app = create_app(ControlSettings(database_url=url, replica=replica), engine=engine)
    hold_signals()

    async def main() -> None:
        server = ControlServer(app, host=host.strip("[]"), port=int(port_text), log_level=log_level)
        try:
            await server.start()
        except OSError as error:
            typer.echo(f"egressd control: {error}", err=True)
            raise typer.Exit(1) from None
        signals = SignalWaiter()
        typer.echo(f"egressd control: serving {server.url} (store {engine.url.render_as_string()})", err=True)
        reason = await signals.wait()
        typer.echo(f"egressd control: {reason}, stopping", err=True)
        await server.stop()

    run(main)


@control.command("migrate")
def migrate_cmd(state_dir: StateDir = Path(".egressd-control"), db: Database = None) -> None:
    """Create or upgrade the store's schema (Alembic) and exit."""
    from egressd.control.db import make_engine, migrate

    migrate(make_engine(database_url(db, state_dir)))
    typer.echo("egressd control: store is at the newest schema")


@control.command("token")
def token_cmd(
    scope: Annotated[str, typer.Option("--scope", help="deployment, account or pop.")] = "deployment",
    account: Annotated[str | None, typer.Option("--account", help="For --scope account.")] = None,
    name: Annotated[str, typer.Option("--name", help="Shown in the audit log.")] = "cli",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write it to this file (0600) instead of stdout.")] = None,
    state_dir: StateDir = Path(".egressd-control"),
    db: Database = None,
) -> None:
    """Issue an API token directly in the store (for the first admin, or PoPs). Later
    tokens can be made through the API: `egressd token create`."""
    from egressd.control.bootstrap import issue_token, write_private
    from egressd.control.db import make_engine, migrate

    if scope not in ("deployment", "account", "pop"):
        raise typer.BadParameter("expected deployment, account or pop", param_hint="--scope")
    if (scope == "account") != (account is not None):
        raise typer.BadParameter("--account goes with --scope account, and only with it")
    engine = make_engine(database_url(db, state_dir))
    migrate(engine)
    try:
        token = issue_token(engine, name=name, scope=scope, account_id=account)
    except ValueError as error:
        typer.echo(f"egressd control token: {error}", err=True)
        raise typer.Exit(1) from None
    if output is not None:
        write_private(output, token + "\n")
        typer.echo(f"egressd control: {scope} token written to {output} (mode 0600)", err=True)
    else:
        print(token)


@control.command("import")
def import_cmd(
    deployment: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A deployment file (TOML).")],
    replace: Annotated[bool, typer.Option("--replace", help="Remove the current configuration first (tokens and audit log stay).")] = False,
    state_dir: StateDir = Path(".egressd-control"),
    db: Database = None,
) -> None:
    """Validate a deployment file and load it into the store in one transaction."""
    from egressd.control.db import make_engine, migrate

    engine = make_engine(database_url(db, state_dir))
    migrate(engine)
    _import(engine, deployment, replace=replace)


def _import(engine: Engine, path: Path, *, replace: bool) -> None:
    from sqlalchemy.exc import IntegrityError

    from egressd.control.bootstrap import import_deployment
    from egressd.model.errors import ValidationError

    try:
        version = import_deployment(engine, path.read_text(encoding="utf-8"), replace=replace,
                                    source=str(path))
    except ValidationError as error:
        typer.echo(f"egressd control: {path} is not valid, nothing imported:", err=True)
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from None
    except IntegrityError as error:
        typer.echo(f"egressd control: {path} conflicts with the store ({error.orig}); "
                   "nothing imported (use --replace to start over)", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"egressd control: imported {path} (config version {version})", err=True)


